"""DeepSpeed engine setup: the DeepSpeed config from our typed config, AdamW parameter groups with
weight-decay exclusions, and the warmup + cosine schedule."""
from __future__ import annotations

import math

import torch

from pipeline.config import RunConfig


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    t = cfg.train
    precision = resolve_precision(t.precision)
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: works on CPU and GPU alike
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if t.grad_clip > 0:
        ds["gradient_clipping"] = t.grad_clip
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norms, biases, gains and the temperature are not decayed (as in CLIP / open_clip_train)."""
    return param.ndim < 2 or "ln_" in name or "norm" in name or name.endswith(".bias") or "logit_" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
              milestones: list[int] = (), gamma: float = 0.1) -> float:
    """Linear warmup to 1, then cosine (or linear) down to min_ratio at `total`, or multistep decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestones)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, groups: list[dict] | None = None):
    """DeepSpeed engine with AdamW over `groups` (default: `param_groups`; a group may carry its own "lr", which
    the schedule then scales) and warmup + cosine."""
    import deepspeed

    t = cfg.train
    optimizer = torch.optim.AdamW(groups or param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                  fused=torch.cuda.is_available())
    min_ratio = t.min_lr / t.lr if t.lr else 0.0
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, t.warmup_steps, t.steps, min_ratio, t.lr_schedule, t.lr_milestones,
                                     t.lr_gamma)),
    )
    return engine, scheduler
