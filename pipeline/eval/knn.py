"""Frozen-feature evaluation of backbones: weighted kNN (DINO's protocol) and a linear probe.

kNN: features are L2-normalised; each test sample takes its k most cosine-similar training samples, each
votes for its class with weight exp(similarity / T); the classes are ranked by their summed votes.
A class counts as predicted at rank r when fewer than r classes have strictly more votes and it has a vote.

Linear probe: multinomial logistic regression on the frozen features (standardised with the training mean
and std): a zero-initialised nn.Linear trained by torch.optim.SGD with momentum, a cosine schedule and L2 weight
decay on the weight, in float32, mini-batches in an order drawn from `seed`: the same inputs give the same result
on the same device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """{k: bool (N,)}: label scored among the top k, ties resolved in the label's favour."""
    own = scores.gather(1, labels.view(-1, 1))
    rank = (scores > own).sum(1)
    return {k: rank < k for k in ks}


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(N_test, num_classes) summed neighbour votes, float32."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> dict[str, float]:
    """{"top1", "top5"} of the weighted kNN classifier (DINO: k=20, T=0.07)."""
    votes = knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk)
    labels = test_labels.long().to(votes.device)
    own = votes.gather(1, labels.view(-1, 1)).squeeze(1)
    hits = _topk_hits(votes, labels, (1, 5))
    return {f"top{r}": (hits[r] & (own > 0)).float().mean().item() for r in (1, 5)}


@torch.no_grad()
def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 wd: float = 0.0, batch_size: int = 0, momentum: float = 0.9, seed: int = 0,
                 return_weights: bool = False) -> dict:
    """Trains a linear classifier on frozen features; returns {"top1", "top5", "train_top1"} (and "weight",
    "bias" in the standardised feature space when return_weights). batch_size 0 = full batch.
    The loss per step: mean cross-entropy + wd/2 * ||W||^2 (the bias is not decayed)."""
    device = train_feats.device
    x_train, x_test = train_feats.float(), test_feats.float().to(device)
    y_train, y_test = train_labels.long().to(device), test_labels.long().to(device)
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True).clamp(min=1e-6) if x_train.shape[0] > 1 else torch.ones_like(mean)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    n = x_train.shape[0]
    probe = torch.nn.Linear(x_train.shape[1], num_classes, device=device)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    bs = n if batch_size <= 0 else min(batch_size, n)
    total = max(1, epochs * math.ceil(n / bs))
    # torch.optim.SGD with momentum (buf = m * buf + grad; p -= lr * buf), weight decay on the weight only, and a
    # per-step cosine schedule from LambdaLR; autograd gives the cross-entropy gradient
    opt = torch.optim.SGD([{"params": [probe.weight], "weight_decay": wd}, {"params": [probe.bias]}],
                          lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device) if bs < n else torch.arange(n, device=device)
            for idx in order.split(bs):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(probe(x_train[idx]), y_train[idx]).backward()
                opt.step()
                sched.step()
    weight, bias = probe.weight.detach(), probe.bias.detach()
    test_hits = _topk_hits(x_test @ weight.T + bias, y_test, (1, 5))
    train_hits = _topk_hits(x_train @ weight.T + bias, y_train, (1,))
    result = {"top1": test_hits[1].float().mean().item(), "top5": test_hits[5].float().mean().item(),
              "train_top1": train_hits[1].float().mean().item()}
    if return_weights:
        result.update(weight=weight, bias=bias)
    return result


@torch.no_grad()
def extract_features(model, shard_pattern: str | list[str], transform, batch_size: int = 256, max_samples: int = 0,
                     key: str = "data.val") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,)) of every readable sample with an image and a `.cls` label
    in the shards (captions are not needed), in shard order, up to max_samples (0 = all).
    `model` is a backbone (pipeline.models.backbone); call under GatheredParameters with ZeRO-3."""
    from pipeline.data.decoders import ImageLabelDecoder
    from pipeline.data.eval_loader import iterate_decoded
    from pipeline.data.loader import ShardSet, expand_shards
    from pipeline.models.backbone import backbone_features

    was_training = model.training
    model.eval()
    param = next(model.parameters())
    shards = ShardSet(expand_shards(shard_pattern, key))
    limit = shards.total if max_samples <= 0 else min(max_samples, shards.total)
    decoder = ImageLabelDecoder(transform)  # unreadable, no image, no or bad label: skipped, as in training
    feats, labels = [], []
    for batch in iterate_decoded(shards, decoder, batch_size, range(limit)):
        if "images" not in batch:
            continue
        images = decoder.to_device(batch, param.device, param.dtype)["images"]
        feats.append(backbone_features(model, images).float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def evaluate_backbone(model, val: str | list[str], transform, train: str | list[str] = "", batch_size: int = 256,
                      knn_k: int = 20, knn_temperature: float = 0.07, knn_train_samples: int = 10000,
                      probe_epochs: int = 0, probe_lr: float = 0.1, probe_wd: float = 0.0,
                      probe_batch_size: int = 256, seed: int = 0) -> dict:
    """Held-out evaluation of a backbone (rank 0, full model): {"samples", "classes"} and
    - "top1", "top5": its own classifier on `val` (when it has one: num_classes > 0);
    - "knn_top1", "knn_top5" (knn_k > 0) and "probe_top1", "probe_top5" (probe_epochs > 0): frozen pooled features
      of the first `knn_train_samples` samples of `train` (eval transform, no augmentation) as the bank /
      training set, the `val` features as queries. The number of classes is the largest label + 1."""
    from pipeline.objectives.classification import accuracy_topk

    val_feats, val_labels = extract_features(model, val, transform, batch_size, key="data.val")
    results: dict = {"samples": int(val_labels.numel())}
    if not results["samples"]:
        return results
    num_classes = getattr(model, "num_classes", 0) or 0
    if num_classes:
        head = model.get_classifier()
        param = next(head.parameters())
        logits = torch.cat([head(chunk.to(param.device, param.dtype)).float().cpu()
                            for chunk in val_feats.split(batch_size)])
        acc = accuracy_topk(logits, val_labels, (1, 5))
        results.update(top1=acc[1], top5=acc[5])
    if train and (knn_k > 0 or probe_epochs > 0):
        bank, bank_labels = extract_features(model, train, transform, batch_size, max_samples=knn_train_samples,
                                             key="data.train")
        classes = max(num_classes, int(max(bank_labels.max(), val_labels.max())) + 1)
        results["classes"] = classes
        if knn_k > 0:
            r = knn_classify(bank, bank_labels, val_feats, val_labels, classes, knn_k, knn_temperature)
            results.update(knn_top1=r["top1"], knn_top5=r["top5"])
        if probe_epochs > 0:
            r = linear_probe(bank, bank_labels, val_feats, val_labels, classes, probe_epochs, probe_lr, probe_wd,
                             probe_batch_size, seed=seed)
            results.update(probe_top1=r["top1"], probe_top5=r["top5"])
    else:
        results["classes"] = max(num_classes, int(val_labels.max()) + 1)
    return results


def format_backbone_results(r: dict) -> str:
    parts = [f"{r['samples']} held-out samples"]
    chance = f" (chance {100 / r['classes']:.1f}%)" if r.get("classes") else ""
    for key, what in (("", "classifier"), ("knn_", "kNN"), ("probe_", "linear probe")):
        if f"{key}top1" in r:
            parts.append(f"{what} top-1 {100 * r[key + 'top1']:.1f}% / top-5 {100 * r[key + 'top5']:.1f}%")
    return "; ".join(parts) + (f" over {r['classes']} classes{chance}" if r.get("classes") else "")
