"""Our SwinV2 (pipeline/models/swinv2.py, attention through kernels.window_attention) against timm's: the same
state dict loads strictly both ways and the outputs agree at fp32 on the CPU; with the Triton kernels (on the GPU
when there is one, else under the interpreter) against timm, the float64 model and timm under bf16 autocast."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn

import kernels.window_attention as wa
from pipeline.models.swinv2 import SWINV2_MODELS, create_swinv2

U32 = 2.0 ** -24  # fp32 unit roundoff


def reduction_path(model, upto="logits") -> int:
    """Total length of the sums one output element depends on along the network, up to stage `upto` (an
    index), "features" (after the final norm), "pre_logits" (pooled) or "logits": every Linear's fan-in (qkv,
    proj, fc1, fc2, patch merging, the position-bias MLP, the head), every LayerNorm's width, each block's
    q.k (head dim) and P.v (window) sums, the patch embedding's convolution, the global pool's tokens."""
    n = model.patch_embed.proj.weight[0].numel() + model.patch_embed.norm.normalized_shape[0]
    whole = upto in ("features", "pre_logits", "logits")
    stages = list(model.layers) if whole else list(model.layers)[:upto + 1]
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, nn.Linear):
                n += m.in_features
            elif isinstance(m, nn.LayerNorm):
                n += m.normalized_shape[0]
        for blk in stage.blocks:
            n += blk.attn.dim // blk.attn.num_heads + blk.window_size[0] * blk.window_size[1]
    if whole:
        n += model.norm.normalized_shape[0]
    if upto in ("pre_logits", "logits"):
        n += math.prod(model._stage_resolution(model.patch_embed.grid_size, model.num_layers - 1))
    if upto == "logits" and isinstance(model.head.fc, nn.Linear):
        n += model.head.fc.in_features
    return n


def same_ops_tolerance(model, upto="logits") -> float:
    """Normwise relative tolerance (|ours - timm| <= tol * max|timm|) of two fp32 evaluations of the same network
    that differ only in the order of their sums (qkv on the whole map instead of per window, the padded map,
    the position-bias gather, the BLAS blocking for other matrix shapes). Their difference is a sum of
    rounding errors: a sum of n terms drifts by ~sqrt(n) u relative to its size (random-walk model), and the
    drifts of every sum along the path add in quadrature: u sqrt(sum of n) relative to the magnitude of the
    activations, i.e. to max|values| of the tensor compared and not to each element (a stage output of
    magnitude ~10 has elements near 0 that carry the same absolute error as the others). Measured with
    timm: at most ~1/8 of this (e.g. 1.7e-5 in a stage of max 18 where this allows 2e-4)."""
    return U32 * math.sqrt(reduction_path(model, upto))


def kernel_tolerance(model, tokens: int) -> float:
    """Normwise relative tolerance of the model with the Triton kernels against the same model with the
    reference (or in float64), for the output and for each parameter's gradient: the same-ops budget over the
    forward and backward paths, plus the kernels' own (tests/kernels/test_window_attention.py `_tolerances`:
    8 u (L + sqrt(n)), L the largest logit, n the (query, key) pairs a d logit_scale sums) once per block
    the gradient passes, in quadrature. `tokens`: of the largest (padded) stage map, batch included."""
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    L = max(torch.clamp(blk.attn.logit_scale.detach().double(), max=wa.LOGIT_SCALE_MAX).exp().max().item()
            for blk in blocks) + 16.0  # V2 bias = 16 sigmoid(.) < 16
    N = max(blk.window_size[0] * blk.window_size[1] for blk in blocks)
    per_block = 8 * U32 * (L + math.sqrt(tokens * N))
    return U32 * math.sqrt(2 * reduction_path(model)) + per_block * math.sqrt(2 * len(blocks))


def assert_normwise_close(got, want, tol, msg=""):
    err, scale = (got.double() - want.double()).abs().max().item(), want.abs().max().item()
    assert err <= tol * scale, f"{msg}: max error {err:.3g} > {tol:.3g} x max|want| {scale:.3g}"


def fwd_bwd(model, impl: str, x, loss=lambda out: out.square().sum()):
    """(output, {parameter name: gradient}) of one forward and backward with attention impl `impl`."""
    model.zero_grad()
    model.set_attn_impl(impl)
    out = model(x)
    loss(out).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_kernel_within_fp32_budget(kernel, ref32, f64, tol):
    """Output and every parameter gradient of the kernel model (fp32) against the float64 model: error at most
    twice the fp32 reference model's error plus `tol` (normwise per tensor): flash-attention's criterion, in
    fp32. The reference's own error exposes sums that cancel: d logit_scale adds dz * cos over every (query,
    key) pair and dz sums to 0 over each row, so its relative error in fp32 can be far above the budget of a
    well-conditioned tensor (measured: 0.2x `kernel_tolerance` for the fp32 reference, up to 0.5x between
    the reference and the kernels, both fp32)."""
    (k_out, k_grads), (r_out, r_grads), (t_out, t_grads) = kernel, ref32, f64
    for name, k, r, t in [("output", k_out, r_out, t_out)] + [(n, k_grads[n], r_grads[n], t_grads[n])
                                                               for n in t_grads]:
        err, base = ((a.double() - t.double()).abs().max().item() for a in (k, r))
        scale = t.abs().max().item()
        assert err <= 2 * base + tol * scale, f"{name}: kernel {err:.3g} vs fp32 reference {base:.3g} " \
                                              f"(+ {tol:.3g} x max|float64| {scale:.3g})"


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter drawn at random (fixed seed). timm's init zeroes the post-norms of every block, which turns
    each block into the identity and would let a wrong attention pass; some logit scales land above the
    log(100) clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 5.0)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name and name.endswith("weight")
                                                                   else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def timm_and_ours(name: str, **kwargs):
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(name, pretrained=False, **kwargs)).eval()
    ours = create_swinv2(name, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_tiny_loads_timm_state_dict_and_matches_timm():
    ref, ours = timm_and_ours("swinv2_tiny_window8_256")
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats_ref, feats = ref.forward_features(x), ours.forward_features(x)
        assert_normwise_close(feats, feats_ref, same_ops_tolerance(ours, "features"), "features")
        assert_normwise_close(ours.forward_head(feats, pre_logits=True), ref.forward_head(feats_ref, pre_logits=True),
                              same_ops_tolerance(ours, "pre_logits"), "pre_logits")
        out_ref, out = ref(x), ours(x)
    assert out.shape == (2, 1000)
    assert_normwise_close(out, out_ref, same_ops_tolerance(ours), "logits")
    assert out_ref.abs().max() > 0.5  # not a degenerate comparison


def _kernel_device_or_skip(device: torch.device) -> None:
    if wa.triton is None:
        pytest.skip("needs triton")
    if device.type == "cpu" and not wa.INTERPRET:
        pytest.skip("the kernels run on the GPU here; the CPU copy of this test needs TRITON_INTERPRET=1")


@pytest.fixture
def untuned(monkeypatch):
    """One kernel configuration per shape (on a GPU, autotuning would compile 2-8 per kernel and shape)."""
    monkeypatch.setattr(wa, "AUTOTUNE", False)
    wa.clear_autotune_cache()
    yield
    wa.clear_autotune_cache()


def test_triton_impl_matches_timm(kernel_device, untuned):
    """The model with every block forced onto the Triton kernels (on the GPU, or the interpreter on CPU
    machines) against timm, and its gradients against the float64 model. Small: 72 px and fewer blocks, still
    with shifted windows, a map padded to the window (18 -> 24, 9 -> 16) and odd windows (5x5, 3x3)."""
    _kernel_device_or_skip(kernel_device)
    ref, ours = timm_and_ours("swinv2_tiny_window8_256", img_size=72, depths=(2, 2, 1, 1), num_classes=10)
    f64 = copy.deepcopy(ours).double().to(kernel_device)
    ref, ours = ref.to(kernel_device), ours.to(kernel_device)
    assert ours.stage_windows()[1][1] == ((8, 8), (4, 4))
    x = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    tol = kernel_tolerance(ours, tokens=24 * 24)
    kernel = fwd_bwd(ours, "triton", x)
    with torch.no_grad():
        assert_normwise_close(kernel[0], ref(x), tol, "logits vs timm")
    assert_kernel_within_fp32_budget(kernel, fwd_bwd(ours, "reference", x), fwd_bwd(f64, "reference", x.double()),
                                     tol)


def _count_attention_calls(monkeypatch) -> dict:
    """Counts the Triton forward / backward launches and the reference calls of kernels.window_attention."""
    calls = {"triton_fwd": 0, "triton_bwd": 0, "reference": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(wa, "_triton_forward", counted("triton_fwd", wa._triton_forward))
    monkeypatch.setattr(wa, "_triton_backward", counted("triton_bwd", wa._triton_backward))
    monkeypatch.setattr(wa, "window_attention_reference", counted("reference", wa.window_attention_reference))
    return calls


def _tiny_randomized(**kwargs):
    """A SwinV2-T layout at 40 px with 4x4 windows and depths (2, 2, 1, 1): maps 10, 5, 3, 2, so shifted windows
    on maps padded to the window (10 -> 12, 5 -> 8) and windows clamped to the map (3x3, 2x2); small tiles,
    quick to compile. Every parameter random (`randomize_`): the post-norm weights are not timm's zeros, so
    every block's output depends on its attention, and some logit scales sit above the clamp. Eval mode:
    stochastic depth (timm's default drop_path_rate) would draw different blocks for the models compared."""
    args = dict(img_size=40, window_size=4, depths=(2, 2, 1, 1), num_classes=10)
    args.update(kwargs)
    torch.manual_seed(0)
    model = randomize_(create_swinv2("swinv2_tiny_window8_256", **args)).eval()
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    assert all(blk.norm1.weight.abs().min() > 0 and blk.norm2.weight.abs().min() > 0 for blk in blocks)
    assert model.stage_windows() == [[((4, 4), (0, 0)), ((4, 4), (2, 2))], [((4, 4), (0, 0)), ((4, 4), (2, 2))],
                                     [((3, 3), (0, 0))], [((2, 2), (0, 0))]]
    return model, len(blocks)


def _kernel_model_matches_float64(device, impl, monkeypatch):
    model, blocks = _tiny_randomized()
    f64 = copy.deepcopy(model).double().to(device)
    model = model.to(device)
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 3, 40, 40, generator=g).to(device), torch.randn(2, 10, generator=g).to(device)
    loss = lambda out: (out * w.to(out.dtype)).sum()
    calls = _count_attention_calls(monkeypatch)
    kernel = fwd_bwd(model, impl, x, loss)
    assert calls == {"triton_fwd": blocks, "triton_bwd": blocks, "reference": 0}
    ref32 = fwd_bwd(model, "reference", x, loss)
    want = fwd_bwd(f64, "reference", x.double(), loss)
    assert calls == {"triton_fwd": blocks, "triton_bwd": blocks, "reference": 2 * blocks}
    assert_kernel_within_fp32_budget(kernel, ref32, want, kernel_tolerance(model, tokens=2 * 12 * 12))
    # not vacuous: the output depends on the attention (the blocks are not identities)
    assert kernel[1]["layers.0.blocks.1.attn.qkv.weight"].abs().max() > 0


@pytest.mark.gpu
def test_default_impl_on_cuda_runs_the_kernels_and_matches_float64(kernel_device, monkeypatch, untuned):
    """SwinV2 forward and backward on CUDA with the default impl ("auto"): every block runs the Triton forward
    and backward (counted), nothing runs the reference, and the output and every parameter gradient equal the
    float64 model's (reference attention) within the fp32 budget."""
    _kernel_model_matches_float64(kernel_device, "auto", monkeypatch)


def test_forced_triton_impl_on_cpu_runs_the_kernels_and_matches_float64(monkeypatch, untuned):
    """The same check on the CPU: the default there is the reference, so impl="triton" (the interpreter)."""
    _kernel_device_or_skip(torch.device("cpu"))
    _kernel_model_matches_float64(torch.device("cpu"), "triton", monkeypatch)


def test_default_impl_on_cpu_is_the_reference(monkeypatch):
    model, blocks = _tiny_randomized()
    calls = _count_attention_calls(monkeypatch)
    fwd_bwd(model, "auto", torch.randn(1, 3, 40, 40))
    assert calls == {"triton_fwd": 0, "triton_bwd": 0, "reference": blocks}


@pytest.mark.gpu
def test_bf16_autocast_with_the_kernels_is_as_close_to_fp32_timm_as_timm_in_bf16(kernel_device, untuned):
    """bf16 training precision, judged as flash-attention does but for the whole model: under torch.autocast
    (bf16, fp32 parameters), ours with the kernels (qkv and position bias reach them in bf16) is at most 2x
    as far from timm in fp32 as timm itself under the same autocast, for the logits and for all the
    parameter gradients together (normwise)."""
    ref, ours = timm_and_ours("swinv2_tiny_window8_256", img_size=40, window_size=4, depths=(2, 2, 1, 1),
                              num_classes=10)
    ref, ours = ref.to(kernel_device), ours.to(kernel_device)  # eval: no stochastic depth draws
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(4, 3, 40, 40, generator=g).to(kernel_device), torch.randn(4, 10, generator=g).to(kernel_device)

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        (out.float() * w).sum().backward()
        params = dict(model.named_parameters())
        return out.float().detach(), torch.cat([params[n].grad.flatten() for n in sorted(params)])

    truth = run(ref, False)
    timm_bf16 = run(ref, True)
    ours_bf16 = run(ours, True)
    for name, t, b, o in zip(("logits", "gradients"), truth, timm_bf16, ours_bf16):
        err, base = (o - t).norm().item(), (b - t).norm().item()
        assert 0 < base and err <= 2 * base, f"{name}: ours {err:.3g} vs timm bf16 {base:.3g} (|fp32| {t.norm():.3g})"


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swinv2_base_window8_256",
                                  "swinv2_base_window12to24_192to384", "swinv2_large_window12_192"])
def test_parameter_names_shapes_and_counts_equal_timm(name):
    """Built on the meta device: no memory, no init."""
    ref = timm.create_model(name, pretrained=False, device="meta")
    ours = create_swinv2(name, device="meta")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    if name == "swinv2_tiny_window8_256":
        assert sum(p.numel() for p in ours.parameters()) == 28_347_154
    assert ours.pretrained_cfg["num_classes"] == ref.pretrained_cfg["num_classes"] == ours.num_classes
    assert ours.pretrained_cfg["input_size"] == ref.pretrained_cfg["input_size"]


def test_every_timm_name_is_known():
    assert set(SWINV2_MODELS) == set(timm.list_models("swinv2_*")) - {n for n in timm.list_models("swinv2_cr*")}


@pytest.mark.parametrize("name, kwargs, input_size", [
    # 200 px: maps 50, 25, 13, 7 with window 8 -> rolled, zero-padded to a window multiple, mask on the padded map
    # (the padded tokens' qkv is the random q/v bias: filling them with zeros instead is off by ~0.3 here)
    ("swinv2_tiny_window8_256", dict(img_size=200, num_classes=10), (200, 200)),
    # windows larger than the map with always_partition: padded and shifted anyway
    ("swinv2_tiny_window8_256", dict(img_size=64, always_partition=True, num_classes=5), (64, 64)),
    # rectangular image and window, pretrained_window_sizes (12, 12, 12, 6) rescaling the bias coordinates
    ("swinv2_base_window12to16_192to256", dict(img_size=(72, 88), window_size=(6, 5), depths=(1, 1, 2, 1),
                                               num_classes=0), (72, 88)),
    # strict_img_size=False: another input size than img_size (masks from the actual map)
    ("swinv2_tiny_window8_256", dict(img_size=96, strict_img_size=False, global_pool="max", num_classes=5),
     (112, 80)),
], ids=["pad-200px", "always-partition", "rect-pretrained-window", "dynamic-size"])
def test_variants_match_timm(name, kwargs, input_size):
    ref, ours = timm_and_ours(name, **kwargs)
    ref_buffers = dict(ref.named_buffers())
    for k, b in ours.named_buffers():  # coordinate tables and indices (timm's masks are not ours to compare)
        torch.testing.assert_close(b, ref_buffers[k], rtol=0, atol=0, msg=k)
    x = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_normwise_close(ours(x), ref(x), same_ops_tolerance(ours), "logits")
        feats, inter = ours.forward_intermediates(x)
        feats_ref, inter_ref = ref.forward_intermediates(x)
    assert_normwise_close(feats, feats_ref, same_ops_tolerance(ours, "features"), "features")
    # raw stage outputs, magnitudes ~10: tolerances relative to that magnitude, from the sums along the path
    # (an absolute 1e-5 failed on an element of 0.006 that was 1.6e-5 off in a stage of max ~10, 6u of it)
    for i, (a, b) in enumerate(zip(inter, inter_ref, strict=True)):
        assert_normwise_close(a, b, same_ops_tolerance(ours, i), f"stage {i}")


def test_set_input_size_follows_timm():
    """timm's set_input_size (what open_clip's force_image_size calls) scales every stage's window with the
    patch grid; ours gives the same windows and outputs."""
    torch.manual_seed(0)
    ref = randomize_(timm.create_model("swinv2_tiny_window16_256", pretrained=False, num_classes=7)).eval()
    ours = create_swinv2("swinv2_tiny_window16_256", num_classes=7).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.set_input_size(img_size=(64, 64))
    ours.set_input_size(img_size=(64, 64))
    assert ours.stage_windows() == [[(b.window_size, b.shift_size) for b in s.blocks] for s in ref.layers]
    assert ours.stage_windows()[0][1] == ((4, 4), (2, 2))
    assert ours.model_args["img_size"] == [64, 64] and ours.pretrained_cfg["input_size"] == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_normwise_close(ours(x), ref(x), same_ops_tolerance(ours), "logits")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize_(create_swinv2("swinv2_tiny_window8_256", img_size=64, num_classes=10, drop_path_rate=0.3,
                                     proj_drop_rate=0.1)).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    calls = []
    model.layers[0].blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))

    def grads():
        model.zero_grad()
        torch.manual_seed(6)  # the same stochastic-depth and dropout draws
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == 3  # forward + recomputation in backward (pre-hook: the recompute may stop early)
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-5, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for n, g in plain.items() if "layers.0.blocks.1.attn" in n)


def test_unknown_name_is_a_one_line_error_with_close_matches():
    with pytest.raises(ValueError) as e:
        create_swinv2("swinv2_tiny_window8_265")
    msg = str(e.value)
    assert "\n" not in msg and "swinv2_tiny_window8_256" in msg and "'swinv2_tiny_window8_265'" in msg
    with pytest.raises(ValueError, match="known: swinv2_base_window12_192"):
        create_swinv2("resnet50")


def test_timm_style_metadata_and_head():
    model = create_swinv2("swinv2_tiny_window8_256.ms_in1k", img_size=64, num_classes=10, device="meta")
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert model.default_cfg is model.pretrained_cfg and model.pretrained_cfg["num_classes"] == 10
    assert model.pretrained_cfg["architecture"] == "swinv2_tiny_window8_256"
    assert model.num_features == 768 and model.get_classifier().out_features == 10
    assert model.model_args == {"img_size": 64, "num_classes": 10}
    model.reset_classifier(0, "avg")
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    assert {n for n in model.no_weight_decay()} == {n for n, _ in model.named_parameters()
                                                   if "cpb_mlp" in n or "logit_scale" in n}
    with pytest.raises(ValueError, match="attention dropout"):
        create_swinv2("swinv2_tiny_window8_256", attn_drop_rate=0.1, device="meta")


def test_built_from_timms_classes_with_only_the_attention_step_replaced():
    """The model is timm's (its class, modules and methods); the blocks override `_attn` and the unused mask only."""
    from pipeline.models.swinv2 import KernelSwinV2Block

    model = create_swinv2("swinv2_tiny_window8_256", img_size=64, device="meta")
    assert isinstance(model, timm.models.swin_transformer_v2.SwinTransformerV2)
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    assert blocks and all(type(blk) is KernelSwinV2Block and blk.attn_mask is None for blk in blocks)
    assert {k for k in vars(KernelSwinV2Block) if not k.startswith("__")} == {"attn_impl", "_attn", "_init_buffers"}


def test_a_timm_without_the_internals_it_relies_on_is_a_one_line_error():
    """A timm whose SwinV2 classes changed shape fails at build time, naming what is missing, instead of silently
    running timm's own attention (or crashing deep inside a forward)."""
    from pipeline.models.swinv2 import _adopt

    ref = timm.create_model("swinv2_tiny_window8_256", img_size=64, device="meta")
    del ref.layers[1].blocks[0].attn.cpb_mlp
    with pytest.raises(RuntimeError) as e:
        _adopt(ref, "auto")
    msg = str(e.value)
    assert "\n" not in msg and "WindowAttention.cpb_mlp" in msg and timm.__version__ in msg
    assert type(ref.layers[0].blocks[0]).__module__.startswith("timm.")  # nothing was converted
