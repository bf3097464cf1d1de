"""The SigLIP knobs of the contrastive task: initial t' and b, and b's own learning rate."""
import math

import pytest
import torch

from conftest import REPO
from pipeline.config import load_config
from pipeline.tasks.contrastive import ContrastiveTask
from pipeline.train.engine import param_groups

SIGLIP = REPO / "configs" / "siglip" / "tiny_demo.yaml"


def test_siglip_defaults_are_the_papers_init():
    cfg = load_config(None, ["loss.name=siglip"])
    model = ContrastiveTask(cfg).model
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0


def test_init_overrides_reach_the_model_and_clip_ignores_them():
    over = ["loss.siglip_init_scale=20", "loss.siglip_init_bias=-5"]
    model = ContrastiveTask(load_config(None, ["loss.name=siglip", *over])).model
    assert model.logit_scale.exp().item() == pytest.approx(20.0)
    assert model.logit_bias.item() == -5.0
    clip = ContrastiveTask(load_config(None, over)).model
    assert not hasattr(clip, "logit_bias") or clip.logit_bias is None
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's CLIP init


def test_bias_lr_scale_gives_b_its_own_group_and_nothing_else_changes():
    cfg = load_config(SIGLIP, ["loss.siglip_bias_lr_scale=10", "train.lr=1e-3", "train.weight_decay=0.1"])
    task = ContrastiveTask(cfg)
    groups = task.param_groups()
    assert groups[-1]["params"] == [task.model.logit_bias]
    assert groups[-1]["lr"] == pytest.approx(1e-2) and groups[-1]["weight_decay"] == 0.0
    default = param_groups(task.model, 0.1)
    ours = [p for g in groups for p in g["params"]]
    assert sorted(map(id, ours)) == sorted(id(p) for g in default for p in g["params"])  # each parameter once
    assert [g["weight_decay"] for g in groups[:2]] == [g["weight_decay"] for g in default]
    assert all("lr" not in g for g in groups[:2])  # the rest follows train.lr
    assert ContrastiveTask(load_config(SIGLIP)).param_groups() is None  # scale 1: the engine's default groups
    torch.optim.AdamW(groups, lr=1e-3)  # a valid optimizer spec


def test_bias_lr_scale_with_layer_decay_scales_bs_own_layer_lr():
    over = ["train.lr=1e-3", "train.layer_decay=0.5"]
    task = ContrastiveTask(load_config(SIGLIP, ["loss.siglip_bias_lr_scale=10", *over]))
    groups = task.param_groups()
    assert groups[-1]["params"] == [task.model.logit_bias] and groups[-1]["weight_decay"] == 0.0
    plain = ContrastiveTask(load_config(SIGLIP, over))
    without = plain.param_groups()
    home = next(g for g in without if any(p is plain.model.logit_bias for p in g["params"]))
    assert groups[-1]["lr"] == pytest.approx(10 * home["lr"])
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in without)  # b moved, not copied
    assert min(g["lr"] for g in groups[:-1]) < 1e-3  # the layer decay is still there
