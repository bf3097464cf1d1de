import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kernels.sigmoid_loss import sigmoid_loss_reference
from pipeline.objectives.siglip_loss import siglip_loss


def _inputs(n, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def _rank_main(rank, world, store, sizes, out, impl):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, y = _inputs(sum(sizes))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    xl, yl = x[lo:hi].float().requires_grad_(True), y[lo:hi].float().requires_grad_(True)
    scale = torch.tensor([math.exp(2.0)], requires_grad=True)
    bias = torch.tensor([-3.0], requires_grad=True)
    loss = siglip_loss(xl, yl, scale, bias, impl=impl)
    loss.backward()
    # As DeepSpeed does: shared parameters are all-reduced; every gradient is divided by the world size.
    for p in (scale, bias):
        dist.all_reduce(p.grad)
    dist.all_reduce(mean_loss := loss.detach().clone())
    torch.save({k: v / world for k, v in {"loss": mean_loss, "x": xl.grad, "y": yl.grad, "scale": scale.grad,
                                          "bias": bias.grad}.items()}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["tiled", "blocks"])  # blocks: the GPU path, here under the Triton interpreter
@pytest.mark.parametrize("sizes", [(9, 9), (5, 5, 5)], ids=["2ranks", "3ranks"])
def test_ring_equals_single_process_over_concatenated_batch(tmp_path, sizes, impl):
    world = len(sizes)
    mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), sizes, str(tmp_path / "res"), impl), nprocs=world)
    x, y = _inputs(sum(sizes))
    x, y = x.float().requires_grad_(True), y.float().requires_grad_(True)
    scale = torch.tensor([math.exp(2.0)], requires_grad=True)
    bias = torch.tensor([-3.0], requires_grad=True)
    expected = sigmoid_loss_reference(x, y, scale.log().reshape(()), bias.reshape(()))
    expected.backward()
    for r in range(world):
        res = torch.load(tmp_path / f"res.{r}")
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        torch.testing.assert_close(res["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["x"], x.grad[lo:hi], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["y"], y.grad[lo:hi], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["scale"], scale.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["bias"], bias.grad, rtol=1e-5, atol=1e-7)


def test_single_process_clamps_the_scale():
    x, y = _inputs(6)
    scale = torch.tensor(250.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = siglip_loss(x.float(), y.float(), scale, bias, logit_scale_max=100.0)
    loss.backward()
    torch.testing.assert_close(loss, sigmoid_loss_reference(x, y, torch.tensor(math.log(100.0)),
                                                            torch.tensor(-10.0)).float())
    assert scale.grad.item() == 0.0 and bias.grad.item() != 0.0
