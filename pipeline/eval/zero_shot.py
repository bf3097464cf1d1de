"""Zero-shot classification from class prompts and image<->text retrieval recall@k on held-out shards."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data.loader import ShardSet, expand_shards, iterate_eval_samples


@torch.no_grad()
def class_embeddings(model, tokenizer, classes: list[str], templates: list[str], device) -> torch.Tensor:
    """(classes, d): the normalised mean of each class's normalised prompt embeddings."""
    out = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=0))
    return torch.stack(out)


def recall_at_k(similarity: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """similarity (queries, items) with the match of query i at item i."""
    target = similarity.diagonal().unsqueeze(1)
    rank = (similarity > target).sum(1)  # items scored strictly above the match
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def evaluate(model, transform, tokenizer, val: str | list[str], classes_json: str = "", batch_size: int = 256,
             recall_at: list[int] = (1, 5, 10)) -> dict:
    """Returns {"samples", "zero_shot_top1", "zero_shot_top5", "classes", "i2t_R@k", "t2i_R@k"}."""
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    shards = ShardSet(expand_shards(val, "data.val"))
    classes = json.loads(Path(classes_json).read_text()) if classes_json else None
    img_feats, txt_feats, labels = [], [], []
    for images, captions, lab in iterate_eval_samples(shards, transform, batch_size, with_label=classes is not None):
        img_feats.append(F.normalize(model.encode_image(images.to(device, dtype)).float(), dim=-1))
        txt_feats.append(F.normalize(model.encode_text(tokenizer(captions).to(device)).float(), dim=-1))
        labels.extend(lab)
    img, txt = torch.cat(img_feats), torch.cat(txt_feats)
    results: dict = {"samples": img.shape[0]}
    if classes is not None:
        cls_emb = class_embeddings(model, tokenizer, classes["classes"], classes["templates"], device)
        top5 = (img @ cls_emb.T).topk(min(5, len(classes["classes"])), dim=1).indices.cpu()
        target = torch.tensor(labels).unsqueeze(1)
        results.update(classes=len(classes["classes"]),
                       zero_shot_top1=(top5[:, :1] == target).any(1).float().mean().item(),
                       zero_shot_top5=(top5 == target).any(1).float().mean().item())
    sim = img @ txt.T
    for k, v in recall_at_k(sim, list(recall_at)).items():
        results[f"i2t_R@{k}"] = v
    for k, v in recall_at_k(sim.T, list(recall_at)).items():
        results[f"t2i_R@{k}"] = v
    return results


def format_results(r: dict) -> str:
    parts = [f"{r['samples']} held-out samples"]
    if "zero_shot_top1" in r:
        parts.append(f"zero-shot top-1 {100 * r['zero_shot_top1']:.1f}% / top-5 {100 * r['zero_shot_top5']:.1f}% "
                     f"over {r['classes']} classes (chance {100 / r['classes']:.1f}%)")
    parts.append(" ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if "R@" in k))
    return "; ".join(parts)
