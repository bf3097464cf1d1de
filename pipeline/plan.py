"""`python -m pipeline plan`: will a config fit, and how fast will it run, on N GPUs? Computed from the model's
shapes (built on the meta device: nothing is allocated, nothing downloads), before any GPU is asked for.

Per rank, with Psi parameters, d = data-parallel ranks (all GPUs), p bytes per parameter / activation
(2 for bf16/fp16, 4 for fp32), following the ZeRO paper (Rajbhandari et al. 2020) with AdamW:

    params      p * Psi                  (/ d at ZeRO-3)
    gradients   p * Psi                  (/ d at ZeRO-2, 3)
    optimizer   12 * Psi with bf16/fp16  (fp32 master copy + exp_avg + exp_avg_sq; / d at ZeRO-1, 2, 3)
                 8 * Psi with fp32       (the parameters are the master copy)

except on one GPU or at stage 0, where the trainer steps fp32 weights itself (autocast for bf16): params
4 * Psi (+ 2 * Psi of bf16 autocast copies), gradients 4 * Psi, optimizer 8 * Psi, whatever the stage.
    overhead    a fixed --overhead-gb (CUDA context, NCCL and ZeRO communication buffers, allocator slack)

Activations, per sample, for each transformer block of width h, heads a, MLP hidden f, s tokens (Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", without dropout, which CLIP
towers do not use): the tensors autograd keeps are the inputs of both LayerNorms, of the QKV projection, Q, K,
V, the attention output (input of the out projection), the input of fc1 (width h) and of the GELU and fc2
(width f):

    block(s, h, a, f) = p * s * (8h + 2f) + attention
    attention         = 4 * a * s          fused attention (SDPA flash / memory-efficient: fp32 log-sum-exp)
                      = p * a * s^2        unfused (--unfused-attention: the softmax probabilities are kept)

(for f = 4h and p = 2 that is s*h*(32 + 2as/h), Korthikanti's 34sh + 5as^2 minus the dropout masks and
outputs). With activation checkpointing (open_clip's set_grad_checkpointing: one checkpoint per block) a block
keeps only its input, p * s * h, and one block at a time is recomputed in the backward pass:

    checkpointed = sum over blocks of p * s * h  +  max over blocks of block(s, h, a, f)

summed over both towers. Per rank and micro-step, with micro-batch b on W ranks, add the batch itself
(b * (3 * H * W_img * p + 8 * context)) and the loss over the rank's R = G / W pairs of the step (R = b without
accumulation; with train.grad_accum the loss of every micro-step spans the whole global batch G, see
pipeline/train/full_batch_accumulation.py): the CLIP loss holds R x G logits, their softmax and gradient in fp32
(12 * R * G bytes) plus the gathered features (2 * G * D * p); the sigmoid loss on a ring holds one R x R tile
(12 * R^2). So the loss term stays that of the config's global batch whatever the micro-batch; "max mb" is the
largest micro-batch that fits beside it. Embeddings, final norms and pooling heads are left out (each is one
activation of one layer).

FLOPs per sample are the trainer's own (pipeline.models.clip.clip_step_flops: each tower's forward counted by
torch's FlopCounterMode on the meta device, x3 for forward and backward, x1 for a tower locked by
model.lock_image / lock_text; pipeline/train/flops.py); a step of G samples on W GPUs takes G * FLOPs / (W * MFU *
peak), the peak by default the H100's dense bf16 figure (pipeline/train/device_peak.py). MFU counts model FLOPs,
so the forward recomputed under activation checkpointing is part of what a given MFU has to absorb. With
train.grad_accum > 1 every sample is encoded once more without a graph (the cached features that keep the global
batch's negatives): a third of a forward + backward more, counted in the step time.

Negatives: every pair is scored against all G - 1 other pairs of the global batch (all ranks, all micro-steps).

Recommendation (`recommend`): of the (ZeRO stage, checkpointing, micro-batch) settings that fit, the one with the
least computation per step (x 4/3 for checkpointing's second forward, x 4/3 for accumulation's cached features),
unless its micro-step holds fewer than BUSY_TOKENS image tokens; ties go to the lower stage, then the larger
micro-batch. Stages below the config's are not offered; ZeRO-3 only when nothing fits below it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from pipeline.config import RunConfig, resolve_batch
from pipeline.errors import UserError
from pipeline.train.device_peak import PLAN_PEAK_TFLOPS

GiB = 1024**3
ACCUM_FORWARD_FACTOR = 4 / 3  # forward + backward (3 forwards' worth) + the forward without graph
RECOMPUTE_FACTOR = 4 / 3  # activation checkpointing: forward + backward + every block's forward once more
# A micro-step of fewer image tokens than this per GPU runs the blocks' GEMMs (M = tokens) at a small M, where
# fixed per-kernel costs take a visible share of the step: plan then prefers activation checkpointing at a larger
# micro-batch. A rule of thumb for H100-class GPUs, not a measured threshold.
BUSY_TOKENS = 16_384


class PlanError(UserError, ValueError):
    """Arguments the plan cannot use, or a model it cannot measure; the message is one line."""


@dataclass
class Block:
    tokens: int
    width: int
    heads: int
    mlp_hidden: int


@dataclass
class Tower:
    name: str  # image | text
    params: int
    tokens: int
    blocks: list[Block]


@dataclass
class StageEstimate:
    """Per-rank memory at one ZeRO stage, in bytes, and the largest micro-batch that fits."""
    stage: int
    params: float
    grads: float
    optimizer: float
    states: float  # params + grads + optimizer
    total_ckpt: float  # states + overhead + activations with activation checkpointing
    total_full: float  # ... without
    fits_ckpt: bool
    fits_full: bool
    max_micro_batch_ckpt: int  # 0: not even one sample
    max_micro_batch_full: int


@dataclass
class Recommendation:
    """The setting plan expects to run fastest among those that fit (`recommend`)."""
    zero_stage: int
    activation_checkpointing: bool
    micro_batch: int  # per GPU and micro-step
    grad_accum: int
    work: float  # what the GPU computes, in units of the model's FLOPs: 4/3 per recomputed forward
    busy: bool  # the micro-step holds at least BUSY_TOKENS image tokens (or the whole per-GPU batch)

    def overrides(self) -> list[str]:
        return [f"train.zero_stage={self.zero_stage}",
                f"model.activation_checkpointing={str(self.activation_checkpointing).lower()}",
                f"train.grad_accum={self.grad_accum}"]


@dataclass
class Plan:
    model: str
    params: int
    params_image: int
    params_text: int  # and everything outside the image tower (logit scale, bias)
    gpus: int
    gpu_mem_bytes: float
    precision: str  # bf16 | fp16 | fp32 (auto plans bf16: the plan is for GPUs)
    bytes_per_value: int
    loss: str
    global_batch: int
    micro_batch: int  # per rank and micro-step
    grad_accum: int
    config_zero_stage: int
    config_activation_checkpointing: bool
    fused_attention: bool
    overhead_bytes: float
    act_per_sample_ckpt: float  # bytes, both towers
    act_per_sample_full: float
    act_batch_ckpt: float  # bytes per rank at micro_batch (with batch and loss terms)
    act_batch_full: float
    flops_per_sample: float  # forward + backward
    mfu: float
    peak_tflops: float
    negatives: int  # per pair: the other pairs of the global batch (all ranks and micro-steps)
    step_time_s: float
    samples_per_s: float
    train_steps: int
    train_time_s: float
    towers: list[Tower] = field(default_factory=list)
    stages: list[StageEstimate] = field(default_factory=list)
    recommendation: Recommendation | None = None  # None: nothing fits
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- the model on the meta device -------------------------------------------------------------------------

def meta_model(name: str, loss: str = "clip", patch_dropout: float = 0.0) -> torch.nn.Module:
    """open_clip's model for `name` with every tensor on the meta device (shapes only), as create_clip builds
    it (our SwinV2 trunk at the tower's image size; FLIP's patch dropout)."""
    from pipeline.models.clip import build_open_clip, swap_swinv2_trunk

    model = build_open_clip(name, loss, patch_dropout, device="meta")
    with torch.device("meta"):
        swap_swinv2_trunk(model)
    return model


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _block(module: torch.nn.Module, tokens: int) -> Block | None:
    """(width, heads, MLP hidden) of an open_clip ResidualAttentionBlock or a timm ViT block; None otherwise."""
    attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
    if attn is None or mlp is None:
        return None
    if isinstance(attn, torch.nn.MultiheadAttention):
        width, heads = attn.embed_dim, attn.num_heads
    else:
        heads = getattr(attn, "num_heads", None)
        lin = _linears(attn)
        if heads is None or not lin:
            return None
        width = lin[0].in_features
    fc = _linears(mlp)
    if not fc:
        return None
    res = getattr(module, "input_resolution", None)  # hierarchical (Swin) blocks run at their stage's size
    if res is not None:
        tokens = int(res[0]) * int(res[1])
    return Block(tokens, int(width), int(heads), int(fc[0].out_features))


def _blocks(module: torch.nn.Module, tokens: int) -> list[Block]:
    out = []
    for m in module.modules():
        b = _block(m, tokens)
        if b is not None:
            out.append(b)
    return out


def _vision_tokens(visual: torch.nn.Module) -> int:
    pos = getattr(visual, "positional_embedding", None)
    if pos is not None:  # open_clip VisionTransformer: grid tokens + class token
        return int(pos.shape[0])
    trunk = getattr(visual, "trunk", None)
    pe = getattr(trunk, "patch_embed", None)
    if pe is not None and hasattr(pe, "num_patches"):
        return int(pe.num_patches) + int(getattr(trunk, "num_prefix_tokens", 0))
    raise PlanError(f"cannot tell the token count of image tower {type(visual).__name__}")


def _text_module(model: torch.nn.Module) -> torch.nn.Module:
    return model.text if hasattr(model, "text") else model.transformer


def _context_length(model: torch.nn.Module) -> int:
    for owner in (model, getattr(model, "text", None)):
        if owner is not None and getattr(owner, "context_length", None):
            return int(owner.context_length)
    raise PlanError("cannot tell the text context length")


def towers(model: torch.nn.Module) -> list[Tower]:
    visual = model.visual
    v_tokens = _vision_tokens(visual)
    t_tokens = _context_length(model)
    image_params = sum(p.numel() for p in visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    return [Tower("image", image_params, v_tokens, _blocks(visual, v_tokens)),
            Tower("text", total - image_params, t_tokens, _blocks(_text_module(model), t_tokens))]


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def flops_per_sample(model: torch.nn.Module) -> int:
    """The trainer's FLOPs per pair (pipeline.models.clip.clip_step_flops: each tower counted on the meta
    device, forward + backward)."""
    from pipeline.models.clip import clip_step_flops

    return clip_step_flops(model)


# ---- memory -----------------------------------------------------------------------------------------------

def block_bytes(b: Block, p: int, fused: bool) -> float:
    attention = 4 * b.heads * b.tokens if fused else p * b.heads * b.tokens * b.tokens
    return p * b.tokens * (8 * b.width + 2 * b.mlp_hidden) + attention


def activation_bytes_per_sample(tws: list[Tower], p: int, fused: bool) -> tuple[float, float]:
    """(with activation checkpointing, without), bytes per sample, both towers."""
    blocks = [b for t in tws for b in t.blocks]
    if not blocks:
        return 0.0, 0.0
    full = sum(block_bytes(b, p, fused) for b in blocks)
    ckpt = sum(p * b.tokens * b.width for b in blocks) + max(block_bytes(b, p, fused) for b in blocks)
    return ckpt, full


def model_state_bytes(n: int, p: int, stage: int, d: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per rank for n parameters at a ZeRO stage over d ranks.

    One rank, or stage 0, is the trainer's plain step (pipeline/train/engine.py): fp32 weights, fp32 gradients
    and Adam's two moments, and in bf16 the autocast copies of the weights (2 bytes each, kept for the backward
    pass) counted with the params. ZeRO 1-3 on several ranks is DeepSpeed's mixed precision: p-byte weights and
    gradients plus an fp32 master copy in the optimizer state."""
    if d == 1 or stage == 0:
        return (4 + (2 if p == 2 else 0)) * n, 4 * n, 8 * n
    params, grads, optim = p * n, p * n, (12 if p == 2 else 8) * n
    if stage >= 1:
        optim /= d
    if stage >= 2:
        grads /= d
    if stage >= 3:
        params /= d
    return params, grads, optim


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor) and proj.ndim == 2:
        return int(proj.shape[1])
    for attr in ("embed_dim", "output_dim"):
        for owner in (model, model.visual, getattr(model, "text", None)):
            if owner is not None and isinstance(getattr(owner, attr, None), int):
                return int(getattr(owner, attr))
    return 1024


# ---- the plan ---------------------------------------------------------------------------------------------

def plan_run(cfg: RunConfig, gpus: int, gpu_mem_gb: float = 80.0, mfu: float = 0.4,
             peak_tflops: float = PLAN_PEAK_TFLOPS, overhead_gb: float = 4.0, fused_attention: bool = True,
             model: torch.nn.Module | None = None) -> Plan:
    """Memory per rank at ZeRO 0-3 with and without activation checkpointing, and the step time at `mfu`, for
    `cfg` on `gpus` data-parallel ranks with `gpu_mem_gb` GiB each. Raises ConfigError when the batch does not
    divide across the ranks, PlanError on bad arguments."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, not {gpus}")
    if gpu_mem_gb <= 0 or peak_tflops <= 0 or overhead_gb < 0:
        raise PlanError("--gpu-mem-gb and --peak-tflops must be > 0, --overhead-gb >= 0")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], not {mfu}")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))  # resolve_batch writes into train
    resolve_batch(cfg, gpus)
    t = cfg.train
    precision = "bf16" if t.precision == "auto" else t.precision
    p = 4 if precision == "fp32" else 2
    if model is None:  # the trainer's model: its patch dropout and locked towers change its FLOPs per sample
        from pipeline.tasks.contrastive import lock_towers

        model = meta_model(cfg.model.name, cfg.loss.name, cfg.model.patch_dropout)
        lock_towers(model, cfg)
    tws = towers(model)
    n = sum(x.numel() for x in model.parameters())
    ckpt_ps, full_ps = activation_bytes_per_sample(tws, p, fused_attention)
    size, ctx, dim = image_size(model), _context_length(model), _embed_dim(model)

    rows = t.global_batch_size // gpus  # the loss of a micro-step scores the rank's pairs of the whole step

    def batch_extra(b: int) -> float:
        inputs = b * (3 * size * size * p + 8 * ctx)
        if cfg.loss.name == "siglip":
            loss = 12.0 * rows * rows
        else:
            loss = 12.0 * rows * rows * gpus + 2.0 * rows * gpus * dim * p
        return inputs + loss

    def activations(b: int, ckpt: bool) -> float:
        return b * (ckpt_ps if ckpt else full_ps) + batch_extra(b)

    mem, overhead = gpu_mem_gb * GiB, overhead_gb * GiB

    def max_batch(states: float, ckpt: bool) -> int:
        if states + overhead + activations(1, ckpt) > mem:
            return 0
        lo, hi = 1, 2
        while states + overhead + activations(hi, ckpt) <= mem and hi < 2**31:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if states + overhead + activations(mid, ckpt) <= mem else (lo, mid)
        return lo

    b = t.batch_size
    stages = []
    for stage in range(4):
        prm, grd, opt = model_state_bytes(n, p, stage, gpus)
        states = prm + grd + opt
        tc, tf = states + overhead + activations(b, True), states + overhead + activations(b, False)
        stages.append(StageEstimate(stage, prm, grd, opt, states, tc, tf, tc <= mem, tf <= mem,
                                    max_batch(states, True), max_batch(states, False)))

    flops = flops_per_sample(model)
    recompute = ACCUM_FORWARD_FACTOR if t.grad_accum > 1 else 1.0  # the forward of the cached features
    step_time = t.global_batch_size * flops * recompute / (gpus * mfu * peak_tflops * 1e12)
    plan = Plan(
        model=cfg.model.name, params=n, params_image=tws[0].params, params_text=tws[1].params, gpus=gpus,
        gpu_mem_bytes=mem, precision=precision, bytes_per_value=p, loss=cfg.loss.name,
        global_batch=t.global_batch_size, micro_batch=b, grad_accum=t.grad_accum,
        config_zero_stage=int(t.zero_stage), config_activation_checkpointing=cfg.model.activation_checkpointing,
        fused_attention=fused_attention, overhead_bytes=overhead, act_per_sample_ckpt=ckpt_ps,
        act_per_sample_full=full_ps, act_batch_ckpt=activations(b, True), act_batch_full=activations(b, False),
        flops_per_sample=flops, mfu=mfu, peak_tflops=peak_tflops, negatives=t.global_batch_size - 1,
        step_time_s=step_time,
        samples_per_s=t.global_batch_size / step_time, train_steps=t.steps, train_time_s=t.steps * step_time,
        towers=tws, stages=stages)
    plan.recommendation = recommend(plan)
    plan.warnings = _warnings(plan)
    return plan


def _accum_for(plan: Plan, max_micro: int, start: int | None = None) -> int | None:
    """The smallest train.grad_accum >= `start` (the config's by default) whose micro-batch divides evenly and
    is <= max_micro."""
    per_rank = plan.global_batch // plan.gpus
    for k in range(plan.grad_accum if start is None else start, per_rank + 1):
        if plan.global_batch % (plan.gpus * k) == 0 and plan.global_batch // (plan.gpus * k) <= max_micro:
            return k
    return None


def recommend(plan: Plan) -> Recommendation | None:
    """The fastest setting that fits, by what the GPU computes: activation checkpointing recomputes every
    block's forward (x 4/3) and train.grad_accum > 1 encodes each sample once more for the cached features
    (x 4/3), so checkpointing pays only where it saves the accumulation or where the micro-batch without it
    would be too small to keep the GPU busy. Ties go to the lower ZeRO stage (less communication), then to the
    larger micro-batch. Stages below the config's are not considered (its choice may be about communication or
    headroom plan does not see), ZeRO-3 only when nothing fits below it: it gathers the parameters for every
    forward and backward."""
    per_gpu = plan.global_batch // plan.gpus
    tokens = plan.towers[0].tokens if plan.towers else 1
    first = plan.stages[plan.config_zero_stage:min(3, len(plan.stages))] or plan.stages[plan.config_zero_stage:]
    for candidates in (first, plan.stages[3:] if plan.config_zero_stage < 3 else []):
        options = []
        for s in candidates:
            for ckpt in (False, True):
                cap = s.max_micro_batch_ckpt if ckpt else s.max_micro_batch_full
                k = _accum_for(plan, cap, start=1) if cap else None
                if k is None:
                    continue
                micro = per_gpu // k
                work = (RECOMPUTE_FACTOR if ckpt else 1.0) * (ACCUM_FORWARD_FACTOR if k > 1 else 1.0)
                busy = micro == per_gpu or micro * tokens >= BUSY_TOKENS
                options.append(Recommendation(s.stage, ckpt, micro, k, work, busy))
        if options:
            return min(options, key=lambda r: (not r.busy, r.work, r.zero_stage, -r.micro_batch))
    return None


def _warnings(plan: Plan) -> list[str]:
    out = []
    gib = plan.gpu_mem_bytes / GiB
    if not any(s.fits_ckpt or s.fits_full for s in plan.stages):
        best = min(plan.stages, key=lambda s: s.total_ckpt)
        line = (f"WARNING: {plan.model} at {plan.micro_batch} samples per GPU per micro-step does not fit in "
                f"{gib:g} GiB at any ZeRO stage, even with activation checkpointing (smallest: "
                f"{best.total_ckpt / GiB:.1f} GiB at ZeRO-{best.stage})")
        cap = max(s.max_micro_batch_ckpt for s in plan.stages)
        k = _accum_for(plan, cap) if cap else None
        if k:
            stage = min(s.stage for s in plan.stages if s.max_micro_batch_ckpt >= plan.global_batch // (plan.gpus * k))
            line += (f"; it fits with activation checkpointing at ZeRO-{stage} and train.grad_accum={k} "
                     f"({plan.global_batch // (plan.gpus * k)} per micro-step; every pair keeps its "
                     f"{plan.negatives:,} negatives, for one more forward per sample)")
        elif cap:
            line += f"; at most {cap} samples per micro-step fit, and no train.grad_accum divides the batch so"
        else:
            line += "; the model states alone do not fit: use more GPUs or GPUs with more memory"
        out.append(line)
        return out
    chosen = plan.stages[plan.config_zero_stage]
    fits = chosen.fits_ckpt if plan.config_activation_checkpointing else chosen.fits_full
    if not fits:
        need = chosen.total_ckpt if plan.config_activation_checkpointing else chosen.total_full
        ckpt = "with" if plan.config_activation_checkpointing else "without"
        options = [f"ZeRO-{s.stage}" + ("" if (s.fits_ckpt if plan.config_activation_checkpointing else s.fits_full)
                                         else " with model.activation_checkpointing=true")
                   for s in plan.stages if (s.fits_ckpt or s.fits_full)
                   and (s.fits_ckpt or not plan.config_activation_checkpointing)]
        out.append(f"WARNING: the config's choice (ZeRO-{chosen.stage} {ckpt} activation checkpointing) needs "
                   f"{need / GiB:.1f} GiB of {gib:g} GiB per GPU; what fits: {', '.join(options)}")
    return out


def gpus_from_args(gpus: int | None, nodes: int | None, gpus_per_node: int | None) -> int:
    if gpus is None and nodes is None:
        raise PlanError("give --gpus N, or --nodes N (with --gpus-per-node, default 8)")
    per_node = 8 if gpus_per_node is None else gpus_per_node
    if nodes is not None:
        if nodes < 1 or per_node < 1:
            raise PlanError("--nodes and --gpus-per-node must be >= 1")
        if gpus is not None and gpus != nodes * per_node:
            raise PlanError(f"--gpus {gpus} disagrees with --nodes {nodes} x --gpus-per-node {per_node}")
        return nodes * per_node
    if gpus_per_node is not None:
        raise PlanError("--gpus-per-node needs --nodes")
    return math.floor(gpus)
