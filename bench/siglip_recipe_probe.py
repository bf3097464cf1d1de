"""What a trained demo CLIP/SigLIP run has learnt, attribute by attribute (bench/results/siglip_recipe.md).

    python bench/siglip_recipe_probe.py RUN_DIR [RUN_DIR ...] --val 'DATA/val/val-{000000..000001}.tar' \
        --classes DATA/classes.json

For each run, on the held-out split: zero-shot top-1 and how much of it is colour and how much shape (the demo's
class names are "<colour> <shape>"); the cosine between the prompts of two shapes of one colour (does the text tower
tell shapes apart?); and, over batches of 128 pairs as in training, the positive pair's probability grouped by k, the
number of other pairs with the same caption in the batch (sigmoid(z_ii) for SigLIP, softmax p_ii for CLIP). If
duplicate captions, labelled negatives by the sigmoid loss, were what holds SigLIP's positives back, sigmoid(z_ii)
would settle near 1/(k+1).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline

from pipeline.data.eval_loader import iterate_eval_samples  # noqa: E402
from pipeline.data.loader import ShardSet, expand_shards  # noqa: E402
from pipeline.eval.class_prompts import ClassPrompts, zero_shot_weights  # noqa: E402
from pipeline.export import load_model_from_checkpoint  # noqa: E402
from pipeline.train.checkpoint import resolve_checkpoint  # noqa: E402

BATCH = 128  # pairs per training step in the demo (64 per rank x 2 ranks)


def embed(model, transform, tokenizer, val: str):
    img, txt, labels = [], [], []
    with torch.no_grad():
        for images, captions, lab in iterate_eval_samples(ShardSet(expand_shards(val, "--val")), transform, 250,
                                                           with_label=True):
            img.append(F.normalize(model.encode_image(images).float(), dim=-1))
            txt.append(F.normalize(model.encode_text(tokenizer(captions)).float(), dim=-1))
            labels.extend(lab)
    return torch.cat(img), torch.cat(txt), torch.tensor(labels)


def probe(run: str, val: str, classes: dict) -> None:
    model, _, transform, tokenizer, _ = load_model_from_checkpoint(resolve_checkpoint(run))
    model.eval()
    names = classes["classes"]
    colour = [n.split()[0] for n in names]
    shape = [n.split()[1] for n in names]
    img, txt, labels = embed(model, transform, tokenizer, val)
    with torch.no_grad():
        cls = zero_shot_weights(model, tokenizer, ClassPrompts(names, classes["templates"]), torch.device("cpu"))
    pred = (img @ cls.T).argmax(1).tolist()
    truth = labels.tolist()
    top1 = sum(p == t for p, t in zip(pred, truth)) / len(truth)
    colour_ok = sum(colour[p] == colour[t] for p, t in zip(pred, truth)) / len(truth)
    shape_ok = sum(shape[p] == shape[t] for p, t in zip(pred, truth)) / len(truth)
    pairs = [(i, j) for i, j in itertools.combinations(range(len(names)), 2) if colour[i] == colour[j]]
    prompt_cos = sum((cls[i] @ cls[j]).item() for i, j in pairs) / len(pairs)

    t = model.logit_scale.exp().item()
    bias = getattr(model, "logit_bias", None)
    sigmoid = bias is not None
    b = bias.item() if sigmoid else 0.0
    by_k: dict[int, list[float]] = {}
    for start in range(0, len(labels) - BATCH + 1, BATCH):
        sl = slice(start, start + BATCH)
        z = t * img[sl] @ txt[sl].T + b
        same = labels[sl, None] == labels[None, sl]
        k = same.sum(1) - 1
        p = torch.sigmoid(z.diagonal()) if sigmoid else z.softmax(1).diagonal()
        for kk, pp in zip(k.tolist(), p.tolist()):
            by_k.setdefault(kk, []).append(pp)

    print(f"{run}: top-1 {top1:.3f} (colour {colour_ok:.3f}, shape {shape_ok:.3f}); exp(t') {t:.2f}"
          + (f", b {b:.2f}" if sigmoid else "") + f"; prompt cosine, two shapes of one colour: {prompt_cos:.3f}")
    kind = "sigmoid(z_ii)" if sigmoid else "softmax p_ii"
    for kk in sorted(by_k):
        if len(by_k[kk]) >= 20:  # fewer rows than that say nothing
            print(f"  k={kk}: {kind} {sum(by_k[kk]) / len(by_k[kk]):.3f} over {len(by_k[kk])} rows "
                  f"(1/(k+1) = {1 / (kk + 1):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (their newest checkpoint) or checkpoint directories")
    ap.add_argument("--val", required=True, help="held-out shards with .cls labels")
    ap.add_argument("--classes", required=True, help="the demo's classes.json (classes and templates)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    classes = json.loads(Path(args.classes).read_text())
    for run in args.runs:
        probe(run, args.val, classes)


if __name__ == "__main__":
    main()
