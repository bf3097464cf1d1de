"""Zero-shot classification from class prompts, and image<->text retrieval recall@k, on held-out shards.

Spread over the ranks of a run (pipeline/eval/ranks.py): each rank decodes (in loader workers) and encodes its
contiguous slice of the samples, and its slice of the classes' prompts; classification hits are counted where
the images are and summed; for retrieval the captioned samples' features are gathered and each rank ranks its
own queries against all items, in blocks (pipeline/eval/retrieval.py). Every rank returns the same results.

Zero-shot uses the samples with a `.cls` label, retrieval those with a caption: a label-only shard
(ImageNet-style) gives zero-shot accuracy alone, a caption-only one retrieval alone.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from pipeline.data.decoders import EvalSampleDecoder
from pipeline.data.eval_loader import iterate_decoded
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.eval.class_prompts import load_class_prompts, zero_shot_weights
from pipeline.eval.ranks import EvalRanks
from pipeline.eval.retrieval import BLOCK_ELEMS, recall_hits


def _top5_hits(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[int, int]:
    """Samples whose label is the top-1 / among the top-5 classes; logits in blocks of rows (21k classes x 50k
    images would be 4 GB at once)."""
    hits1 = hits5 = 0
    labels = labels.to(features.device).view(-1, 1)
    rows = max(1, BLOCK_ELEMS // max(1, weights.shape[0]))
    for start in range(0, features.shape[0], rows):
        top = (features[start:start + rows] @ weights.T).topk(min(5, weights.shape[0]), dim=1).indices
        hit = top == labels[start:start + rows]
        hits1, hits5 = hits1 + int(hit[:, 0].sum()), hits5 + int(hit.any(1).sum())
    return hits1, hits5


@torch.no_grad()
def evaluate(model, transform, tokenizer, val: str | list[str], classes: str = "", batch_size: int = 256,
             recall_at: list[int] = (1, 5, 10), workers: int = 0, ranks: EvalRanks | None = None,
             classes_key: str = "data.classes") -> dict:
    """Returns {"samples", "skipped_samples", and with `classes` ("imagenet" or a JSON file, see
    class_prompts.py) and labelled samples: "classes", "zero_shot_samples", "zero_shot_top1", "zero_shot_top5";
    with captioned samples: "retrieval_samples", "i2t_R@k", "t2i_R@k"}. Labels outside the classes count as
    misses (and as "labels_out_of_range")."""
    ranks = ranks or EvalRanks.current()
    prompts = load_class_prompts(classes, classes_key) if classes else None
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    shards = ShardSet(expand_shards(val, "data.val"))
    decoder = EvalSampleDecoder(transform, tokenizer)
    img_feats, txt_feats, labels, captioned = [], [], [], []
    bad = Counter()
    for batch in iterate_decoded(shards, decoder, batch_size, ranks.slice(shards.total), workers,
                                 pin_memory=device.type == "cuda"):
        bad.update(batch["bad"])
        if "images" not in batch:
            continue
        batch = decoder.to_device(batch, device, dtype)
        img_feats.append(F.normalize(model.encode_image(batch["images"]).float(), dim=-1))
        labels.append(batch["labels"])
        captioned.append(batch["has_caption"])
        if batch["texts"] is not None:
            txt_feats.append(F.normalize(model.encode_text(batch["texts"]).float(), dim=-1))
    img = torch.cat(img_feats) if img_feats else torch.zeros(0, 0, device=device)
    label = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    has_caption = torch.cat(captioned) if captioned else torch.zeros(0, dtype=torch.bool)
    txt = torch.cat(txt_feats) if txt_feats else torch.zeros(0, 0, device=device)

    n_classes = len(prompts.classes) if prompts else 0
    labelled = label >= 0
    hits1 = hits5 = 0
    if prompts is not None and ranks.sum([int(labelled.sum())])[0]:
        weights = zero_shot_weights(model, tokenizer, prompts, device, ranks)
        if labelled.any():
            hits1, hits5 = _top5_hits(img[labelled.to(img.device)], label[labelled], weights)
    out_of_range = int((labelled & (label >= n_classes)).sum()) if prompts else 0

    ks = list(recall_at)
    n_captioned = int(has_caption.sum())
    sizes = ranks.sum([n_captioned if r == ranks.rank else 0 for r in range(ranks.world_size)])
    i2t = t2i = {k: 0 for k in ks}
    if sum(sizes):  # every caption's item is its own image: rank r's pairs sit at rows sum(sizes[:r]) + i
        img_captioned = img[has_caption.to(img.device)] if n_captioned else img[:0]
        all_img, all_txt = ranks.gather_rows(img_captioned), ranks.gather_rows(txt)
        match = torch.arange(n_captioned) + sum(sizes[:ranks.rank])
        i2t = recall_hits(img_captioned, all_txt, match, ks)
        t2i = recall_hits(txt, all_img, match, ks)

    totals = ranks.sum([img.shape[0], int(labelled.sum()), hits1, hits5, out_of_range,
                        *(i2t[k] for k in ks), *(t2i[k] for k in ks)])
    n, n_labelled, hits1, hits5, out_of_range = totals[:5]
    i2t_total, t2i_total = totals[5:5 + len(ks)], totals[5 + len(ks):]
    bad = ranks.sum_counter(bad)
    results: dict = {"samples": n, "skipped_samples": sum(bad.values())}
    if prompts is not None and n_labelled:
        results.update(classes=n_classes, zero_shot_samples=n_labelled, zero_shot_top1=hits1 / n_labelled,
                       zero_shot_top5=hits5 / n_labelled)
        if out_of_range:
            results["labels_out_of_range"] = out_of_range
    n_pairs = sum(sizes)
    if n_pairs:
        results["retrieval_samples"] = n_pairs
        results.update({f"i2t_R@{k}": v / n_pairs for k, v in zip(ks, i2t_total)})
        results.update({f"t2i_R@{k}": v / n_pairs for k, v in zip(ks, t2i_total)})
    return results


def format_results(r: dict) -> str:
    parts = [f"{r['samples']} held-out samples"]
    if r.get("skipped_samples"):
        parts.append(f"{r['skipped_samples']} skipped (undecodable)")
    if "zero_shot_top1" in r:
        parts.append(f"zero-shot top-1 {100 * r['zero_shot_top1']:.1f}% / top-5 {100 * r['zero_shot_top5']:.1f}% "
                     f"over {r['classes']} classes (chance {100 / r['classes']:.1f}%)")
        if r.get("labels_out_of_range"):
            parts.append(f"{r['labels_out_of_range']} labels outside the {r['classes']} classes (counted as misses)")
    if "retrieval_samples" in r:
        parts.append(" ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if "R@" in k))
    return "; ".join(parts)
