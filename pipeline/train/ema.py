"""Exponential moving average of the trained weights (`train.ema_decay`).

After every optimizer step, ema <- decay * ema + (1 - decay) * weights, for every parameter that trains (frozen
ones equal their EMA anyway), in fp32, as one foreach lerp on the device: no value is read back, so the step
stays free of host synchronisation. The average starts from the weights the run starts with (its
initialisation or `model.pretrained`). Every rank holds the whole average (ranks hold whole weights at ZeRO 0-2;
under bf16 ZeRO it averages the bf16 weights each rank holds).

Saved by rank 0 as `ema.safetensors` inside each checkpoint directory (names as in the model's state dict), read
back on resume, evaluated beside the raw weights at the end of a run, and exported by `export --ema`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

EMA_FILE = "ema.safetensors"


class WeightEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay {decay} must be in (0, 1)")
        self.decay = decay
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        weights = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.average, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: a.detach().to("cpu", copy=True).contiguous() for n, a in zip(self.names, self.average)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"the saved EMA lacks {len(missing)} trained parameters (e.g. {', '.join(missing[:3])}); "
                             f"was the run started with other model.lock_* settings?")
        for name, avg in zip(self.names, self.average):
            avg.copy_(state[name].reshape(avg.shape))

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(Path(directory) / EMA_FILE))

    @contextmanager
    def swapped_in(self):
        """The model's trained parameters hold the average inside the block, their own values again after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


def read_ema(checkpoint: str | Path) -> dict[str, torch.Tensor] | None:
    """The EMA weights a checkpoint directory holds, or None when the run had no train.ema_decay."""
    f = Path(checkpoint) / EMA_FILE
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(f))
