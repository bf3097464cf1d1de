"""The plan verb: exact parameter counts, ZeRO memory arithmetic, the activation formula, warnings, the CLI."""
import dataclasses
import json

import open_clip
import pytest
import torch

from conftest import REPO, run_pipeline
from pipeline.config import ConfigError, load_config
from pipeline.models.clip import clip_step_flops, create_clip
from pipeline.plan import (BUSY_TOKENS, Block, GiB, activation_bytes_per_sample, block_bytes, flops_per_sample,
                           gpus_from_args, meta_model, model_state_bytes, plan_run, recommend, towers)
from pipeline.plan_report import format_plan

VIT_H14 = REPO / "configs" / "clip" / "vit_h14.yaml"
VIT_H14_PARAMS = 986_109_441  # sum(p.numel()) of open_clip.create_model("ViT-H-14") allocated on the CPU


@pytest.fixture(scope="module")
def vit_h():
    return meta_model("ViT-H-14")


def test_vit_h14_parameter_count_is_open_clips(vit_h):
    with torch.device("meta"):
        theirs = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    assert sum(p.numel() for p in theirs.parameters()) == VIT_H14_PARAMS
    plan = plan_run(load_config(VIT_H14), 64, model=vit_h)
    assert plan.params == VIT_H14_PARAMS
    assert plan.params_image == sum(p.numel() for p in theirs.visual.parameters()) == 632_076_800
    assert plan.params_image + plan.params_text == VIT_H14_PARAMS


def test_small_model_count_matches_a_real_model():
    model, *_ = create_clip("clip-tiny")
    plan = plan_run(load_config(REPO / "configs" / "demo" / "clip_tiny.yaml"), 2)
    assert plan.params == sum(p.numel() for p in model.parameters())


def test_towers_and_flops_of_vit_h14(vit_h):
    image, text = towers(vit_h)
    assert (len(image.blocks), image.tokens, len(text.blocks), text.tokens) == (32, 257, 24, 77)
    assert image.blocks[0] == Block(257, 1280, 16, 5120) and text.blocks[0] == Block(77, 1024, 16, 4096)
    # the trainer's own count, and 3 x open_clip's 381.7 forward GFLOPs per pair. Counted by FlopCounterMode
    # since issue 19: 1,145.04 GFLOP; the analytic count it replaced (6 x 2-D parameters x tokens + attention
    # scores) gave 1,145.90: it applied the output projections to every token (they run on one pooled token)
    # and left out the convolutional patch embedding, which the counter sees
    assert flops_per_sample(vit_h) == clip_step_flops(vit_h)
    assert flops_per_sample(vit_h) / 3 / 1e9 == pytest.approx(381.7, rel=0.001)


def test_zero_stage_arithmetic():
    n, d = 1000, 10
    # ZeRO on several ranks: bf16 params and grads, fp32 master + 2 moments in the optimizer
    assert model_state_bytes(n, 2, 1, d) == (2000, 2000, 1200)
    assert model_state_bytes(n, 2, 2, d) == (2000, 200, 1200)
    assert model_state_bytes(n, 2, 3, d) == (200, 200, 1200)
    # the plain step (stage 0, or any stage on one rank): fp32 weights (+ bf16 autocast copies), grads, 2 moments
    assert model_state_bytes(n, 2, 0, d) == (6000, 4000, 8000)
    assert model_state_bytes(n, 4, 0, d) == (4000, 4000, 8000)
    assert all(model_state_bytes(n, 2, stage, 1) == (6000, 4000, 8000) for stage in range(4))


def test_activation_formula():
    b = Block(tokens=10, width=8, heads=2, mlp_hidden=32)
    assert block_bytes(b, 2, fused=True) == 2 * 10 * (8 * 8 + 2 * 32) + 4 * 2 * 10
    assert block_bytes(b, 2, fused=False) == 2 * 10 * (8 * 8 + 2 * 32) + 2 * 2 * 10 * 10
    # f = 4h, p = 2: Korthikanti's s*h*(34 + 5as/h) without dropout = s*h*(32 + 2as/h)
    k = Block(tokens=100, width=64, heads=4, mlp_hidden=256)
    assert block_bytes(k, 2, fused=False) == 100 * 64 * (32 + 2 * 4 * 100 / 64)

    class T:  # two towers of one block each
        def __init__(self, blocks):
            self.blocks = blocks
    ckpt, full = activation_bytes_per_sample([T([b]), T([k])], 2, True)
    assert full == block_bytes(b, 2, True) + block_bytes(k, 2, True)
    assert ckpt == 2 * 10 * 8 + 2 * 100 * 64 + block_bytes(k, 2, True)  # inputs + one block recomputed


def test_vit_h14_on_64_gpus_fits_with_checkpointing_only(vit_h):
    plan = plan_run(load_config(VIT_H14), 64, gpu_mem_gb=80, model=vit_h)
    assert (plan.micro_batch, plan.global_batch, plan.precision) == (1280, 81920, "bf16")
    s0, s2 = plan.stages[0], plan.stages[2]
    assert s0.states == pytest.approx(18 * VIT_H14_PARAMS)
    assert s2.states == pytest.approx(2 * VIT_H14_PARAMS + 14 * VIT_H14_PARAMS / 64)
    assert all(s.fits_ckpt and not s.fits_full for s in plan.stages)
    assert s2.max_micro_batch_ckpt >= 1280 > s2.max_micro_batch_full
    assert plan.warnings == []
    assert plan.step_time_s == pytest.approx(81920 * plan.flops_per_sample / (64 * 0.4 * 989e12))


def test_warning_when_nothing_fits(vit_h):
    plan = plan_run(load_config(VIT_H14), 8, gpu_mem_gb=80, model=vit_h)  # 10240 pairs per GPU
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("WARNING:")
    assert "does not fit in 80 GiB at any ZeRO stage" in plan.warnings[0]
    assert "train.grad_accum=" in plan.warnings[0]
    one_gpu = plan_run(load_config(VIT_H14), 1, gpu_mem_gb=8, model=vit_h)  # 14.7 GiB of states even at ZeRO-3
    assert "model states alone do not fit" in one_gpu.warnings[0]


def test_warning_when_the_configs_choice_does_not_fit(vit_h):
    cfg = load_config(VIT_H14, ["model.activation_checkpointing=false"])
    plan = plan_run(cfg, 64, model=vit_h)
    assert "config's choice (ZeRO-2 without activation checkpointing)" in plan.warnings[0]


def test_batch_that_does_not_divide_is_a_config_error(vit_h):
    with pytest.raises(ConfigError, match="not divisible"):
        plan_run(load_config(VIT_H14), 7, model=vit_h)


def test_gpus_from_nodes():
    assert gpus_from_args(64, None, None) == 64
    assert gpus_from_args(None, 4, None) == 32 and gpus_from_args(None, 3, 4) == 12 and gpus_from_args(12, 3, 4) == 12
    for bad in [(None, None, None), (64, 2, 8), (None, None, 8), (None, 0, 8)]:
        with pytest.raises(ValueError):
            gpus_from_args(*bad)


def test_plan_serialises(vit_h):
    data = json.loads(json.dumps(plan_run(load_config(VIT_H14), 64, model=vit_h).to_dict()))
    assert data["params"] == VIT_H14_PARAMS and len(data["stages"]) == 4 and data["towers"][0]["name"] == "image"


def test_cli_prints_the_table_and_the_warning(capsys):  # in-process: a CLI start costs 10-25 s of imports here
    from pipeline.__main__ import main

    assert main(["plan", "--config", str(VIT_H14), "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gb", "80",
                 "--mfu", "0.4", "--peak-tflops", "989"]) == 0
    out = capsys.readouterr().out
    assert f"{VIT_H14_PARAMS:,} parameters" in out and "on 8 GPUs x 80 GiB" in out
    table = out[out.index(" ZeRO"):].splitlines()
    assert [line[:5].strip(" *") for line in table[2:6]] == ["0", "1", "2", "3"]
    assert table[4].startswith("*")  # the config's stage
    assert out.splitlines()[-1].startswith("WARNING: ViT-H-14 at 10240 samples per GPU")
    assert main(["plan", "--config", str(VIT_H14), "--gpus", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not divisible" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", "--config", str(VIT_H14)]) == 2 and "--gpus" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_verb_as_a_command():
    out = run_pipeline("plan", "--config", VIT_H14, "--gpus", "64", "--json").stdout
    assert json.loads(out)["params"] == VIT_H14_PARAMS


def test_accumulation_keeps_the_global_batchs_negatives_and_costs_one_forward(vit_h):
    one = plan_run(load_config(VIT_H14), 64, model=vit_h)
    four = plan_run(load_config(VIT_H14, ["train.grad_accum=4"]), 64, model=vit_h)
    assert (one.micro_batch, four.micro_batch) == (1280, 320)
    assert one.negatives == four.negatives == 81919
    assert four.step_time_s == pytest.approx(one.step_time_s * 4 / 3)  # the forward of the cached features
    # the loss term is the whole step's (1280 rows x 81920 columns) in both: only the micro-batch part shrinks
    per_sample_input = 3 * 224 * 224 * 2 + 8 * 77
    assert one.act_batch_ckpt - four.act_batch_ckpt == pytest.approx(
        (1280 - 320) * (one.act_per_sample_ckpt + per_sample_input))
    assert "negatives: 81,919 per pair" in format_plan(four) and "4 micro-steps" in format_plan(four)
    nothing_fits = plan_run(load_config(VIT_H14), 8, gpu_mem_gb=80, model=vit_h)
    assert "every pair keeps its 81,919 negatives" in nothing_fits.warnings[0]


def test_recommendation_turns_checkpointing_off_where_the_batch_fits_without_it(vit_h):
    # the config's 81,920 pairs on 640 GPUs: 128 each fit without checkpointing on 80 GiB, not on 40 GiB
    roomy = plan_run(load_config(VIT_H14), 640, gpu_mem_gb=80, model=vit_h)
    rec = roomy.recommendation
    assert roomy.stages[2].fits_full and roomy.stages[2].total_full <= 80 * GiB
    assert (rec.zero_stage, rec.activation_checkpointing, rec.micro_batch, rec.grad_accum, rec.work) == (
        2, False, 128, 1, 1.0)
    assert rec.overrides() == ["train.zero_stage=2", "model.activation_checkpointing=false", "train.grad_accum=1"]
    tight = plan_run(load_config(VIT_H14), 640, gpu_mem_gb=40, model=vit_h)
    assert not tight.stages[2].fits_full and tight.stages[2].fits_ckpt
    assert (tight.recommendation.activation_checkpointing, tight.recommendation.micro_batch) == (True, 128)
    assert tight.recommendation.work == pytest.approx(4 / 3)
    assert "recommended (the config's choice): ZeRO-2, activation checkpointing on" in format_plan(tight)
    assert "model.activation_checkpointing=false" in format_plan(roomy)


def test_recommendation_weighs_recomputation_against_accumulation(vit_h):
    # one H200: both settings need accumulation (its cached features: x4/3); checkpointing would add its own x4/3
    one = plan_run(load_config(VIT_H14), 1, gpu_mem_gb=139.8, model=vit_h)
    st, rec = one.stages[2], one.recommendation
    assert not rec.activation_checkpointing and rec.work == pytest.approx(4 / 3)
    assert rec.micro_batch <= st.max_micro_batch_full < 2 * rec.micro_batch  # the largest divisor that fits
    assert 81920 % rec.micro_batch == 0 and rec.micro_batch * rec.grad_accum == 81920
    assert rec.micro_batch * 257 >= BUSY_TOKENS and rec.busy


def test_recommendation_prefers_checkpointing_to_a_micro_batch_too_small_to_keep_the_gpu_busy():
    cfg = load_config(REPO / "configs" / "demo" / "clip_tiny.yaml", ["train.global_batch_size=1024"])
    plan = plan_run(cfg, 1, gpu_mem_gb=4.3)
    tokens = plan.towers[0].tokens
    st, rec = plan.stages[plan.config_zero_stage], plan.recommendation
    without = 1024 // next(k for k in range(1, 1025) if 1024 % k == 0 and 1024 // k <= st.max_micro_batch_full)
    assert without * tokens < BUSY_TOKENS  # fits without checkpointing, at a micro-batch under the busy mark
    assert rec.activation_checkpointing and rec.micro_batch * tokens >= BUSY_TOKENS
    assert rec.micro_batch <= st.max_micro_batch_ckpt and rec.work == pytest.approx(16 / 9)


def test_recommendation_keeps_the_configs_stage_and_takes_zero3_only_when_nothing_else_fits(vit_h):
    plan = plan_run(load_config(VIT_H14), 640, gpu_mem_gb=80, model=vit_h)

    def with_caps(caps):  # (max micro-batch with, without checkpointing) per stage
        stages = [dataclasses.replace(s, max_micro_batch_ckpt=c, max_micro_batch_full=f)
                  for s, (c, f) in zip(plan.stages, caps)]
        return recommend(dataclasses.replace(plan, stages=stages))

    # ZeRO-3 would run 128 per micro-step without checkpointing; ZeRO-2 (the config's) needs 4 micro-steps
    rec = with_caps([(0, 0), (0, 0), (200, 50), (5000, 5000)])
    assert (rec.zero_stage, rec.activation_checkpointing, rec.micro_batch) == (2, True, 128)
    rec = with_caps([(0, 0), (0, 0), (0, 50), (5000, 5000)])
    assert (rec.zero_stage, rec.activation_checkpointing, rec.micro_batch, rec.grad_accum) == (2, False, 32, 4)
    rec = with_caps([(900, 900), (900, 900), (0, 0), (5000, 5000)])  # stages below the config's are not offered
    assert (rec.zero_stage, rec.micro_batch) == (3, 128)
    assert with_caps([(900, 900)] * 2 + [(0, 0)] * 2) is None
