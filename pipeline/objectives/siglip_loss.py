"""The SigLIP sigmoid loss across ranks: image blocks stay, text blocks travel around a ring.

At ring step k every rank scores its own images against the text block of rank (r - k): step 0 holds the
positives, every later block is negatives only. Each block carries the accumulator of its own gradient with it;
after the last step the accumulator reaches its owner holding every rank's contribution. The next block is
received while the current one is scored (and the accumulator travels while the next one is scored), so
transfers overlap compute. No rank ever holds more than two text blocks; each block is scored by the same
row-block path as the single-process loss (a remote block is one more set of columns, without positives).

Each rank's loss is the mean over its own rows; with DeepSpeed's averaging of gradients over ranks the
result equals the single-process loss and gradients over the concatenated batch (tested on 2 gloo ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.sigmoid_loss import Impl, grads_needed, loss_and_grads, sigmoid_loss, take_saved_grads
from pipeline.train.distributed import rank_sizes


def _exchange(send: list[torch.Tensor], recv: list[torch.Tensor], world: int, rank: int) -> list:
    """Non-blocking: sends `send` to the next rank and receives `recv` from the previous one."""
    ops = [dist.P2POp(dist.isend, t, (rank + 1) % world) for t in send]
    ops += [dist.P2POp(dist.irecv, t, (rank - 1) % world) for t in recv]
    return dist.batch_isend_irecv(ops)


class RingSigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, t_prime, bias, impl: Impl = "auto", need: bool = True):
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = rank_sizes(y.shape[0])  # blocks may differ in size (a batch that lost bad samples)

        block = y.contiguous()
        dy_pending = None  # (requests, buffer) of the accumulator still in flight
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need else None
        dt = torch.zeros((), dtype=torch.float32, device=x.device)
        db = torch.zeros((), dtype=torch.float32, device=x.device)
        for k in range(world):
            src = (rank - k) % world
            prefetch = None
            if k < world - 1:  # bring the next text block while this one is scored
                nxt = torch.empty(sizes[(src - 1) % world], y.shape[1], dtype=y.dtype, device=y.device)
                prefetch = (_exchange([block], [nxt], world, rank), nxt)
            l_k, dx_k, dy_k, dt_k, db_k = loss_and_grads(x, block, t_prime, bias, has_positives=(k == 0),
                                                         need_grads=need, impl=impl)
            loss += l_k
            if need:
                dx += dx_k
                dt += dt_k
                db += db_k
                if dy_pending is not None:  # the accumulator of this block, sent by the previous rank
                    for req in dy_pending[0]:
                        req.wait()
                    dy_k += dy_pending[1]
                incoming = torch.empty(sizes[(src - 1) % world], y.shape[1], dtype=torch.float32, device=y.device)
                dy_pending = (_exchange([dy_k], [incoming], world, rank), incoming)
            if prefetch is not None:
                for req in prefetch[0]:
                    req.wait()
                block = prefetch[1]
        if need:
            for req in dy_pending[0]:  # after `world` hops our own accumulator is back
                req.wait()
            ctx.save_for_backward(dx.to(x.dtype), dy_pending[1].to(y.dtype), dt, db)
            ctx.shapes = (t_prime.shape, bias.shape)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dx, dy, dt, db = take_saved_grads(ctx)
        tp_shape, b_shape = ctx.shapes
        return dx.mul_(grad.to(dx.dtype)), dy.mul_(grad.to(dy.dtype)), (dt * grad).reshape(tp_shape), \
            (db * grad).reshape(b_shape), None, None


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, logit_scale_max: float = 100.0, impl: Impl = "auto") -> torch.Tensor:
    """`logit_scale` is exp(t') as open_clip's forward returns it, clamped at `logit_scale_max` (gradient 0
    beyond); `logit_bias` is b. Single process: the kernel directly; several ranks: the ring. Both use
    `kernels.sigmoid_loss`'s block path on GPUs and its tiled path on CPUs (`impl` forces one, for tests)."""
    t_prime = torch.log(logit_scale.float().clamp(max=logit_scale_max)).reshape(())
    bias = logit_bias.float().reshape(())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RingSigmoidLoss.apply(image_features, text_features, t_prime, bias, impl,
                                     grads_needed(image_features, text_features, t_prime, bias))
    return sigmoid_loss(image_features, text_features, t_prime, bias, impl)

