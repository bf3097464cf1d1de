"""sigmoid_loss against the float64 reference: loss and all four gradients, both implementations.

Every test runs on `kernel_device`: the block path's Triton pass runs on the GPU where there is one and under
the interpreter otherwise (cuBLAS / CPU matmuls for the GEMMs)."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.sigmoid_loss as sl
from kernels.sigmoid_loss import loss_and_grads, sigmoid_loss, sigmoid_loss_reference

IMPLS = ["tiled", "blocks"]


def _inputs(n, m, d, t_prime, bias, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    return tuple(v.to(device) for v in (x, y, torch.tensor(t_prime, dtype=torch.float64),
                                        torch.tensor(bias, dtype=torch.float64)))


def _reference(x, y, tp, b):
    ins = [v.clone().requires_grad_(True) for v in (x, y, tp, b)]
    loss = sigmoid_loss_reference(*ins)
    loss.backward()
    return loss.detach(), [v.grad for v in ins]


def _ours(x, y, tp, b, dtype, impl):
    ins = [x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True), tp.float().requires_grad_(True),
           b.float().requires_grad_(True)]
    loss = sigmoid_loss(*ins, impl=impl)
    loss.backward()
    return loss.detach(), [v.grad for v in ins]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n, m, d", [(1, 1, 19), (37, 37, 19), (37, 53, 19), (64, 64, 32), (70, 130, 33)])
@pytest.mark.parametrize("t_prime, bias", [(math.log(10), -10.0), (math.log(100), 0.0), (0.0, 5.0), (6.0, -30.0)],
                         ids=["init", "t100", "t1_b5", "extreme"])
def test_loss_and_gradients_match_float64_reference(kernel_device, impl, dtype, n, m, d, t_prime, bias):
    x, y, tp, b = _inputs(n, m, d, t_prime, bias, device=kernel_device)
    if dtype == torch.float16:  # judge the kernel, not the rounding of its inputs
        x, y = x.half().double(), y.half().double()
    ref_loss, ref_grads = _reference(x, y, tp, b)
    loss, grads = _ours(x, y, tp, b, dtype, impl)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (4e-3, 1e-3)
    scale = lambda r: atol * max(1.0, r.abs().max().item())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=scale(ref_loss))
    for name, got, want in zip(("dx", "dy", "dt'", "db"), grads, ref_grads):
        assert got.dtype == (dtype if name in ("dx", "dy") else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=scale(want), msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_negatives_only_block_and_no_grad_path(kernel_device, monkeypatch, impl):
    x, y, tp, b = _inputs(20, 45, 24, math.log(10), -10.0, device=kernel_device)
    loss, dx, dy, dt, db = loss_and_grads(x.float(), y.float(), tp.float(), b.float(), has_positives=False, impl=impl)
    z = tp.exp() * x @ y.T + b
    torch.testing.assert_close(loss.double(), -F.logsigmoid(-z).sum() / 20, rtol=1e-5, atol=1e-6)
    g = torch.sigmoid(z) / 20
    torch.testing.assert_close(dx.double(), tp.exp() * g @ y, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dy.double(), tp.exp() * g.T @ x, rtol=1e-5, atol=1e-7)
    asked = []
    real = sl.loss_and_grads
    monkeypatch.setattr(sl, "loss_and_grads", lambda *a, **k: asked.append(a[5]) or real(*a, **k))
    inputs = [v.float().requires_grad_(True) for v in (x, y, tp, b)]
    with torch.no_grad():  # inputs that require grad, but nothing records: the gradients are not made
        torch.testing.assert_close(sigmoid_loss(*inputs, impl=impl).double(), sigmoid_loss_reference(x, y, tp, b),
                                   rtol=1e-5, atol=1e-6)
    assert asked == [False]


@pytest.mark.parametrize("impl", IMPLS)
def test_reruns_are_bitwise_identical(kernel_device, impl):
    x, y, tp, b = _inputs(70, 90, 40, math.log(10), -10.0, device=kernel_device)
    first = loss_and_grads(x.float(), y.float(), tp.float(), b.float(), impl=impl)
    second = loss_and_grads(x.float(), y.float(), tp.float(), b.float(), impl=impl)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_shape_errors_are_clear():
    x, y, tp, b = _inputs(8, 4, 16, 1.0, 0.0)
    with pytest.raises(ValueError, match="y has 4 rows, fewer than the 8 positives"):
        sigmoid_loss(x, y, tp, b)
    with pytest.raises(ValueError, match=r"must be \(n, d\) and \(m, d\)"):
        sigmoid_loss(x, y[:, :3], tp, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n, m", [(37, 37), (70, 130)])
def test_several_row_blocks_match_reference(kernel_device, monkeypatch, dtype, n, m):
    """Blocks of 16 rows (the last one ragged): the per-block logits, coefficients, dX rows and the fp32 dY
    accumulation across blocks give the single-block result."""
    monkeypatch.setattr(sl, "ROW_ALIGN", 16)
    monkeypatch.setattr(sl, "BLOCK_BYTES", 16 * m * 2)  # 16 rows of fp16 logits, the coefficients written over them
    assert sl.row_block(n, m, 2) == 16 and sl.row_block(n, m, 4) == 16  # fp32: 8 rows, rounded up to ROW_ALIGN
    x, y, tp, b = _inputs(n, m, 33, math.log(10), -10.0, device=kernel_device)
    if dtype == torch.float16:
        x, y = x.half().double(), y.half().double()
    ref_loss, ref_grads = _reference(x, y, tp, b)
    loss, grads = _ours(x, y, tp, b, dtype, "blocks")
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (4e-3, 1e-3)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for name, got, want in zip(("dx", "dy", "dt'", "db"), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()),
                                   msg=name)


@pytest.mark.parametrize("n, m", [(40, 40), (37, 53), (53, 53)])
def test_several_tiles_match_reference(n, m):
    """The CPU path in tiles of 16 rows and columns (ragged at the end; off-square diagonals): dX and dY accumulate
    across tiles and the positives land on the right tiles. The other tests' sizes fit one 512 tile."""
    x, y, tp, b = _inputs(n, m, 19, math.log(10), -10.0)
    ref_loss, ref_grads = _reference(x, y, tp, b)
    loss, *grads = sl._tiled_loss_and_grads(x, y, tp, b, has_positives=True, need_grads=True, tile=16)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("dx", "dy", "dt'", "db"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("n, m, d, rows", [(4096, 4096, 768, None), (1000, 1000, 1152, None),
                                           (3000, 4100, 768, 1024)], ids=["4k", "1k_d1152", "3blocks"])
def test_bf16_on_gpu_judged_like_flash_attention(monkeypatch, n, m, d, rows):
    """The block path in bf16 may err against a float64 reference at most ~2x as much as the same math done
    the way PyTorch users do it: bf16 GEMMs (bf16 logits), fp32 scale and bias (as open_clip's parameters)."""
    if rows:  # several row blocks, the last one ragged
        monkeypatch.setattr(sl, "BLOCK_BYTES", rows * m * 2)  # bf16 logits, the coefficients written over them
    x, y, tp, b = _inputs(n, m, d, math.log(10), -10.0, device="cuda")
    x, y = x.bfloat16().double(), y.bfloat16().double()
    ref_loss, ref_grads = _reference(x, y, tp, b)
    loss, grads = _ours(x, y, tp, b, torch.bfloat16, "blocks")
    ins = [x.bfloat16().requires_grad_(True), y.bfloat16().requires_grad_(True),
           tp.float().requires_grad_(True), b.float().requires_grad_(True)]
    z = ins[2].exp() * (ins[0] @ ins[1].T) + ins[3]
    labels = -torch.ones(n, m, device="cuda", dtype=torch.bfloat16)
    labels[torch.arange(n), torch.arange(n)] = 1
    eager = -F.logsigmoid(labels * z).sum() / n
    eager.backward()
    assert (loss.double() - ref_loss).abs() <= 2 * (eager.double() - ref_loss).abs() + 1e-4
    for name, got, eager_grad, want in zip(("dx", "dy", "dt'", "db"), grads, [v.grad for v in ins], ref_grads):
        err = (got.double() - want).abs().max()
        assert err <= 2 * (eager_grad.double() - want).abs().max() + 1e-6, name


def test_peak_memory_at_16k_is_20x_below_open_clip():
    """n = 16384 on the CPU, each case in a fresh process: resident-memory growth of forward+backward.
    (d = 64 keeps it fast; our footprint is one tile plus the gradients, open_clip's a few n x n matrices.)"""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from sigmoid_loss_bench import cpu_case_in_subprocess

    ours = cpu_case_in_subprocess("ours", 16384, 64)
    theirs = cpu_case_in_subprocess("open_clip", 16384, 64)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["grad_bias"] == pytest.approx(theirs["grad_bias"], rel=1e-4)
    assert ours["peak_mib"] * 20 <= theirs["peak_mib"], (ours, theirs)


_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.sigmoid_loss as sl

fn = sl._coefficients_kernel
for dtype in ("bf16", "fp16", "fp32"):
    for need in (True, False):
        consts = dict(HAS_POS=True, NEED_GRADS=need, BLOCK=4096)
        sig = {n: "constexpr" if n in consts else ("*fp32" if n in ("part_ptr", "tp_ptr", "b_ptr") else f"*{dtype}")
               if n.endswith("_ptr") else "i32" for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
        assert "div.rn.f32" not in kernel.asm["ptx"]  # the sigmoid's reciprocal is the fast one
        print("ok", dtype, need, flush=True)
'''


@pytest.mark.slow
def test_coefficient_kernel_compiles_for_sm90_without_a_gpu():
    """ptxas for sm_90 on a machine without a GPU: the coefficient pass in every dtype the GPU path launches."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 6, proc.stdout
