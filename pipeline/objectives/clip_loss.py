"""The CLIP softmax contrastive loss with negatives from every rank.

Each rank scores its own images against the texts of all ranks (and its texts against all images); features
are gathered with gradient, so the gradient of a remote feature flows back to the rank that produced it.
Ranks may hold different numbers of pairs (a batch that lost bad samples): features are padded to the
largest, gathered, then trimmed. With DeepSpeed's gradient averaging, the result equals the gradient of the
mean of the per-rank losses, the same as the single-process loss when all ranks hold equal batches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from pipeline.train.distributed import rank_sizes


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenates `x` (n_r, d) of all ranks along dim 0, differentiably; returns it and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    rank = dist.get_rank()
    sizes = rank_sizes(x.shape[0])
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0])) if x.shape[0] < longest else x
    parts = dist_nn.all_gather(padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              logit_scale_max: float = 100.0) -> torch.Tensor:
    """Symmetric InfoNCE. Features are L2-normalised (n, d); `logit_scale` is exp(t'), clamped at
    `logit_scale_max` (gradient 0 beyond it, as if t' itself were clamped)."""
    scale = logit_scale.float().clamp(max=logit_scale_max)
    img, txt = image_features.float(), text_features.float()
    all_img, offset = gather_with_grad(img)
    all_txt, _ = gather_with_grad(txt)
    labels = torch.arange(img.shape[0], device=img.device) + offset
    logits_per_image = scale * img @ all_txt.T
    logits_per_text = scale * txt @ all_img.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
