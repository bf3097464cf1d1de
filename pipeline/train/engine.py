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


def plain_step(cfg: RunConfig, world_size: int, checkpoint_zero_stage: int = 0) -> bool:
    """Whether the step is ours rather than a ZeRO optimizer's: when one rank holds everything (nothing to
    partition) or ZeRO is off. DeepSpeed then runs at stage 0 and hands the step to our fused AdamW; bf16 is
    autocast over fp32 weights (open_clip_train's amp_bf16); clipping and the non-finite guard are `PlainStep`'s,
    on the device, with no host synchronisation. fp16 keeps DeepSpeed's loss-scaling optimizer.

    A run that resumes a checkpoint written with ZeRO (`checkpoint_zero_stage` > 0) keeps ZeRO: DeepSpeed loads
    ZeRO's partitioned (or universal) optimizer state only into a ZeRO optimizer."""
    if checkpoint_zero_stage > 0 or resolve_precision(cfg.train.precision) == "fp16":
        return False
    return world_size == 1 or cfg.train.zero_stage == 0


def zero_stage(cfg: RunConfig, world_size: int, checkpoint_zero_stage: int = 0) -> int:
    """The ZeRO stage DeepSpeed runs at: 0 on the plain step, else the config's (the checkpoint's if the config
    says 0 but the checkpoint was written with ZeRO)."""
    if plain_step(cfg, world_size, checkpoint_zero_stage):
        return 0
    return cfg.train.zero_stage or checkpoint_zero_stage


def deepspeed_config(cfg: RunConfig, world_size: int, checkpoint_zero_stage: int = 0) -> dict:
    t = cfg.train
    precision = resolve_precision(t.precision)
    plain = plain_step(cfg, world_size, checkpoint_zero_stage)
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": zero_stage(cfg, world_size, checkpoint_zero_stage)},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: works on CPU and GPU alike
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # on by default, and it synchronises the device twice per step (wall_clock_breakdown does not turn it off)
        "timers": {"throughput": {"enabled": False}},
    }
    if plain:  # clipping is PlainStep's: DeepSpeed's own (default 1.0!) reads the norm back with .item()
        ds["gradient_clipping"] = 0.0
        if precision == "bf16":
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        return ds
    ds["gradient_clipping"] = t.grad_clip  # always: DeepSpeed clips at 1.0 when the key is absent
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


class PlainStep:
    """Gradient clipping and a non-finite guard for the plain step, entirely on the device.

    The global norm is one foreach reduction; clipping multiplies by min(1, max_norm / norm) without reading it
    back. A non-finite norm skips the whole update: fused AdamW reads `found_inf` on the device (the mechanism
    torch's GradScaler uses) and leaves weights, moments and step counts as they were. The step's norm is kept
    for the log (read only at log steps)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.max_norm = max_norm
        self.grad_norm: torch.Tensor | None = None

    def before_step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_norm, norm, foreach=True)
        self.optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.grad_norm = norm


def compute_dtype(engine) -> torch.dtype:
    """The dtype activations are computed in: the autocast dtype, else the weights' (model inputs are cast to
    it once, on the device)."""
    if engine.torch_autocast_enabled():
        return engine.torch_autocast_dtype()
    return next(engine.module.parameters()).dtype


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


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, groups: list[dict] | None = None,
                 checkpoint_zero_stage: int = 0):
    """DeepSpeed engine with fused AdamW over `groups` (default: `param_groups`; a group may carry its own "lr",
    which the schedule then scales) and warmup + cosine. Returns (engine, scheduler, plain): `plain` is the
    `PlainStep` to call before `engine.step()`, or None when a ZeRO optimizer does the step.
    `checkpoint_zero_stage`: the ZeRO stage of the checkpoint the run will resume (see `plain_step`)."""
    import deepspeed

    t = cfg.train
    # fused: one kernel for all tensors (CPU and GPU), and it can skip a step on the device (PlainStep)
    optimizer = torch.optim.AdamW(groups or param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                  eps=t.eps, fused=True)
    min_ratio = t.min_lr / t.lr if t.lr else 0.0
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, checkpoint_zero_stage),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, t.warmup_steps, t.steps, min_ratio, t.lr_schedule, t.lr_milestones,
                                     t.lr_gamma)),
    )
    plain = None
    if plain_step(cfg, world_size, checkpoint_zero_stage):
        plain = PlainStep(optimizer, t.grad_clip)
        if world_size == 1:  # DeepSpeed would still flatten every gradient into buckets for a 1-rank all-reduce
            engine.enable_backward_allreduce = False
    if t.compile:
        engine.compile()  # DeepSpeed's hook: torch.compile of the module's forward, inside the engine
    return engine, scheduler, plain
