"""The ImageBind loss when each sample carries only some modalities (one paired dataset per modality, mixed).

For every configured modality m, the pairs (image, m) of all ranks form one contrastive batch: N_m = the number
of samples carrying m over all ranks, which may be 0 on some ranks (a rank's micro-batch drew no audio sample)
or on all of them (the global batch drew none). The loss of m is the symmetric InfoNCE averaged over those N_m
pairs, every pair scored against all N_m of the other side; the run's loss is the mean over the modalities
present in the global batch.

Every rank runs the same collectives in the same order, whatever its own counts: one all-reduce of the
(ranks x modalities) count table on the host group, then, for each modality with N_m > 0, one differentiable
all-gather of the image and of the modality features (padded to the longest rank, trimmed after). A modality
absent from the whole global batch runs no collective on any rank. A rank holding 0 pairs of m still takes part
in the gathers (their backward is a collective too) and contributes a loss of exactly 0 with a gradient path.

Each rank's loss is its share: the sum of its rows' losses x world / N_m. DeepSpeed averages the gradients over
the ranks (divides by the world size), so the update is the gradient of the global mean, the same as one
process computing the loss on the whole global batch; the ranks' losses averaged are that global loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from pipeline.train.distributed import host_group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_counts(counts: list[int]) -> list[list[int]]:
    """This rank's per-modality counts -> every rank's ([rank][modality]), agreed over the host group (one
    all-reduce, whatever the counts)."""
    if not _distributed():
        return [list(counts)]
    table = torch.zeros(dist.get_world_size(), len(counts), dtype=torch.int64)
    table[dist.get_rank()] = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(table, group=host_group())
    return table.tolist()


def gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows of `x` ((sizes[rank], d) here) concatenated in rank order, differentiably. `sizes`
    must be the same list on every rank, with a positive sum."""
    if len(sizes) == 1:
        return x
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0])) if x.shape[0] < longest else x
    parts = dist_nn.all_gather(padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def binding_loss_share(image_features: torch.Tensor, modality_features: torch.Tensor, logit_scale: torch.Tensor,
                       sizes: list[int], logit_scale_max: float = 100.0) -> torch.Tensor:
    """This rank's share of one modality's symmetric InfoNCE over the N = sum(sizes) pairs of all ranks
    (see the module docstring). Features: this rank's (sizes[rank], d), L2-normalised; `sizes`: every rank's
    pair count (`rank_counts`), N > 0. With one rank: the mean over its pairs."""
    total = sum(sizes)
    if total <= 0:
        raise ValueError("binding_loss_share needs at least one pair over all ranks")
    world = len(sizes)
    rank = dist.get_rank() if world > 1 else 0
    scale = logit_scale.float().clamp(max=logit_scale_max)
    img, mod = image_features.float(), modality_features.float()
    all_img, all_mod = gather_rows(img, sizes), gather_rows(mod, sizes)
    labels = torch.arange(img.shape[0], device=img.device) + sum(sizes[:rank])
    per_image = F.cross_entropy(scale * img @ all_mod.T, labels, reduction="sum")
    per_modality = F.cross_entropy(scale * mod @ all_img.T, labels, reduction="sum")
    return (per_image + per_modality) * (world / (2 * total))
