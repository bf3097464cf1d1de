"""Our layer-decay groups against timm's (`timm.optim.param_groups_layer_decay`, driven by the models'
`group_matcher`), parameter by parameter, on a timm ViT and on our SwinV2 (timm's SwinTransformerV2 subclass).

They agree on every parameter but two kinds, each exactly one decay step apart; these are why
pipeline/train/layer_decay.py keeps its own layer ids (its docstring and comments say so):
- the final `norm` (ViT, SwinV2): timm groups it with the last block, the MAE / BEiT / SimMIM fine-tuning
  recipes (and we) with the head, at lr x 1;
- SwinV2's patch merging `layers.s.downsample`: timm groups it with the first block of stage s, the Swin /
  SimMIM fine-tuning rule (and we) with the last block of stage s-1.
If a timm release changes its grouping, this test says where."""
import pytest
import timm
from timm.optim import param_groups_layer_decay

from pipeline.models.backbone import create_backbone
from pipeline.train.layer_decay import layer_decay_param_groups

DECAY, WD = 0.5, 0.05


def per_parameter(model, groups) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def ours_and_timms(model):
    ours = per_parameter(model, layer_decay_param_groups(model, 1.0, WD, DECAY))
    timms = per_parameter(model, param_groups_layer_decay(model, WD, no_weight_decay_list=model.no_weight_decay(),
                                                          layer_decay=DECAY))
    assert ours.keys() == timms.keys() == {n for n, _ in model.named_parameters()}
    return ours, timms


def assert_same_but(ours, timms, ours_one_step_higher=(), ours_one_step_lower=()):
    for name, (scale, wd) in ours.items():
        timm_scale, timm_wd = timms[name]
        assert wd == timm_wd, name
        if any(name.startswith(p) for p in ours_one_step_higher):
            assert scale == pytest.approx(timm_scale / DECAY), name
        elif any(name.startswith(p) for p in ours_one_step_lower):
            assert scale == pytest.approx(timm_scale * DECAY), name
        else:
            assert scale == pytest.approx(timm_scale), name


def test_timm_vit_differs_only_in_the_final_norm():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=3, num_heads=2, num_classes=5)
    ours, timms = ours_and_timms(model)
    assert_same_but(ours, timms, ours_one_step_higher=("norm.",))
    assert ours["norm.weight"][0] == ours["head.weight"][0] == 1.0  # with the head, as MAE's lr_decay.py
    assert timms["norm.weight"][0] == timms["blocks.2.norm1.weight"][0] == DECAY


def test_our_swinv2_differs_only_in_the_final_norm_and_patch_merging():
    model = create_backbone("demo_swinv2")  # depths (2, 2, 2, 2)
    assert isinstance(model, timm.models.swin_transformer_v2.SwinTransformerV2)
    ours, timms = ours_and_timms(model)
    merging = tuple(f"layers.{s}.downsample." for s in (1, 2, 3))
    assert_same_but(ours, timms, ours_one_step_higher=("norm.",), ours_one_step_lower=merging)
    assert ours["layers.1.downsample.reduction.weight"][0] == ours["layers.0.blocks.1.mlp.fc1.weight"][0]
    assert timms["layers.1.downsample.reduction.weight"][0] == timms["layers.1.blocks.0.mlp.fc1.weight"][0]
