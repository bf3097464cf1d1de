"""The text `python -m pipeline plan` prints: a `Plan` (pipeline/plan.py) as a few lines and a table of memory
per GPU by ZeRO stage (`--json` prints `Plan.to_dict()` instead)."""
from __future__ import annotations

from pipeline.plan import BUSY_TOKENS, GiB, Plan


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def format_recommendation(plan: Plan) -> str:
    r = plan.recommendation
    why = []
    if r.activation_checkpointing:
        why.append("every block's forward twice")
    if r.grad_accum > 1:
        why.append("one more forward per sample for the cached features")
    same = (r.zero_stage, r.activation_checkpointing, r.micro_batch) == (
        plan.config_zero_stage, plan.config_activation_checkpointing, plan.micro_batch)
    return (f"recommended{' (the config' + chr(39) + 's choice)' if same else ''}: ZeRO-{r.zero_stage}, activation "
            f"checkpointing {'on' if r.activation_checkpointing else 'off'}, {r.micro_batch:,} per micro-step x "
            f"{r.grad_accum} micro-step{'s' if r.grad_accum > 1 else ''}; the GPU computes {r.work:.2f}x the model FLOPs"
            f"{' (' + ' and '.join(why) + ')' if why else ''}"
            f"{'' if r.busy else f'; under {BUSY_TOKENS:,} image tokens per micro-step, the GPU may idle'}\n"
            f"  overrides: {' '.join(r.overrides())}")


def format_plan(plan: Plan) -> str:
    lines = []
    attn = "fused" if plan.fused_attention else "unfused"
    lines.append(f"plan: {plan.model}, {plan.params:,} parameters (image {plan.params_image:,}, text and other "
                 f"{plan.params_text:,}); {plan.precision} on {plan.gpus} GPUs x {plan.gpu_mem_bytes / GiB:g} GiB")
    lines.append(f"batch: {plan.global_batch:,} global = {plan.gpus} GPUs x {plan.micro_batch:,} per micro-step x "
                 f"{plan.grad_accum} (train.grad_accum); loss {plan.loss}")
    lines.append(f"negatives: {plan.negatives:,} per pair (the whole global batch"
                 + (f"; with {plan.grad_accum} micro-steps each one's loss spans all of them, at one more forward "
                    f"per sample, counted in the step time)" if plan.grad_accum > 1 else ")"))
    for tw in plan.towers:
        shapes = sorted({(b.width, b.heads, b.mlp_hidden, b.tokens) for b in tw.blocks})
        desc = ", ".join(f"width {w} heads {a} mlp {f} tokens {s}" for w, a, f, s in shapes[:3])
        lines.append(f"  {tw.name} tower: {len(tw.blocks)} blocks ({desc}{', ...' if len(shapes) > 3 else ''})")
    lines.append(f"activations per sample ({attn} attention): {plan.act_per_sample_ckpt / 2**20:.1f} MiB with "
                 f"activation checkpointing, {plan.act_per_sample_full / 2**20:.1f} MiB without; per GPU at "
                 f"{plan.micro_batch} per micro-step (with batch and loss): {_gib(plan.act_batch_ckpt)} / "
                 f"{_gib(plan.act_batch_full)} GiB")
    lines.append(f"compute: {plan.flops_per_sample / 1e9:,.1f} GFLOP per sample (forward + backward); at "
                 f"{plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s: {plan.step_time_s:.2f} s per step, "
                 f"{plan.samples_per_s:,.0f} samples/s ({plan.samples_per_s / plan.gpus:,.1f} per GPU), "
                 f"{plan.train_steps:,} steps in {_duration(plan.train_time_s)}")
    lines.append(f"memory per GPU in GiB (overhead {plan.overhead_bytes / GiB:g} GiB included in the totals; "
                 f"* = the config's choice):")
    header = (f"{'ZeRO':>5} {'params':>8} {'grads':>8} {'optim':>8} {'states':>8} | {'total ckpt':>10} {'fits':>4} "
              f"{'max mb':>7} | {'total no ckpt':>13} {'fits':>4} {'max mb':>7}")
    lines.append(header)
    lines.append("-" * len(header))
    for s in plan.stages:
        mark = "*" if s.stage == plan.config_zero_stage else " "
        ck = "*" if plan.config_activation_checkpointing else " "
        nk = " " if plan.config_activation_checkpointing else "*"
        lines.append(f"{mark}{s.stage:>4} {_gib(s.params):>8} {_gib(s.grads):>8} {_gib(s.optimizer):>8} "
                     f"{_gib(s.states):>8} | {_gib(s.total_ckpt):>9}{ck} {'yes' if s.fits_ckpt else 'NO':>4} "
                     f"{s.max_micro_batch_ckpt:>7} | {_gib(s.total_full):>12}{nk} {'yes' if s.fits_full else 'NO':>4} "
                     f"{s.max_micro_batch_full:>7}")
    lines.append("(max mb: the largest micro-batch per GPU that fits at that stage)")
    if plan.recommendation is not None:
        lines.append(format_recommendation(plan))
    lines.extend(plan.warnings)
    return "\n".join(lines)
