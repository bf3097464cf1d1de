"""window_attention: the Triton kernels against the float64 reference, on the GPU when there is one and under
TRITON_INTERPRET=1 on the CPU otherwise (conftest's `kernel_device`).

Output and every gradient (dqkv, dbias, d logit_scale), fp32 and fp16, V1 and V2 (logit scale at init, exactly at
the clamp, above it), shifted and unshifted, 7x7 (N = 49, padded tile) and 8x8 windows, a non-square map with
three windows per row (the shifted seam), the tiled path (several query / key blocks), poisoned outputs and
reruns. The GPU tests judge bf16 as flash-attention does (the kernel's error at most twice a bf16 PyTorch
reference's, both against float64), and the autotuned launch.
"""
import dataclasses
import math

import pytest
import torch

import kernels.window_attention as wa
from kernels.window_attention import LOGIT_SCALE_MAX, window_attention, window_attention_reference

pytestmark = pytest.mark.skipif(wa.triton is None, reason="needs triton")

LS_INIT, LS_CLAMP, LS_ABOVE = math.log(10), LOGIT_SCALE_MAX, LOGIT_SCALE_MAX + 0.5


def _clamp_passes_gradient_at_the_bound() -> bool:
    """PyTorch's convention for torch.clamp(x, max=m) at x == m, which the kernel's caller inherits (the clamp
    stays in autograd): no gradient in torch 2.14, the gradient passed in torch 2.11 (seen on an H200)."""
    x = torch.tensor(LOGIT_SCALE_MAX, dtype=torch.float64, requires_grad=True)
    torch.clamp(x, max=LOGIT_SCALE_MAX).backward()
    return bool(x.grad != 0)
VARIANTS = {"v1": None, "v2_init": LS_INIT, "v2_clamp": LS_CLAMP, "v2_above": LS_ABOVE}
# (B, H, W, heads, d, window): 2x2 windows with a batch of 2; a non-square map with 3 windows per row
GEOMETRIES = {"7x7": (2, 14, 14, 2, 32, (7, 7)), "8x8_16x24": (1, 16, 24, 3, 32, (8, 8))}
U32, U16 = 2.0 ** -24, 2.0 ** -11  # unit roundoff of fp32 and fp16


@pytest.fixture(autouse=True, scope="module")
def _interpreter_without_overflow_checks():
    """The interpreter checks every int32 add / mul for overflow (GPU builds only in debug mode), which costs a
    third of the interpreted time here; switched off for this module and restored afterwards."""
    if not wa.INTERPRET:
        yield
        return
    import triton.runtime.interpreter as interp

    saved = interp.interpreter_builder.options
    interp.interpreter_builder.options = dataclasses.replace(saved, sanitize_overflow=False)
    yield
    interp.interpreter_builder.options = saved


@pytest.fixture(autouse=True, scope="module")
def _untuned():
    """One configuration per kernel (the first: most windows per program, pipelined). On a GPU autotuning would
    compile and benchmark 2-8 configurations for every new shape key; correctness needs one.
    `test_autotuned_launch_matches_reference` covers the tuned launch."""
    saved = wa.AUTOTUNE
    wa.AUTOTUNE = False
    wa.clear_autotune_cache()
    yield
    wa.AUTOTUNE = saved
    wa.clear_autotune_cache()


@pytest.fixture
def tiled(monkeypatch):
    """Run small windows through the tiled path: N = 49 in outer blocks of 32 and inner blocks of 16 (2 x 4
    blocks, the last of each ragged)."""
    _tiled(monkeypatch)


def _tiled(monkeypatch):
    monkeypatch.setattr(wa, "_SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(wa, "_TILE_OUTER", 32)
    monkeypatch.setattr(wa, "_TILE_INNER", 16)


def _inputs(B, H, W, heads, d, window, logit_scale, dtype, seed=0, device="cpu"):
    """float64 tensors (rounded through `dtype` when it is fp16 / bf16, so that the kernel is judged, not the
    rounding of its inputs). V2 bias in (0, 16) as 16 * sigmoid(cpb) is."""
    g = torch.Generator().manual_seed(seed)
    C, N = heads * d, window[0] * window[1]
    qkv = torch.randn(B, H, W, 3 * C, generator=g, dtype=torch.float64)
    if logit_scale is None:
        bias = torch.randn(heads, N, N, generator=g, dtype=torch.float64)
        ls = None
    else:
        bias = 16 * torch.sigmoid(torch.randn(heads, N, N, generator=g, dtype=torch.float64))
        ls = torch.as_tensor(logit_scale, dtype=torch.float64).expand(heads).reshape(heads, 1, 1).clone()
    dout = torch.randn(B, H, W, C, generator=g, dtype=torch.float64)
    if dtype != torch.float32:
        qkv, bias, dout = (t.to(dtype).double() for t in (qkv, bias, dout))
    return tuple(None if t is None else t.to(device) for t in (qkv, bias, ls, dout))


def _run(fn, qkv, bias, ls, dout, heads, window, shift, dtype, ls_dtype=torch.float32, bias_dtype=None):
    """(out, dqkv, dbias, dls) of fn with leaf inputs qkv in `dtype`, bias in `bias_dtype` (default `dtype`) and
    logit_scale in `ls_dtype`."""
    q = qkv.to(dtype, copy=True).requires_grad_(True)
    b = bias.to(bias_dtype or dtype, copy=True).requires_grad_(True)
    s = None if ls is None else ls.to(ls_dtype, copy=True).requires_grad_(True)
    out = fn(q, heads, window, shift, b, s)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, b.grad, None if s is None else s.grad


def _reference(qkv, bias, ls, dout, heads, window, shift):
    return _run(window_attention_reference, qkv, bias, ls, dout, heads, window, shift, torch.float64, torch.float64)


def _triton(qkv, bias, ls, dout, heads, window, shift, dtype, bias_dtype=None):
    fn = lambda *a: window_attention(*a, impl="triton")
    return _run(fn, qkv, bias, ls, dout, heads, window, shift, dtype, bias_dtype=bias_dtype)


NAMES = ("out", "dqkv", "dbias", "dlogit_scale")


def _tolerances(dtype, qkv, bias, ls, heads, window) -> dict[str, float]:
    """Normwise relative tolerance of each output, |got - want| <= tol * max|want|, from the arithmetic.

    fp32. Every rounding has relative size <= u = 2^-24 on the interpreter (numpy is correctly rounded) and
    <= 4u on a GPU for the approximate sqrt, division and exp2 that Triton emits for fp32 (sqrt.approx,
    div.full, ex2.approx: <= 2 ulp; fp32 dots are IEEE, DOT="ieee", not TF32). Two sources dominate:
    - the softmax: a logit s is formed with a relative error of a few u, i.e. an absolute error ~ u |s|, and
      exp() turns that into a relative error of P; so the scale is L, a bound on |logit| (V2: the clamped
      logit scale + max |bias|; V1: d^-0.5 max|q| max|k| + max|bias|, Cauchy-Schwarz). At the clamp L ~ 116.
    - accumulation: a sum of n rounded terms drifts as sqrt(n) u (random-walk bound): n = N keys for the
      output and dqkv, the windows summed into dbias, every (window, query, key) term of d logit_scale.
    tol = 8 u (L + sqrt(n)): 8 = the GPU's 4u per approximate operation x 2 (an operation rounds, then the
    product or sum it feeds rounds again). Measured on the interpreter: <= 1/8 of this tolerance.
    fp16. The kernels round P and dz to fp16 before the tensor-core dots (fp32 accumulation) and round their
    outputs (out, dqkv, and dbias in the bias's dtype) to fp16, each a relative error <= u16 = 2^-11, a few in
    sequence: 8 u16 on top of the fp32 terms. d logit_scale is summed from the fp32 tiles (dz * cos, with the
    exact delta = rowsum(P * dP)) and returned in fp32: the fp32 tolerance."""
    C = qkv.shape[-1] // 3
    d = C // heads
    N = window[0] * window[1]
    windows = qkv.shape[0] * (qkv.shape[1] // window[0]) * (qkv.shape[2] // window[1])
    if ls is None:
        norms = qkv[..., :2 * C].double().reshape(-1, 2, heads, d).norm(dim=-1)
        L = d ** -0.5 * norms[:, 0].max().item() * norms[:, 1].max().item()
    else:
        L = torch.clamp(ls.double(), max=LOGIT_SCALE_MAX).exp().max().item()
    L += bias.double().abs().max().item()
    n = {"out": N, "dqkv": N, "dbias": windows, "dlogit_scale": windows * N * N}
    tol = {k: 8 * U32 * (L + math.sqrt(v)) for k, v in n.items()}
    if dtype == torch.float16:
        tol = {k: v + (0 if k == "dlogit_scale" else 8 * U16) for k, v in tol.items()}
    return tol


def _check(got, want, tols, names=NAMES):
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g is not None, name
        assert torch.isfinite(g).all(), name
        err, scale = (g.double() - w).abs().max().item(), w.abs().max().item()
        assert err <= tols[name] * scale, f"{name}: max error {err:.3g} > {tols[name]:.3g} x max|want| {scale:.3g}"


def _check_against_reference(geometry, shift, logit_scale, dtype, device, seed=0):
    B, H, W, heads, d, window = geometry
    qkv, bias, ls, dout = _inputs(B, H, W, heads, d, window, logit_scale, dtype, seed, device)
    want = _reference(qkv, bias, ls, dout, heads, window, shift)
    got = _triton(qkv, bias, ls, dout, heads, window, shift, dtype)
    assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
    assert got[0].device == qkv.device
    _check(got, want, _tolerances(dtype, qkv, bias, ls, heads, window))
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_matches_float64_reference(geometry, shifted, variant, dtype, kernel_device):
    B, H, W, heads, d, window = GEOMETRIES[geometry]
    shift = (window[0] // 2, window[1] // 2) if shifted else (0, 0)
    got, want = _check_against_reference(GEOMETRIES[geometry], shift, VARIANTS[variant], dtype, kernel_device)
    if variant == "v2_above":  # the clamp is torch.clamp(max=log 100) as in timm: no gradient above the bound
        assert torch.equal(want[3], torch.zeros_like(want[3])) and torch.equal(got[3], torch.zeros_like(got[3]))
    elif variant == "v2_clamp":  # at the bound: PyTorch's convention, whichever this version has
        assert bool((got[3] != 0).all()) is bool((want[3] != 0).all()) is _clamp_passes_gradient_at_the_bound()
    elif variant == "v2_init":
        assert got[3].abs().min() > 0


@pytest.mark.parametrize("case", ["head_dim_64", "head_dim_24", "window_4x8_shift_0x4", "shift_1x5"])
def test_other_shapes(case, kernel_device):
    geometry, shift, ls, dtype = {
        "head_dim_64": ((1, 16, 16, 2, 64, (8, 8)), (4, 4), LS_INIT, torch.float32),
        "head_dim_24": ((1, 14, 21, 2, 24, (7, 7)), (3, 3), None, torch.float32),   # padded head dim
        "window_4x8_shift_0x4": ((1, 8, 24, 2, 32, (4, 8)), (0, 4), None, torch.float32),
        "shift_1x5": ((1, 14, 21, 2, 32, (7, 7)), (1, 5), LS_INIT, torch.float16),
    }[case]
    _check_against_reference(geometry, shift, ls, dtype, kernel_device)


@pytest.mark.parametrize("variant, dtype, W", [("v1", torch.float32, 14), ("v2_mixed", torch.float16, 14),
                                               ("v2_mixed", torch.float32, 21)])
def test_tiled_path_matches_reference(tiled, variant, dtype, W, kernel_device):
    """N = 49 in blocks of 32 and 16: online softmax, the three backward kernels and per-tile dbias.
    The mixed V2 case has one head at init, one exactly at the clamp."""
    ls = None if variant == "v1" else [LS_INIT, LS_CLAMP]
    got, _ = _check_against_reference((1, 14, W, 2, 32, (7, 7)), (3, 3), ls, dtype, kernel_device)
    if ls is not None:
        assert got[3].flatten()[0] != 0 and bool(got[3].flatten()[1] != 0) is _clamp_passes_gradient_at_the_bound()


@pytest.mark.parametrize("path", ["single_tile", "tiled"])
def test_poisoned_outputs_and_reruns_are_bitwise_identical(monkeypatch, path, kernel_device):
    """Every output buffer starts as NaN (so any element a kernel fails to write shows up), and two runs on
    identical inputs give identical bits (dbias and d logit_scale are summed in a fixed order)."""
    if path == "tiled":
        _tiled(monkeypatch)
    geometry = (2, 14, 21, 2, 32, (7, 7)) if path == "single_tile" else (1, 14, 14, 2, 32, (7, 7))
    shift = (3, 3)
    qkv, bias, ls, dout = _inputs(*geometry, LS_INIT, torch.float32, seed=3, device=kernel_device)
    args = (qkv, bias, ls, dout, geometry[3], geometry[5], shift, torch.float32)
    clean = _triton(*args)
    monkeypatch.setattr(wa, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))
    first, second = _triton(*args), _triton(*args)
    for name, a, b, c in zip(NAMES, clean, first, second):
        assert not torch.isnan(b).any(), name
        assert torch.equal(a, b) and torch.equal(b, c), name


def test_atomic_dbias_option_matches(monkeypatch, kernel_device):
    """fp32 atomics for dbias (WINDOW_ATTENTION_DETERMINISTIC_DBIAS=0): the same output, dqkv and d logit_scale
    bits (only the dbias reduction changes) and a dbias within the fp32 tolerance of the float64 reference
    (the atomics' order varies from run to run on a GPU, so not bitwise the deterministic sum)."""
    geometry, shift = (1, 16, 24, 2, 32, (8, 8)), (4, 4)
    qkv, bias, ls, dout = _inputs(*geometry, LS_INIT, torch.float32, seed=1, device=kernel_device)
    det = _triton(qkv, bias, ls, dout, geometry[3], geometry[5], shift, torch.float32)
    monkeypatch.setattr(wa, "DETERMINISTIC_DBIAS", False)
    atomic = _triton(qkv, bias, ls, dout, geometry[3], geometry[5], shift, torch.float32)
    for name, a, b in zip(NAMES, det, atomic):
        if name != "dbias":
            assert torch.equal(a, b), name
    want = _reference(qkv, bias, ls, dout, geometry[3], geometry[5], shift)
    _check(atomic, want, _tolerances(torch.float32, qkv, bias, ls, geometry[3], geometry[5]))


def test_no_grad_forward_and_strided_input(kernel_device, monkeypatch):
    """Under no_grad the forward skips the log-sum-exp; a qkv view with padded rows (row stride != W * 3C)
    is read in place."""
    forward, asked = wa._triton_forward, []
    monkeypatch.setattr(wa, "_triton_forward", lambda *a, **k: asked.append(k.get("need_lse")) or forward(*a, **k))
    B, H, W, heads, d, window, shift = 1, 14, 14, 2, 32, (7, 7), (3, 3)
    qkv, bias, ls, _ = _inputs(B, H, W, heads, d, window, LS_INIT, torch.float32, device=kernel_device)
    wide = torch.zeros(B, H, W + 3, qkv.shape[-1], dtype=torch.float32, device=kernel_device)
    wide[:, :, 2:W + 2] = qkv.float()
    view = wide[:, :, 2:W + 2]
    assert not view.is_contiguous()
    with torch.no_grad():
        out = window_attention(view, heads, window, shift, bias.float(), ls.float(), impl="triton")
    assert asked == [False]
    want = window_attention_reference(qkv, heads, window, shift, bias, ls)
    _check([out], [want], _tolerances(torch.float32, qkv, bias, ls, heads, window), names=["out"])


def test_dispatch():
    """CPU tensors: "auto" is the reference; impl="triton" runs only under the interpreter, fp32 / fp16 only."""
    qkv, bias, ls, _ = _inputs(1, 8, 8, 2, 16, (4, 4), LS_INIT, torch.float32)
    auto = window_attention(qkv, 2, (4, 4), (2, 2), bias, ls)  # CPU tensors: the reference
    assert torch.equal(auto, window_attention_reference(qkv, 2, (4, 4), (2, 2), bias, ls))
    with pytest.raises(ValueError, match="unknown impl"):
        window_attention(qkv, 2, (4, 4), (2, 2), bias, ls, impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' needs"):
        window_attention(qkv.bfloat16(), 2, (4, 4), (2, 2), bias, ls, impl="triton")
    if not wa.INTERPRET:  # a machine with a GPU: CPU tensors never reach the kernels
        with pytest.raises(ValueError, match="impl='triton' needs"):
            window_attention(qkv.float(), 2, (4, 4), (2, 2), bias.float(), ls.float(), impl="triton")
    with pytest.raises(ValueError, match="not a multiple of the window"):
        window_attention(qkv[:, :7], 2, (4, 4), (2, 2), bias, ls, impl="triton")


@pytest.mark.parametrize("qkv_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["v1", "v2_init"])
def test_reference_takes_low_precision_qkv_with_fp32_bias_and_scale(qkv_dtype, variant):
    """What the kernels accept, the reference accepts: bf16 / fp16 qkv with an fp32 bias and logit scale (bf16
    training with fp32 parameters). Output in qkv's dtype, gradients in their leaves' dtypes, and the logits,
    bias, mask and softmax in fp32 as in timm under autocast. The probe for the last: softmax ignores a
    constant added to every logit, so a bias shifted by 256 must give the same attention up to fp32 rounding
    of the logits (256 u32 ~ 2e-5, far below the output's own rounding), whereas logits in qkv's dtype
    (ulp 2 at 256 in bf16, 0.25 in fp16) lose most of the bias: the all-low-precision reference shows it."""
    heads, window, shift = 2, (7, 7), (3, 3)
    qkv, bias, ls, dout = _inputs(2, 14, 14, heads, 32, window, VARIANTS[variant], qkv_dtype)

    def mixed(b):
        return _run(window_attention_reference, qkv, b, ls, dout, heads, window, shift, qkv_dtype,
                    bias_dtype=torch.float32)

    got, shifted = mixed(bias), mixed(bias + 256)
    assert [None if t is None else t.dtype for t in got] == [qkv_dtype, qkv_dtype, torch.float32,
                                                             None if ls is None else torch.float32]
    want = _reference(qkv, bias, ls, dout, heads, window, shift)
    u = torch.finfo(qkv_dtype).eps / 2
    scale = want[0].abs().max().item()
    assert (got[0].double() - want[0]).abs().max().item() < 0.1 * scale  # the same function, in low precision
    # P differs by ~1e-5 relatively: at most a few elements round to the neighbouring value of qkv's dtype
    assert (shifted[0].double() - got[0].double()).abs().max().item() <= 4 * u * scale
    pure = lambda b: window_attention_reference(qkv.to(qkv_dtype), heads, window, shift, b.to(qkv_dtype),
                                                None if ls is None else ls.to(qkv_dtype))
    assert (pure(bias + 256).double() - pure(bias).double()).abs().max().item() > 0.02 * scale


def test_flops_and_bytes_floor():
    # SwinV2-T stage 1 at 256 px, window 8: B=1, 64x64 map, C=96, 3 heads
    assert wa.flops(1, 64, 64, 96, 3, (8, 8)) == 4 * 4096 * 64 * 96
    assert wa.flops(1, 64, 64, 96, 3, (8, 8), "fwd+bwd") == 3.5 * wa.flops(1, 64, 64, 96, 3, (8, 8))
    fwd = wa.bytes_moved(1, 64, 64, 96, 3, (8, 8))
    assert fwd == 4096 * 4 * 96 * 2 + 3 * 64 * 64 * 4
    bwd = wa.bytes_moved(1, 64, 64, 96, 3, (8, 8), pass_="bwd")
    assert bwd == 4096 * 8 * 96 * 2 + 4096 * 3 * 4 + 2 * 3 * 64 * 64 * 4


# ----------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("window, H", [(8, 32), (12, 24), (16, 32), (24, 48)])
@pytest.mark.parametrize("variant", ["v1", "v2_init"])
def test_bf16_error_within_twice_pytorch_bf16(window, H, variant, kernel_device):
    """bf16 judged as flash-attention does: kernel error vs float64 at most 2x the error of the same PyTorch
    code run in bf16 mixed precision (bf16 qkv, fp32 bias and logit scale: timm under autocast), plus the
    kernel's fp32 arithmetic budget for gradients the baseline happens to get nearly exact. Reruns are
    bitwise identical."""
    B, heads, d = 2, 4, 32
    ws, shift = (window, window), (window // 2, window // 2)
    qkv, bias, ls, dout = _inputs(B, H, H, heads, d, ws, VARIANTS[variant], torch.bfloat16, device=kernel_device)
    want = _reference(qkv, bias, ls, dout, heads, ws, shift)
    base = _run(window_attention_reference, qkv, bias, ls, dout, heads, ws, shift, torch.bfloat16,
                bias_dtype=torch.float32)
    ours = _triton(qkv, bias, ls, dout, heads, ws, shift, torch.bfloat16, bias_dtype=torch.float32)
    again = _triton(qkv, bias, ls, dout, heads, ws, shift, torch.bfloat16, bias_dtype=torch.float32)
    floor = _tolerances(torch.float32, qkv, bias, ls, heads, ws)
    assert ours[0].dtype == ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    for name, o, r, b, o2 in zip(NAMES, ours, want, base, again):
        if r is None:
            continue
        assert torch.equal(o, o2), f"{name}: rerun differs"
        err = (o.double() - r).abs().max().item()
        base_err = (b.double() - r).abs().max().item()
        assert err <= 2 * base_err + floor[name] * r.abs().max().item(), \
            f"{name}: kernel {err:.3g} vs PyTorch bf16 {base_err:.3g}"


@pytest.mark.gpu
def test_auto_dispatch_runs_the_kernels_on_cuda(monkeypatch, kernel_device):
    """impl="auto" (the default) on CUDA tensors: the Triton forward and backward, not the reference."""
    calls = {"fwd": 0, "bwd": 0, "reference": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(wa, "_triton_forward", counted("fwd", wa._triton_forward))
    monkeypatch.setattr(wa, "_triton_backward", counted("bwd", wa._triton_backward))
    monkeypatch.setattr(wa, "window_attention_reference", counted("reference", wa.window_attention_reference))
    heads, window, shift = 2, (8, 8), (4, 4)
    qkv, bias, ls, dout = _inputs(1, 16, 24, heads, 32, window, LS_INIT, torch.float32, device=kernel_device)
    got = _run(window_attention, qkv, bias, ls, dout, heads, window, shift, torch.float32)
    assert calls == {"fwd": 1, "bwd": 1, "reference": 0}
    want = _reference(qkv, bias, ls, dout, heads, window, shift)
    _check(got, want, _tolerances(torch.float32, qkv, bias, ls, heads, window))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_autotuned_launch_matches_reference(monkeypatch, deterministic, kernel_device):
    """With autotuning on, every configuration of the forward and backward is benchmarked on the first call of a
    key (the atomic dbias buffer must be zeroed between benchmark runs: reset_to_zero) and the chosen one gives
    the reference's result. A window (4x4, d = 16) no other test uses, so the key is new."""
    monkeypatch.setattr(wa, "AUTOTUNE", True)
    monkeypatch.setattr(wa, "DETERMINISTIC_DBIAS", deterministic)
    wa.clear_autotune_cache()
    heads, window, shift = 2, (4, 4), (2, 2)
    qkv, bias, ls, dout = _inputs(2, 8, 12, heads, 16, window, LS_INIT, torch.float16, device=kernel_device)
    try:
        got = _triton(qkv, bias, ls, dout, heads, window, shift, torch.float16)
        timed = {t.base_fn.__name__: len(getattr(t, "configs_timings", {})) for t in (wa._fwd, wa._bwd_fused)}
    finally:
        wa.clear_autotune_cache()
    assert timed == {"_fwd_kernel": len(wa._fwd.configs), "_bwd_fused_kernel": len(wa._bwd_fused.configs)}
    assert min(timed.values()) > 1
    want = _reference(qkv, bias, ls, dout, heads, window, shift)
    _check(got, want, _tolerances(torch.float16, qkv, bias, ls, heads, window))


# ----------------------------------------------------------------------------------------------- benchmark smoke
def _run_bench(tmp_path, *args):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "window_attention.md"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "bench" / "window_attention_bench.py"), "--device", "cpu",
                           "--smoke", "--out", str(out), *args], cwd=repo, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# Window attention") and "Commit: " in text and "GB/s" in text, text[:800]
    return text, [line for line in text.splitlines() if line.startswith("| smoke")]


_ON_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark's own GPU run "
                                                                "(~2 min) is the check")


@_ON_GPU
def test_bench_smoke_writes_every_row(tmp_path):
    """bench/window_attention_bench.py on the CPU (interpreter, tiny shapes): the compile warm-up in a worker
    process, then one row per method with every column filled, in the results file."""
    text, rows = _run_bench(tmp_path, "--variants", "v2", "--windows", "4", "--methods", "ours", "sdpa", "eager",
                            "--warm-workers", "1", "--no-train")
    assert [r.split("|")[2].strip() for r in rows] == ["ours", "sdpa", "eager"], rows
    for r in rows:
        cells = [c.strip() for c in r.split("|")[3:7]]
        assert all(float(c) > 0 for c in cells[:3]) and cells[3].count("%") == 3, r
        assert "error" not in r and "skipped" not in r, r


@_ON_GPU
@pytest.mark.slow
def test_bench_smoke_every_method_and_the_training_step(tmp_path):
    """Every method (torch.compile included, from the warm-up's caches), the tiled path, V1 and V2, and the
    training step with and without the kernel."""
    text, rows = _run_bench(tmp_path, "--windows", "4", "9", "--train-batch", "1")
    assert len(rows) == 2 * 2 * 4 and not any("error" in r or "skipped" in r for r in rows), rows
    train = [line for line in text.splitlines() if line.startswith("| tiny SwinV2")]
    assert len(train) == 1 and "x |" in train[0], train


# ----------------------------------------------------------------------------------------------- compile, no GPU
_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.window_attention as wa

FP32_ARGS = ("lse_ptr", "delta_ptr", "dbias_ptr", "dscale_ptr", "scale_ptr", "bias_ptr")

def build(fn, dtype, consts):
    sig = {n: "constexpr" if n in consts else ("*fp32" if n in FP32_ARGS else f"*{dtype}") if n.endswith("_ptr")
           else "fp32" if n == "sm_scale" else "i32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    print("ok", fn.__name__, dtype, consts["Mh"], flush=True)

# (dtype, window, (outer, inner) blocks or None for the defaults, WPP of fwd / of dq and dkdv): the default paths in
# bf16, then what the GPU tests launch untuned (first configuration: most windows per program): fp32 with IEEE
# dots, and the tests' small tiled blocks (32, 16) in fp16
for dtype, M, blocks, wpp in (("bf16", 7, None, (2, 1)), ("bf16", 12, None, (2, 1)), ("fp32", 7, None, (4, 2)),
                              ("fp16", 7, (32, 16), (4, 2))):
    outer, inner = blocks or wa._blocks(M * M)
    meta = dict(Mh=M, Mw=M, d=32, V2=True, SHIFTED=True, DOT="ieee" if dtype == "fp32" else "tf32", EPS=1e-12,
                BLOCK_D=32)
    build(wa._fwd_kernel, dtype, dict(meta, STORE_LSE=True, BLOCK_M=outer, BLOCK_N=inner, WPP=wpp[0]))
    if inner >= M * M:
        build(wa._bwd_fused_kernel, dtype, dict(meta, ATOMIC=False, BLOCK=outer))
    else:
        build(wa._bwd_dq_kernel, dtype, dict(meta, BLOCK_M=outer, BLOCK_N=inner, WPP=wpp[1]))
        build(wa._bwd_dkdv_kernel, dtype, dict(meta, BLOCK_M=inner, BLOCK_N=outer, WPP=wpp[1]))
        build(wa._bwd_dbias_kernel, dtype, dict(meta, ATOMIC=True, BLOCK_M=outer, BLOCK_N=inner))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """ptxas for sm_90 on the CPU machine: catches kernel code that the interpreter accepts but the compiler
    does not (types, layouts, shared memory), for the single-tile and the tiled paths: bf16, fp32 (IEEE dots)
    and the small fp16 tiles the GPU tests launch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 12, proc.stdout
