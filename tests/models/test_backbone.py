"""Backbones by name: timm's parameter layout and counts (built on the meta device), demo presets, features."""
from pathlib import Path

import pytest
import timm
import torch
import yaml

from pipeline.models.backbone import (PRESETS, BackboneNameError, backbone_features, backbone_info,
                                      backbone_transforms, create_backbone, load_backbone_weights)
from pipeline.train.flops import forward_flops

REPO = Path(__file__).resolve().parents[2]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def vit_param_formula(depth, width, mlp, patch, img, classes, chans=3):
    tokens = (img // patch) ** 2 + 1
    block = (width * 3 * width + 3 * width) + (width * width + width) + (width * mlp + mlp) + (mlp * width + width) \
        + 4 * width
    embed = patch * patch * chans * width + width + width + tokens * width  # conv w+b, cls token, pos embed
    head = width * classes + classes if classes else 0
    return embed + depth * block + 2 * width + head


@pytest.fixture(scope="module")
def vit_h():
    with torch.device("meta"):
        return (create_backbone("vit_huge_patch14_224", num_classes=1000),
                timm.create_model("vit_huge_patch14_224", pretrained=False, num_classes=1000))


def test_vit_h14_matches_timm_and_the_paper_shape(vit_h):
    ours, ref = vit_h
    assert len(ours.blocks) == 32 and ours.embed_dim == 1280 and ours.blocks[0].mlp.fc1.out_features == 5120
    assert ours.blocks[0].attn.num_heads == 16
    assert n_params(ours) == n_params(ref) == vit_param_formula(32, 1280, 5120, 14, 224, 1000) == 632_045_800
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # timm's default for this name has no head (its weights are the headless in21k ones)
    assert vit_param_formula(32, 1280, 5120, 14, 224, 0) == 632_045_800 - 1_281_000 == 630_764_800


def test_swinv2_b_matches_timm():
    with torch.device("meta"):
        ours = create_backbone("swinv2_base_window16_256")
        ref = timm.create_model("swinv2_base_window16_256", pretrained=False)
    assert n_params(ours) == n_params(ref) == 87_918_816
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    info = backbone_info(ours)
    assert (info.kind, info.patch_size, info.grid_size, info.stride, info.num_features, info.depths) == \
        ("swinv2", 4, (64, 64), 32, 1024, (2, 2, 18, 2))


def test_vit_h14_forward_flops_by_hand(vit_h):
    d, t, layers = 1280, 257, 32
    macs = layers * (12 * d * d * t + 2 * t * t * d) + (14 * 14 * 3) * d * 256  # blocks + attention + patch embed
    images = torch.empty(1, 3, 224, 224, device="meta")
    assert forward_flops(vit_h[0], images) == pytest.approx(2 * macs + 2 * d * 1000, rel=1e-3)  # 334.6 GFLOPs + head
    demo = create_backbone("demo_vit")  # a real (CPU) model: counted with its tensors swapped for meta ones
    assert forward_flops(demo, torch.empty(1, 3, 64, 64, device="meta")) == pytest.approx(
        2 * (4 * (12 * 128 * 128 * 65 + 2 * 65 * 65 * 128) + 192 * 128 * 64 + 128 * 40), rel=1e-3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_demo_presets_run_on_64px(name):
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    info = backbone_info(model)
    assert info.img_size == (64, 64) and model.num_classes == 40
    assert n_params(model) < 3_000_000
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model(x), backbone_features(model, x)
    assert logits.shape == (2, 40) and feats.shape == (2, info.num_features)
    assert torch.allclose(model.forward_head(model.forward_features(x)), logits)
    tf = backbone_transforms(model, train=False)
    from PIL import Image
    assert tf(Image.new("RGB", (80, 80))).shape == (3, 64, 64)


def test_demo_vit_is_timm_with_kwargs():
    arch, kwargs = PRESETS["demo_vit"]
    torch.manual_seed(0)
    ours = create_backbone("demo_vit")
    ref = timm.create_model(arch, pretrained=False, **kwargs)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert create_backbone("demo_vit", num_classes=0).num_classes == 0  # kwargs override the preset


def test_demo_swinv2_loads_into_timm():
    arch, kwargs = PRESETS["demo_swinv2"]
    torch.manual_seed(0)
    ours = create_backbone("demo_swinv2").eval()
    ref = timm.create_model(arch, pretrained=False, **kwargs).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_fine_tune_from_simmim_weights():
    from pipeline.objectives.simmim import SimMIM

    torch.manual_seed(0)
    pre = SimMIM(create_backbone("demo_swinv2"))  # 64 px, window 4
    ft = create_backbone("demo_swinv2", img_size=128, window_size=8, pretrained_window_sizes=(4, 4, 4, 2))
    head = ft.head.fc.weight.clone()
    report = load_backbone_weights(ft, pre.state_dict())
    assert report["kept"] == ["head.fc.bias", "head.fc.weight"] and "mask_token" in report["ignored"]
    cpb = ft.layers[2].blocks[1].attn.cpb_mlp[0].weight
    assert torch.equal(cpb, pre.encoder.layers[2].blocks[1].attn.cpb_mlp[0].weight)
    assert torch.equal(ft.head.fc.weight, head)
    assert ft(torch.randn(1, 3, 128, 128)).shape == (1, 40)

    vit = SimMIM(create_backbone("demo_vit"))
    bigger = create_backbone("demo_vit", img_size=96, num_classes=10)  # 12x12 grid: pos_embed resampled
    load_backbone_weights(bigger, {"module." + k: v for k, v in vit.state_dict().items()})
    torch.testing.assert_close(bigger.pos_embed[:, 0], vit.encoder.pos_embed[:, 0])
    torch.testing.assert_close(bigger.blocks[3].mlp.fc2.weight, vit.encoder.blocks[3].mlp.fc2.weight)
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone_weights(create_backbone("demo_vit", embed_dim=64), vit.state_dict())


@pytest.mark.parametrize("name", ["resnet50", "vit_hgue_patch14_224", "swinv2_base_window7_224", "demo", ""])
def test_unknown_names_fail_with_one_line(name):
    with pytest.raises(ValueError) as e:
        create_backbone(name)
    assert isinstance(e.value, BackboneNameError) and "\n" not in str(e.value) and "model.name" in str(e.value)


CONFIGS = ["backbone/vit_h14_supervised.yaml", "backbone/swinv2_b_simmim_192.yaml",
           "backbone/swinv2_b_finetune_256.yaml", "demo/vit_supervised.yaml", "demo/swinv2_simmim.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_backbone_configs_build(path):
    """The configs' model sections build (on the meta device); their simmim masks fit the token grid."""
    cfg = yaml.safe_load((REPO / "configs" / path).read_text())
    with torch.device("meta"):
        model = create_backbone(cfg["model"]["name"], **cfg["model"].get("kwargs", {}))
    info = backbone_info(model)
    if cfg.get("task") == "simmim":
        from pipeline.objectives.simmim import random_patch_mask
        s = cfg["simmim"]
        mask = random_patch_mask(2, info.grid_size, s["mask_ratio"], s["mask_patch_size"], info.patch_size)
        assert mask.shape == (2, *info.grid_size)
