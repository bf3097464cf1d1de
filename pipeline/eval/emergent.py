"""Emergent zero-shot classification and cross-modal retrieval for a bound modality (ImageBind-style).

The modality encoder was trained against images only; text never touched it. Zero-shot classification of the
modality therefore uses the frozen text tower's class-prompt embeddings (`class_prompts.zero_shot_weights`) against
the modality embeddings: that it works at all is the "emergent" alignment. Retrieval recall@k on held-out
samples, the match of each query being its own sample: modality -> image, image -> modality, text (the caption)
-> modality, modality -> text. For reference, the frozen image tower's own zero-shot accuracy on the same
samples is reported as `image_zero_shot_top1` (what the binding can at best inherit).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from pipeline.data.decoders import PairedModalityDecoder
from pipeline.data.eval_loader import iterate_decoded
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.eval.class_prompts import load_class_prompts, zero_shot_weights
from pipeline.eval.ranks import EvalRanks
from pipeline.eval.retrieval import recall_at_k


def _topk_accuracy(features: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top = (features @ class_emb.T).topk(min(5, class_emb.shape[0]), dim=1).indices.cpu()
    target = labels.unsqueeze(1)
    return (top[:, :1] == target).any(1).float().mean().item(), (top == target).any(1).float().mean().item()


@torch.no_grad()
def evaluate_emergent(model, modality: str, val: str | list[str], image_transform: Callable, modality_transform: Callable,
                      tokenizer: Callable, classes_json: str = "", batch_size: int = 256,
                      recall_at: list[int] = (1, 5, 10), max_samples: int = 0,
                      decode_options: dict | None = None) -> dict:
    """`model`: an `ImageBindModel` (encode_image / encode_text / encode_modality return normalised features).
    Returns {"modality", "samples", "bad": {reason: n}, "<m>_zero_shot_top1/top5", "image_zero_shot_top1/top5",
    "classes" (when `classes_json` is given and samples have .cls), "<m>2image_R@k", "image2<m>_R@k",
    "text2<m>_R@k", "<m>2text_R@k" (these two when every sample has a caption)}."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    shards = ShardSet(expand_shards(val, "data.val"))
    decoder = PairedModalityDecoder(image_transform, modality, modality_transform, decode_options)
    bad: Counter = Counter()
    img_f, txt_f, mod_f, labels = [], [], [], []
    captioned = True  # caption retrieval only when every sample has a caption
    count = 0
    for batch in iterate_decoded(shards, decoder, batch_size):
        bad.update(batch["bad"])
        if "images" not in batch:
            continue
        batch = decoder.to_device(batch, device, dtype)
        keep = max_samples - count if max_samples else len(batch["labels"])  # the first max_samples good samples
        captions = batch["captions"][:keep]
        img_f.append(model.encode_image(batch["images"][:keep]).float())
        captioned = captioned and None not in captions
        if captioned:
            txt_f.append(model.encode_text(tokenizer(captions).to(device)).float())
        mod_f.append(model.encode_modality(modality, batch["inputs"][:keep]).float())
        labels.extend(batch["labels"][:keep])
        count += len(captions)
        if max_samples and count >= max_samples:
            break
    if was_training:
        model.train()
    m = modality
    results: dict = {"modality": m, "samples": sum(x.shape[0] for x in img_f), "bad": dict(bad)}
    if not img_f:
        return results
    img, mod = torch.cat(img_f), torch.cat(mod_f)
    label_t = torch.tensor(labels)
    if classes_json and (label_t >= 0).all():
        prompts = load_class_prompts(classes_json)
        cls_emb = zero_shot_weights(model, tokenizer, prompts, device, EvalRanks())  # rank 0 evaluates alone
        results["classes"] = len(prompts.classes)
        results[f"{m}_zero_shot_top1"], results[f"{m}_zero_shot_top5"] = _topk_accuracy(mod, cls_emb, label_t)
        results["image_zero_shot_top1"], results["image_zero_shot_top5"] = _topk_accuracy(img, cls_emb, label_t)
    ks = list(recall_at)
    pairs = [(f"{m}2image", (mod, img)), (f"image2{m}", (img, mod))]
    if captioned:
        txt = torch.cat(txt_f)
        pairs += [(f"text2{m}", (txt, mod)), (f"{m}2text", (mod, txt))]
    for name, (queries, items) in pairs:
        for k, v in recall_at_k(queries, items, ks).items():
            results[f"{name}_R@{k}"] = v
    return results


def format_emergent(r: dict) -> str:
    m = r["modality"]
    parts = [f"{r['samples']} held-out samples with {m}"]
    if r.get("bad"):
        parts.append("skipped " + ", ".join(f"{k} {v}" for k, v in sorted(r["bad"].items())))
    if f"{m}_zero_shot_top1" in r:
        parts.append(f"emergent {m} zero-shot top-1 {100 * r[f'{m}_zero_shot_top1']:.1f}% / top-5 "
                     f"{100 * r[f'{m}_zero_shot_top5']:.1f}% over {r['classes']} classes (chance "
                     f"{100 / r['classes']:.1f}%; frozen image tower {100 * r['image_zero_shot_top1']:.1f}%)")
    parts.append(" ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if "_R@" in k))
    return "; ".join(parts)
