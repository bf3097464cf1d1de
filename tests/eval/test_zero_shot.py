"""Zero-shot classification and retrieval (pipeline/eval/zero_shot.py): ImageNet class names and templates from
open_clip, label-only shards, blocked retrieval, and the same numbers on 2 ranks as on 1."""
import io
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from conftest import DEMO_CONFIG, run_pipeline
from pipeline.config import ConfigError
from pipeline.data.image_decode import ImageToTensor
from pipeline.eval.class_prompts import ClassPrompts, load_class_prompts, zero_shot_weights
from pipeline.eval.ranks import EvalRanks
from pipeline.eval.retrieval import recall_at_k, recall_hits
from pipeline.eval.zero_shot import evaluate
from pipeline.shard.writer import ShardWriter

N_SAMPLES = 1000
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised open_clip directory small enough to encode ImageNet's 80,000 prompts in seconds."""
    out = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    model, _, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{out}")
    return out, model.eval(), eval_tf, open_clip.get_tokenizer(f"local-dir:{out}")


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def _direct_logits(model, eval_tf, tokenizer, images: list[bytes]) -> torch.Tensor:
    """(images, 1000) zero-shot logits computed the plain way: per class, the normalised mean of its normalised
    prompt embeddings (100 classes per forward), all images in one batch."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    weights = []
    for start in range(0, 1000, 100):
        names = IMAGENET_CLASSNAMES[start:start + 100]
        emb = model.encode_text(tokenizer([t(name) for name in names for t in OPENAI_IMAGENET_TEMPLATES]))
        weights.append(F.normalize(F.normalize(emb, dim=-1).view(len(names), -1, emb.shape[-1]).mean(1), dim=-1))
    to_tensor = ImageToTensor(eval_tf)
    pixels = to_tensor.model_input(torch.stack([to_tensor(b) for b in images]), "cpu", torch.float32)
    return F.normalize(model.encode_image(pixels), dim=-1) @ torch.cat(weights).T


@pytest.fixture(scope="module")
def imagenet_shards(tiny_clip, tmp_path_factory):
    """Two 1000-sample val shards of random images with labels in 0..999 chosen from the direct logits so that
    the accuracy is known exactly: 400 samples labelled with their clear top-1 class, 200 with a clear 3rd,
    the rest with a class ranked below 10th. `label_only` has .png + .cls; `mixed` adds a caption to every
    other sample. Returns (label_only pattern, mixed pattern, expected top-1, expected top-5)."""
    _, model, eval_tf, tokenizer = tiny_clip
    rng = np.random.default_rng(0)
    images = [_png(rng) for _ in range(N_SAMPLES)]
    logits = _direct_logits(model, eval_tf, tokenizer, images)
    ranked = logits.sort(dim=1, descending=True)
    gap = 1e-4  # far above float rounding between batchings: the expected ranks cannot flip
    labels, top1, top5 = [], 0, 0
    for i in range(N_SAMPLES):
        v, idx = ranked.values[i], ranked.indices[i]
        if top1 < 400 and v[0] - v[1] > gap:
            labels.append(int(idx[0]))
            top1 += 1
        elif top5 < 200 and v[1] - v[2] > gap and v[2] - v[3] > gap:
            labels.append(int(idx[2]))
            top5 += 1
        else:
            labels.append(int(idx[10 + rng.integers(0, 990)]))
    assert top1 == 400 and top5 == 200
    paths = {}
    for name in ("label_only", "mixed"):
        out = tmp_path_factory.mktemp(name)
        with ShardWriter(out, prefix="val", samples_per_shard=N_SAMPLES) as w:
            for i, (image, label) in enumerate(zip(images, labels)):
                members = {"png": image, "cls": str(label)}
                if name == "mixed" and i % 2:
                    members["txt"] = f"caption {i} of a {rng.choice(['red', 'green', 'blue'])} thing"
                w.write(f"{i:06d}", members)
        paths[name] = str(out / "val-000000.tar")
    return paths["label_only"], paths["mixed"], 0.4, 0.6


def test_imagenet_zero_shot_on_a_label_only_shard_matches_a_direct_computation(tiny_clip, imagenet_shards):
    _, model, eval_tf, tokenizer = tiny_clip
    label_only, _, top1, top5 = imagenet_shards
    r = evaluate(model, eval_tf, tokenizer, label_only, "imagenet", batch_size=100, workers=1)
    assert r == {"samples": 1000, "skipped_samples": 0, "classes": 1000, "zero_shot_samples": 1000,
                 "zero_shot_top1": top1, "zero_shot_top5": top5}  # no captions: no retrieval keys


def _match_ranks(queries, items):
    """From the whole similarity matrix: how many items score strictly above each query's match (item i)."""
    sim = queries @ items.T
    return (sim > sim.diagonal().unsqueeze(1)).sum(1)


def _recall_reference(queries, items, ks):
    rank = _match_ranks(queries, items)
    return {k: int((rank < k).sum()) / len(rank) for k in ks}


def test_blocked_recall_equals_the_full_matrix():
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    items = F.normalize(q + 0.8 * torch.randn(300, 16, generator=gen), dim=-1)
    items[7] = items[3]  # a tie: query 3 and 7 each count only items strictly above their match
    expected = _recall_reference(q, items, [1, 5, 10])
    assert 0 < expected[1] < expected[5] < expected[10] < 1
    for block in (1, 299, 300 * 17, 1 << 26):  # one row per block, uneven blocks, several rows, all at once
        assert recall_at_k(q, items, [1, 5, 10], block_elems=block) == expected
    # a rank's 50 queries against all items, rotated so that query i's match sits at row i + 200
    rotated = torch.cat([items[100:], items[:100]])
    rank = _match_ranks(q, items)[:50]
    for block in (1, 16 * 300, 1 << 26):
        assert recall_hits(q[:50], rotated, torch.arange(50) + 200, [1, 5], block) == {
            k: int((rank < k).sum()) for k in (1, 5)}


def _one_and_two_ranks(tiny_clip, val, classes, out_json):
    export, model, eval_tf, tokenizer = tiny_clip
    one = evaluate(model, eval_tf, tokenizer, val, classes, batch_size=100, workers=0)
    run_pipeline("eval", "--model", export, "--val", val, "--classes", classes, "--batch-size", "100",
                 "--workers", "1", "--nproc-per-node", "2", "--out", out_json)
    return one, json.loads(out_json.read_text())


def test_two_ranks_give_the_numbers_of_one(tiny_clip, imagenet_shards, tmp_path):
    """A shard with labels on all and captions on half of the samples: the eval verb spread over 2 ranks (each
    encodes its half of the images and of the 1000 classes; retrieval over the gathered pairs) gives exactly
    what one process gives. The classes: ImageNet's names as a plain JSON list (open_clip's 7 simple templates:
    a tenth of the prompts of `imagenet`)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = tmp_path / "imagenet_names.json"
    names.write_text(json.dumps(list(IMAGENET_CLASSNAMES)))
    one, two = _one_and_two_ranks(tiny_clip, imagenet_shards[1], str(names), tmp_path / "two.json")
    assert one["zero_shot_samples"] == 1000 and one["zero_shot_top5"] > 0.1
    assert one["retrieval_samples"] == 500 and 0 < one["i2t_R@10"] < 1 and 0 < one["t2i_R@10"] < 1
    assert two == one


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one_with_imagenet_templates(tiny_clip, imagenet_shards, tmp_path):
    _, mixed, top1, top5 = imagenet_shards
    one, two = _one_and_two_ranks(tiny_clip, mixed, "imagenet", tmp_path / "two.json")
    assert one["zero_shot_top1"] == top1 and one["zero_shot_top5"] == top5
    assert two == one


def test_class_lists_and_bad_class_files(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog"]))
    p = load_class_prompts(str(names))
    assert list(p.classes) == ["cat", "dog"] and p.templates[0]("cat") == "itap of a cat."
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"classes": ["cat"], "templates": ["a photo of a {}."]}))
    assert load_class_prompts(str(full)).templates == ["a photo of a {}."]
    assert len(load_class_prompts("imagenet").classes) == 1000
    bad = {"missing.json": None, "notjson.json": "{", "empty.json": "[]", "numbers.json": "[1, 2]",
           "keys.json": json.dumps({"classes": ["a"]}),
           "template.json": json.dumps({"classes": ["a"], "templates": ["a photo"]}),
           "braces.json": json.dumps({"classes": ["a"], "templates": ["a {} of {x}"]})}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=r"^data\.classes: ") as e:
            load_class_prompts(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_bad_classes_stop_train_and_eval_with_one_line(tiny_clip, demo_data, tmp_path):
    names = tmp_path / "names.json"
    names.write_text('{"classes": ["a"]}')
    proc = run_pipeline("eval", "--model", tiny_clip[0], "--val", demo_data["val"], "--classes", names, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --classes: {names} must hold a list of class names or an "
                                                f"object with exactly the keys \"classes\" and \"templates\""]
    proc = run_pipeline("train", "--config", DEMO_CONFIG, f"data.train={demo_data['train']}",
                        f"data.val={demo_data['val']}", "data.classes=imagenet.json", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: data.classes: file not found: imagenet.json (give 'imagenet', "
                                                "a JSON list of class names, or a JSON {\"classes\": [...], "
                                                "\"templates\": [...]})"]


class _LocalShare(EvalRanks):
    """One rank's view without a process group: gather_rows returns this rank's own rows."""

    def gather_rows(self, rows):
        return rows


@pytest.mark.parametrize("templates", ["OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES"])
def test_zero_shot_weights_are_open_clips_classifier_split_over_ranks(tiny_clip, templates):
    """zero_shot_weights is open_clip's build_zero_shot_classifier (transposed to (classes, d), float32) on one
    process; the rank shares (3 ranks over 25 classes: 8 / 8 / 9) stacked in rank order give the same rows."""
    import open_clip.zero_shot_metadata as meta
    from open_clip import build_zero_shot_classifier

    _, model, _, tokenizer = tiny_clip
    prompts = ClassPrompts(meta.IMAGENET_CLASSNAMES[:25], getattr(meta, templates))
    reference = build_zero_shot_classifier(model, tokenizer, prompts.classes, prompts.templates,
                                           num_classes_per_batch=None).T
    one = zero_shot_weights(model, tokenizer, prompts, torch.device("cpu"), EvalRanks())
    assert one.dtype == torch.float32 and one.shape == (25, 32)
    torch.testing.assert_close(one, reference, rtol=0, atol=1e-6)
    shares = [zero_shot_weights(model, tokenizer, prompts, torch.device("cpu"), _LocalShare(r, 3)) for r in range(3)]
    assert [len(s) for s in shares] == [8, 8, 9]
    torch.testing.assert_close(torch.cat(shares), reference, rtol=0, atol=1e-6)
