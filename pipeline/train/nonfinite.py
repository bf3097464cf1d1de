"""Stopping a run whose loss, gradients or weights went non-finite, without a per-step host synchronisation.

Each step adds to counters that live on the device (a few element-wise ops, queued like the step itself); the
host reads them only where it reads values anyway: at log steps and before a checkpoint. A run therefore stops
at the first log or checkpoint step after `train.max_nonfinite_steps` consecutive bad steps, and never writes a
checkpoint of weights that are not finite. (The plain step skips a non-finite update on the device, so its
weights stay finite; a ZeRO optimizer may not skip, hence the weights are checked too before a checkpoint.)
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pipeline.errors import UserError


class NonFiniteError(UserError, RuntimeError):
    """The run diverged; the message is one line naming the step."""


class NonFiniteGuard:
    def __init__(self, max_steps: int, device: torch.device):
        self.max_steps = max_steps
        self._streak = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite steps now
        self._tripped_at = torch.zeros((), dtype=torch.int64, device=device)  # step the streak reached max (0: no)
        self._count = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps since the last read
        self._tripped = 0  # _tripped_at of all ranks at the last read

    def update(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        """After optimizer step `step`: its loss (a device scalar) and gradient norm (tensor, float or None)."""
        bad = ~torch.isfinite(loss)
        if isinstance(grad_norm, torch.Tensor):
            bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
        elif grad_norm is not None and not math.isfinite(grad_norm):
            bad = torch.ones_like(bad)
        bad = bad.to(torch.int64)
        self._streak.add_(1).mul_(bad)
        self._count.add_(bad)
        hit = (self._streak >= self.max_steps) & (self._tripped_at == 0)
        self._tripped_at.copy_(torch.where(hit, step, self._tripped_at))

    def read(self) -> int:
        """Collective (log and checkpoint steps): how many steps were non-finite since the last read (on the
        plain step, the update of each was skipped). Then `raise_if_tripped` stops the run if it must."""
        stats = torch.stack([self._tripped_at, self._count])
        if dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        self._tripped, count = (int(v) for v in stats.tolist())
        self._count.zero_()
        return count

    def raise_if_tripped(self, step: int) -> None:
        """NonFiniteError if, at the last `read`, some rank had seen `max_steps` consecutive non-finite steps."""
        if self._tripped:
            raise NonFiniteError(f"step {self._tripped}: loss or gradient norm non-finite for {self.max_steps} "
                                 f"consecutive steps (train.max_nonfinite_steps={self.max_steps}); stopped at step "
                                 f"{step} without writing a checkpoint (lower train.lr, or resume an earlier one)")


def check_weights_finite(module: torch.nn.Module, step: int) -> None:
    """Collective, before a checkpoint: every rank's share of the weights (ZeRO-3: its partition) is finite."""
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    flags = [(~torch.isfinite(t.detach())).any() for t in tensors if t.numel()]
    device = next((t.device for t in tensors), torch.device("cpu"))
    bad = torch.stack(flags).any().to(torch.int64) if flags else torch.zeros((), dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise NonFiniteError(f"step {step}: the weights are not finite; stopped without writing a checkpoint "
                             f"(lower train.lr, or resume an earlier one)")
