"""FLOPs of one sample in a training step: what MFU divides by the device's peak (pipeline/train/device_peak.py).

One way to count. Every task's `flops_per_sample`, `python -m pipeline plan` and the bench scripts count with
`forward_flops`: torch's FlopCounterMode over the task's own model, run on the meta device (the model's
parameters and buffers are swapped for meta tensors of the same shapes with torch.func.functional_call, so
nothing is allocated and a ViT-H/14 CLIP counts in seconds), on a batch of one sample. The counter sees what
the forward really runs (matmuls, convolutions, attention; a multiply-add counts 2; elementwise ops, norms and
softmax count 0), so patch dropout in training, the window padding of SwinV2 or a text tower's full context
are counted as they run, with no per-architecture formula to keep in step with the model.

From a forward to a training step (`step_flops`), per part of the model (a tower, an encoder):
  - a part with trainable parameters counts 3 x its forward: the backward of a matmul is two matmuls of the
    forward's size (the gradient of its input and of its weight), so forward + backward = 3 forwards; the usual
    MFU convention (6 x parameters x tokens for the matmuls, Kaplan et al. 2020; PaLM, Chowdhery et al. 2022,
    appendix B), attention included. A partly frozen part (e.g. open_clip's lock_image_unlocked_groups > 0)
    counts as trainable: an upper bound, its frozen lower layers need no backward.
  - a frozen part (no parameter requires a gradient) counts 1 x its forward: in every task here a frozen part's
    output goes straight to the loss (ImageBind's image tower, a LiT-locked CLIP tower), so autograd runs no
    backward through it. (A frozen part feeding a trainable one would need its input gradients, 2 x; none does.)
  - the forward that activation checkpointing recomputes is not counted: it is overhead that MFU absorbs.
  - the loss is not counted: a contrastive loss over a global batch G of D-dimensional features costs ~6 x G x D
    FLOPs per pair (2 x G x D for the logits, twice that backward), e.g. 0.2 GFLOP at G = 32k, D = 512, under
    0.5% of a ViT-B/16 pair's ~120 GFLOP; a batch of one sample therefore suffices.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

TRAINABLE_FACTOR = 3  # forward + backward (input and weight gradients): see the module docstring
FROZEN_FACTOR = 1  # forward only


class _Call(nn.Module):
    """Holds `model` as a submodule so that functional_call swaps its tensors while `call` runs."""

    def __init__(self, model: nn.Module, call: Callable):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, *inputs):
        return self.call(self.model, *inputs)


def _window_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "set_attn_impl")]


def forward_flops(model: nn.Module, *inputs: torch.Tensor, call: Callable | None = None) -> int:
    """FLOPs of `call(model, *inputs)` (default: model(*inputs)), counted by FlopCounterMode with every parameter
    and buffer of `model` replaced by a meta tensor of its shape; `inputs` are meta tensors (batch of 1).

    The model is counted in its current train / eval mode (a training step runs in train mode: patch dropout
    counts). Our SwinV2's window attention is forced to its PyTorch reference while counting (the Triton
    kernel cannot run on meta tensors, and the counter sees the reference's two matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    if any(x.device.type != "meta" for x in inputs):
        raise ValueError("forward_flops: the inputs must be meta tensors (torch.empty(..., device='meta'))")
    wrapper = _Call(model, call or (lambda m, *xs: m(*xs)))
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in (*wrapper.named_parameters(), *wrapper.named_buffers())}
    swin = _window_attention_modules(model)
    impls = [m.attn_impl for m in swin]
    try:
        for m in swin:
            m.set_attn_impl("reference")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            torch.func.functional_call(wrapper, meta, inputs)
    finally:
        for m, impl in zip(swin, impls):
            m.set_attn_impl(impl)
    return int(counter.get_total_flops())


def trains(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of the parameters requires a gradient (a part that trains)."""
    return any(p.requires_grad for p in params)


def step_flops(forward: int, trainable: bool) -> int:
    """A part's FLOPs in a training step from its forward FLOPs: 3x when it trains, 1x when frozen."""
    return forward * (TRAINABLE_FACTOR if trainable else FROZEN_FACTOR)
