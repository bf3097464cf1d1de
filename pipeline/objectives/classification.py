"""Supervised classification: cross-entropy with label smoothing, batch mixup / cutmix, top-k accuracy.

Mixup / CutMix follow the DeiT / Swin recipe (timm's `Mixup` in 'batch' mode: one lambda per batch, each image
mixed with its mirror in the batch, label smoothing folded into the soft targets, CutMix's lambda corrected to
the pasted box's true area), with one difference: the randomness comes from an explicit numpy Generator, so a
batch's mix is a pure function of (seed, rank, batch index) and a resumed run mixes exactly as an
uninterrupted one would (timm draws from numpy's global state).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.0  # Beta(a, a) for mixup; 0 disables mixup
    cutmix_alpha: float = 0.0  # Beta(a, a) for cutmix; 0 disables cutmix
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # with both enabled: probability of cutmix rather than mixup
    label_smoothing: float = 0.0

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def batch_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator for one batch's mix, e.g. batch_rng(seed, epoch, offset, rank) with the loader's position of
    the batch: a function of where the batch is in the stream, not of how many batches this process ran."""
    return np.random.default_rng([0x6d6978, seed, *key])


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B, C) float32 targets: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere (the
    distribution F.cross_entropy(label_smoothing=smoothing) uses)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box with area ~ (1 - lam) of the image, centred uniformly, clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip(cy - ch // 2, 0, height), np.clip(cy + ch // 2, 0, height)
    x0, x1 = np.clip(cx - cw // 2, 0, width), np.clip(cx + cw // 2, 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: MixConfig,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Returns (mixed images (a new tensor), soft targets (B, C) float32 summing to 1, info {"mode", "lam"}).
    Image i is mixed with image B-1-i. With mixing disabled or skipped the targets are the smoothed one-hots."""
    if images.shape[0] % 2:
        raise ValueError(f"mixup / cutmix need an even batch, got {images.shape[0]}")
    targets = smooth_one_hot(labels, num_classes, cfg.label_smoothing)
    if not cfg.enabled or rng.random() >= cfg.prob:
        return images, targets, {"mode": "none", "lam": 1.0}
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(h, w, lam, rng)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the image that is still its own
        mode = "cutmix"
    else:
        mixed = images * lam + partner * (1.0 - lam)
        mode = "mixup"
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed, targets, {"mode": mode, "lam": lam}


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy in float32. `targets`: class ids (B,) -> smoothed by `label_smoothing`; or soft targets
    (B, C) from `mix_batch`, which already hold their smoothing (label_smoothing is then ignored)."""
    logits = logits.float()
    if targets.ndim == 2:
        return torch.sum(-targets.float() * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets.long(), label_smoothing=label_smoothing)


@torch.no_grad()
def accuracy_topk(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k highest logits}; k is capped at the number of classes.
    Soft targets (B, C) count their argmax as the label."""
    if labels.ndim == 2:
        labels = labels.argmax(dim=1)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1).to(top.device)
    return {k: hit[:, :min(k, kmax)].any(dim=1).float().mean().item() for k in ks}
