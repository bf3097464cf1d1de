"""Layer-wise lr decay: the scale of every parameter of a tiny ViT and a tiny SwinV2, weight-decay exclusions,
and that the groups drive torch's AdamW + LambdaLR as the trainer uses them."""
import pytest
import timm
import torch

from pipeline.models.backbone import create_backbone
from pipeline.objectives.simmim import SimMIM
from pipeline.train.layer_decay import layer_decay_param_groups, layer_ids


def by_param(groups):
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = g
    return out


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, num_classes=5)


def test_vit_scales():
    model, decay, base = tiny_vit(), 0.5, 1e-3
    groups = layer_decay_param_groups(model, base, 0.05, decay)
    of = by_param(groups)
    assert len(of) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    expected_layer = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "patch_embed.proj.bias": 0,
                      "norm.weight": 4, "norm.bias": 4, "head.weight": 4, "head.bias": 4}
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else expected_layer[name]
        g = of[id(p)]
        assert g["layer_id"] == layer, name
        assert g["lr_scale"] == pytest.approx(decay ** (4 - layer)), name
        assert g["lr"] == pytest.approx(base * decay ** (4 - layer)), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    # blocks.0 -> decay^3, blocks.2 -> decay^1, embeddings decay^4, head 1
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales == pytest.approx({0: 1 / 16, 1: 1 / 8, 2: 1 / 4, 3: 1 / 2, 4: 1.0})


def test_swinv2_layer_ids():
    model = create_backbone("demo_swinv2")  # depths (2, 2, 2, 2): blocks 1..8, head 9
    ids, max_id = layer_ids(model)
    assert max_id == 9
    assert ids["patch_embed.proj.weight"] == 0 and ids["patch_embed.norm.bias"] == 0
    assert ids["layers.0.blocks.0.attn.qkv.weight"] == 1 and ids["layers.0.blocks.1.mlp.fc2.bias"] == 2
    assert ids["layers.1.downsample.reduction.weight"] == 2  # with the last block of stage 0 (SimMIM's rule)
    assert ids["layers.1.blocks.0.attn.cpb_mlp.0.weight"] == 3
    assert ids["layers.3.downsample.norm.weight"] == 6 and ids["layers.3.blocks.1.norm2.weight"] == 8
    assert ids["norm.weight"] == 9 and ids["head.fc.weight"] == 9
    groups = layer_decay_param_groups(model, 1.0, 0.05, 0.9)
    of = by_param(groups)
    for name, p in model.named_parameters():
        assert of[id(p)]["lr_scale"] == pytest.approx(0.9 ** (9 - ids[name]))
        if "cpb_mlp" in name or "logit_scale" in name or p.ndim == 1:
            assert of[id(p)]["weight_decay"] == 0.0, name


def test_swinv2_b_ids_match_the_swin_finetune_rule():
    with torch.device("meta"):
        model = create_backbone("swinv2_base_window16_256")
    ids, max_id = layer_ids(model)
    assert max_id == 25  # 24 blocks + 1
    assert ids["layers.2.blocks.17.mlp.fc1.weight"] == 2 + 2 + 17 + 1
    assert ids["layers.3.downsample.reduction.weight"] == 22 and ids["layers.3.blocks.0.norm1.weight"] == 23


def test_simmim_wrapper_and_no_decay_names():
    model = SimMIM(create_backbone("demo_vit"))
    groups = layer_decay_param_groups(model, 1.0, 0.05, 0.75, no_weight_decay_names=("blocks.0.attn.qkv.weight",))
    of = by_param(groups)
    named = dict(model.named_parameters())
    assert of[id(named["mask_token"])]["layer_id"] == 0 and of[id(named["mask_token"])]["weight_decay"] == 0.0
    assert of[id(named["encoder.pos_embed"])]["weight_decay"] == 0.0
    assert of[id(named["decoder.0.weight"])]["lr_scale"] == 1.0
    assert of[id(named["encoder.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.0  # a dotted suffix
    assert of[id(named["encoder.blocks.1.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert of[id(named["encoder.blocks.3.mlp.fc1.weight"])]["lr_scale"] == pytest.approx(0.75)


def test_groups_drive_adamw_and_lambdalr():
    model = tiny_vit()
    groups = layer_decay_param_groups(model, 1e-3, 0.05, 0.5)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 * (s + 1))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * 0.2)
    frozen = tiny_vit()
    frozen.patch_embed.requires_grad_(False)
    assert not any(p is frozen.patch_embed.proj.weight for g in layer_decay_param_groups(frozen, 1, 0, 0.5)
                   for p in g["params"])
    with pytest.raises(ValueError):
        layer_decay_param_groups(model, 1e-3, 0.05, 1.5)


def test_clip_towers_decay_from_their_own_top():
    """CLIP: each tower's blocks get decay^(depth - block) from that tower's top; frozen parts get no group;
    weight decay follows CLIP's rule (positional embeddings decayed, norms / biases / logit scale not)."""
    from pipeline.models.clip import create_clip, promote_scalar_params
    from pipeline.train.engine import no_weight_decay

    model, *_ = create_clip("clip-tiny")  # 4 image blocks, 4 text blocks
    promote_scalar_params(model)
    decay, base = 0.5, 1e-3
    model.visual.conv1.weight.requires_grad = False
    groups = layer_decay_param_groups(model, base, 0.1, decay, no_weight_decay_fn=no_weight_decay)
    of = by_param(groups)
    assert id(model.visual.conv1.weight) not in of
    assert len(of) == sum(1 for p in model.parameters() if p.requires_grad)
    expected = {"visual.class_embedding": 5, "visual.positional_embedding": 5, "visual.ln_pre.weight": 5,
                "visual.transformer.resblocks.0.attn.in_proj_weight": 4,
                "visual.transformer.resblocks.3.mlp.c_fc.weight": 1, "visual.ln_post.weight": 0, "visual.proj": 0,
                "token_embedding.weight": 5, "positional_embedding": 5, "transformer.resblocks.1.ln_1.weight": 3,
                "ln_final.bias": 0, "text_projection": 0, "logit_scale": 0}
    params = dict(model.named_parameters())
    for name, steps_below_top in expected.items():
        g = of[id(params[name])]
        assert g["lr"] == pytest.approx(base * decay ** steps_below_top), name
        assert g["weight_decay"] == (0.0 if no_weight_decay(name, params[name]) else 0.1), name
    assert of[id(params["positional_embedding"])]["weight_decay"] == 0.1
