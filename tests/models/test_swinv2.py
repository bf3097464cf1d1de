"""Our SwinV2 (pipeline/models/swinv2.py, attention through kernels.window_attention) against timm's: the same
state dict loads strictly both ways and the outputs agree at fp32 on the CPU."""
import pytest
import timm
import torch

from pipeline.models.swinv2 import SWINV2_MODELS, create_swinv2

ATOL = 1e-5


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
        torch.testing.assert_close(feats, feats_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.forward_head(feats, pre_logits=True),
                                   ref.forward_head(feats_ref, pre_logits=True), rtol=0, atol=ATOL)
        out_ref, out = ref(x), ours(x)
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
    assert out_ref.abs().max() > 0.5  # not a degenerate comparison


def _triton_unsupported_reason() -> str | None:
    from kernels import window_attention as wa

    qkv = torch.randn(1, 4, 4, 3 * 16)
    try:
        wa.window_attention(qkv, 1, (4, 4), (2, 2), torch.zeros(1, 16, 16), torch.zeros(1, 1, 1), impl="triton")
    except ValueError as e:
        if "impl" in str(e):
            return f"kernels.window_attention has no impl='triton' yet ({e})"
        raise
    except (ImportError, NotImplementedError) as e:
        return f"impl='triton' unavailable: {type(e).__name__}: {e}"
    return None


def test_triton_impl_matches_timm():
    """The model with every block forced onto the Triton kernel (the interpreter on CPU machines). Small: 72 px
    and fewer blocks, still with shifted windows, a map padded to the window (18 -> 24, 9 -> 16) and odd
    windows (5x5, 3x3)."""
    reason = _triton_unsupported_reason()
    if reason:
        pytest.skip(reason)
    ref, ours = timm_and_ours("swinv2_tiny_window8_256", img_size=72, depths=(2, 2, 1, 1), num_classes=10)
    assert ours.stage_windows()[1][1] == ((8, 8), (4, 4))
    ours.set_attn_impl("triton")
    x = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(2))
    out = ours(x)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=0, atol=ATOL)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.set_attn_impl("reference")
    ours(x).square().sum().backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


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
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=ATOL)
        feats, inter = ours.forward_intermediates(x)
        feats_ref, inter_ref = ref.forward_intermediates(x)
    torch.testing.assert_close(feats, feats_ref, rtol=0, atol=ATOL)
    for a, b in zip(inter, inter_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)  # raw stage outputs: magnitudes ~10


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
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=ATOL)


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
