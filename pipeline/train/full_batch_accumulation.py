"""Gradient accumulation that keeps every negative of the global batch (the CLIP and SigLIP losses): the idea of
open_clip's `--accum-freq`, in our own code.

One optimizer step of M micro-batches:

1. every micro-batch is encoded without a graph (`torch.no_grad`); only its features are kept (a few KB per pair);
2. micro-batch j is encoded again, with a graph, and the loss is computed over the whole step's batch: the
   cached features of the other micro-batches, with j's slice replaced by the live features (all ranks'
   features gathered or passed around the ring as without accumulation); backward; then micro-batch j + 1.

Every pass's loss has the value of the full-batch loss L (same weights, same samples), so the loop's mean of the
M micro-batch losses is L. Gradients: the loop backpropagates each pass's loss divided by M (DeepSpeed's
gradient accumulation; the optimizer steps once, after the M-th backward). The live features f_j take part in one
pass only and must receive dL/df_j whole, so their gradient is multiplied by M here; the logit scale and bias
take part in every pass and are left alone. Summed over the passes:
(1/M) sum_j (M dL/df_j df_j/dtheta + dL/ds ds/dtheta) = dL/dtheta, the one-big-batch gradient
(tests/train/test_full_batch_accumulation.py compares both on 2 DeepSpeed ranks).

Random state: the CPU and current-device generators are saved before each micro-batch's first encoding and
restored before its second, so dropout (patch dropout included) draws the same masks in both passes and the
live features equal the cached ones (on a GPU up to rounding, where a kernel without a graph takes another
path); afterwards the generators stand where one pass over the micro-batches
leaves them. BatchNorm running statistics (ResNet image towers) are updated in both passes.

Cost, against accumulation with per-micro-batch negatives: one more forward per sample without a graph (about a
third of a forward + backward) and the loss computed M times over the step's batch; memory holds one
micro-batch's activations, as before, plus the step's features and the loss over the step's pairs.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def full_batch_losses(encode: Callable[[dict], dict], loss_of: Callable[[dict], tuple[torch.Tensor, dict]],
                      batches: Iterable[dict], feature_keys: tuple[str, ...], device: torch.device,
                      ) -> Iterator[tuple[torch.Tensor, dict]]:
    """Yields (loss, stats) for each micro-batch of `batches` (one optimizer step), to be backpropagated before the
    next is asked for. `encode(batch)` runs the model and returns a dict holding `feature_keys` (one row per
    pair); `loss_of(out)` computes the loss of such a dict (all ranks' rows, as without accumulation)."""
    batches = list(batches)  # the whole step's micro-batches, before any is encoded with a graph
    accum = len(batches)
    states, cached = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(_rng_state(device))
            out = encode(batch)
            cached.append([out[key] for key in feature_keys])
    for j, batch in enumerate(batches):
        _set_rng_state(states[j], device)
        out = encode(batch)
        spliced = dict(out)
        for i, key in enumerate(feature_keys):
            live = out[key]
            if live.requires_grad:  # a locked tower's features carry no gradient
                live.register_hook(lambda grad: grad * accum)
            spliced[key] = torch.cat([c[i] for c in cached[:j]] + [live] + [c[i] for c in cached[j + 1:]])
        yield loss_of(spliced)
        del out, spliced  # this pass's graph is gone after its backward; nothing keeps its activations
