"""kNN (DINO protocol) and the linear probe against brute-force numpy, on random and on separable data."""
import numpy as np
import pytest
import torch

from pipeline.eval.knn import extract_features, knn_classify, knn_scores, linear_probe


def numpy_knn(train, train_labels, test, test_labels, num_classes, k, temperature):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    hits = {1: [], 5: []}
    for i, q in enumerate(test):
        sims = [float(np.dot(q, t)) for t in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        for j in nearest:
            scores[i, train_labels[j]] += np.exp(sims[j] / temperature)
        own = scores[i, test_labels[i]]
        above = sum(1 for c in range(num_classes) if scores[i, c] > own)
        for r in hits:
            hits[r].append(own > 0 and above < r)
    return scores, {f"top{r}": float(np.mean(v)) for r, v in hits.items()}


@pytest.mark.parametrize("k,temperature,classes", [(20, 0.07, 10), (5, 0.5, 7), (1, 0.07, 3), (200, 0.1, 12)])
def test_knn_matches_numpy(k, temperature, classes):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(150, 16)), rng.normal(size=(40, 16))
    # labels correlated with a direction so the accuracies are not all chance
    noise = (rng.random(150) < 0.3) * rng.integers(0, classes, 150)
    train_labels = (np.argmax(train[:, :classes], 1) + noise) % classes
    test_labels = np.argmax(test[:, :classes], 1)
    ref_scores, ref = numpy_knn(train, train_labels, test, test_labels, classes, min(k, 150), temperature)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    args = (t(train), torch.tensor(train_labels), t(test))
    scores = knn_scores(*args, classes, k, temperature, chunk=16)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-4)
    got = knn_classify(*args, torch.tensor(test_labels), classes, k, temperature, chunk=7)
    assert got == pytest.approx(ref)
    assert 0 < got["top1"] <= got["top5"] <= 1


def separable(n_per_class=30, classes=6, dim=12, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    feats = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return torch.tensor(feats, dtype=torch.float32), torch.tensor(labels)


def test_separable_clusters_are_perfect():
    x, y = separable(seed=0)
    xt, yt = separable(n_per_class=10, seed=0)  # same centres, fresh noise
    xt = xt + 0.01 * torch.randn_like(xt)
    assert knn_classify(x, y, xt, yt, 6) == {"top1": 1.0, "top5": 1.0}
    probe = linear_probe(x, y, xt, yt, 6, epochs=30, lr=0.1, batch_size=32, seed=0)
    assert probe["top1"] == 1.0 and probe["top5"] == 1.0 and probe["train_top1"] == 1.0


def numpy_probe(x, y, classes, epochs, lr, wd, momentum):
    """Full-batch SGD with momentum (torch's form) on the standardised features, cosine lr, zero init."""
    mean, std = x.mean(0, keepdims=True), x.std(0, ddof=1, keepdims=True)
    x = (x - mean) / std
    n, d = x.shape
    w, b = np.zeros((classes, d)), np.zeros(classes)
    bw, bb = None, None
    onehot = np.eye(classes)[y]
    for step in range(epochs):
        lr_t = lr * 0.5 * (1 + np.cos(np.pi * step / epochs))
        z = x @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        gw, gb = g.T @ x + wd * w, g.sum(0)
        bw, bb = (gw, gb) if bw is None else (momentum * bw + gw, momentum * bb + gb)
        w, b = w - lr_t * bw, b - lr_t * bb
    return w, b


def test_linear_probe_matches_numpy_gradient_descent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10)) * rng.uniform(0.5, 3, size=10) + rng.normal(size=10)
    y = rng.integers(0, 4, 64)
    w_ref, b_ref = numpy_probe(x, y, 4, epochs=25, lr=0.5, wd=1e-3, momentum=0.9)
    xt = torch.tensor(x, dtype=torch.float32)
    res = linear_probe(xt, torch.tensor(y), xt[:8], torch.tensor(y[:8]), 4, epochs=25, lr=0.5, wd=1e-3,
                       momentum=0.9, return_weights=True)
    np.testing.assert_allclose(res["weight"].numpy(), w_ref, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(res["bias"].numpy(), b_ref, atol=2e-4, rtol=1e-3)
    logits = ((x - x.mean(0)) / x.std(0, ddof=1)) @ w_ref.T + b_ref
    assert res["train_top1"] == pytest.approx(float(np.mean(np.argmax(logits, 1) == y)))


def test_linear_probe_is_deterministic():
    x, y = separable(seed=1, spread=1.5)
    runs = [linear_probe(x, y, x, y, 6, epochs=5, lr=0.05, batch_size=16, seed=s, return_weights=True)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0]["weight"], runs[1]["weight"])
    assert not torch.equal(runs[0]["weight"], runs[2]["weight"])


def test_extract_features_on_demo_shards(demo_data):
    from pipeline.models.backbone import backbone_transforms, create_backbone

    torch.manual_seed(0)
    model = create_backbone("demo_vit")
    model.train()
    feats, labels = extract_features(model, demo_data["val"], backbone_transforms(model, train=False),
                                     batch_size=32, max_samples=50)
    assert feats.shape == (50, 128) and labels.shape == (50,) and model.training
    # in shard order, each sample's pooled features from the eval-mode model and its .cls label
    from pipeline.data.decoders import ImageLabelDecoder, decode_label
    from pipeline.data.loader import ShardSet, expand_shards
    from pipeline.models.backbone import backbone_features

    shards = ShardSet(expand_shards(demo_data["val"]))
    raws = [shards.read(i)[1] for i in (0, 1, 37, 49)]
    decoder = ImageLabelDecoder(backbone_transforms(model, train=False))
    images = decoder.to_device(decoder.collate([decoder.sample(r) for r in raws]), "cpu", torch.float32)["images"]
    model.eval()
    with torch.no_grad():
        direct = backbone_features(model, images)
    torch.testing.assert_close(feats[[0, 1, 37, 49]], direct.float(), rtol=1e-5, atol=1e-5)
    assert labels[[0, 1, 37, 49]].tolist() == [decode_label(r) for r in raws]


def test_evaluate_backbone_on_demo_shards(demo_data):
    from pipeline.eval.knn import evaluate_backbone, format_backbone_results
    from pipeline.models.backbone import backbone_transforms, create_backbone

    torch.manual_seed(0)
    model = create_backbone("demo_vit")
    tf = backbone_transforms(model, train=False)
    r = evaluate_backbone(model, demo_data["val"], tf, demo_data["train"], batch_size=40, knn_k=5,
                          knn_train_samples=60, probe_epochs=3)
    assert r["samples"] == 80 and r["classes"] == 40
    # each figure from its parts: the classifier on the val features, kNN and the probe over the first 60 train
    # samples as the bank
    from pipeline.objectives.classification import accuracy_topk

    val, val_labels = extract_features(model, demo_data["val"], tf, batch_size=40)
    bank, bank_labels = extract_features(model, demo_data["train"], tf, batch_size=40, max_samples=60)
    with torch.no_grad():
        acc = accuracy_topk(model.get_classifier()(val), val_labels, (1, 5))
    knn = knn_classify(bank, bank_labels, val, val_labels, 40, k=5)
    probe = linear_probe(bank, bank_labels, val, val_labels, 40, 3, 0.1, 0.0, 256, seed=0)
    assert (r["top1"], r["top5"]) == (acc[1], acc[5])
    assert (r["knn_top1"], r["knn_top5"]) == (knn["top1"], knn["top5"])
    assert (r["probe_top1"], r["probe_top5"]) == (probe["top1"], probe["top5"])
    assert "classifier top-1" in format_backbone_results(r) and "over 40 classes" in format_backbone_results(r)
    headless = create_backbone("demo_vit", num_classes=0)
    r = evaluate_backbone(headless, demo_data["val"], tf, batch_size=40)
    assert "top1" not in r and r["samples"] == 80
