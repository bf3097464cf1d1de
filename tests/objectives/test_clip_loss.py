
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.objectives.clip_loss import clip_loss


def reference_loss(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _inputs(n, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_single_process_matches_reference_and_clamps():
    img, txt = _inputs(9)
    for scale, expected_scale_grad_zero in ((14.0, False), (250.0, True)):
        s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        loss = clip_loss(img, txt, s, logit_scale_max=100.0)
        ref = reference_loss(img.float(), txt.float(), min(scale, 100.0))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        loss.backward()
        assert (s.grad == 0).item() == expected_scale_grad_zero


def _rank_main(rank, world, store_path, sizes, result_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    img, txt = _inputs(sum(sizes))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    local_img = img[lo:hi].float().clone().requires_grad_(True)
    local_txt = txt[lo:hi].float().clone().requires_grad_(True)
    scale = torch.tensor(20.0, requires_grad=True)
    loss = clip_loss(local_img, local_txt, scale)
    loss.backward()
    # Feature gradients already hold every rank's contribution (the all_gather backward sums them); a shared
    # parameter such as the scale is all-reduced. DeepSpeed then divides both by the world size.
    dist.all_reduce(scale.grad)
    for g in (local_img.grad, local_txt.grad, scale.grad):
        g /= world
    dist.all_reduce(loss_sum := loss.detach().clone())
    torch.save({"loss": loss_sum / world, "img": local_img.grad, "txt": local_txt.grad, "scale": scale.grad},
               f"{result_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(6, 6), (7, 4)])
def test_two_ranks_equal_single_process(tmp_path, sizes):
    """Gathered negatives with gradient: 2 gloo ranks give the loss and gradients of the whole batch
    (for unequal batches: of the mean of the per-rank losses)."""
    world = len(sizes)
    mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), sizes, str(tmp_path / "res")), nprocs=world)
    results = [torch.load(tmp_path / f"res.{r}") for r in range(world)]
    img, txt = _inputs(sum(sizes))
    img, txt = img.float().requires_grad_(True), txt.float().requires_grad_(True)
    scale = torch.tensor(20.0, requires_grad=True)
    logits = scale * img @ txt.T
    losses = []
    for r in range(world):  # each rank: its rows against every column
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        labels = torch.arange(lo, hi)
        losses.append((F.cross_entropy(logits[lo:hi], labels) + F.cross_entropy(logits.T[lo:hi], labels)) / 2)
    expected = torch.stack(losses).mean()
    expected.backward()
    if sizes[0] == sizes[1]:
        torch.testing.assert_close(expected, reference_loss(img.detach(), txt.detach(), 20.0))
    for r, res in enumerate(results):
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        torch.testing.assert_close(res["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["img"], img.grad[lo:hi], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["txt"], txt.grad[lo:hi], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["scale"], scale.grad, rtol=1e-5, atol=1e-6)
