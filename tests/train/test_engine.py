"""The DeepSpeed configuration per world size / ZeRO stage, and the plain step's clipping and non-finite guard."""
import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.train.engine import PlainStep, deepspeed_config, plain_step


def _cfg(**overrides):
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("world, stage, ckpt_stage, precision, plain, ds_stage", [
    (1, 1, 0, "fp32", True, 0),    # one rank holds everything: nothing to partition
    (1, 3, 0, "bf16", True, 0),
    (8, 0, 0, "bf16", True, 0),    # ZeRO off on many ranks: DeepSpeed all-reduces, the step is ours
    (8, 1, 0, "bf16", False, 1),   # ZeRO-1 on many ranks: DeepSpeed's ZeRO optimizer
    (8, 3, 0, "fp32", False, 3),
    (1, 2, 2, "fp32", False, 2),   # resuming a ZeRO-2 checkpoint on one rank keeps ZeRO (its optimizer files)
    (1, 0, 1, "fp32", False, 1),
    (1, 0, 0, "fp16", False, 0),   # fp16 keeps DeepSpeed's loss scaling
])
def test_engine_configuration_per_world_size_and_stage(world, stage, ckpt_stage, precision, plain, ds_stage):
    cfg = _cfg(**{"train.zero_stage": stage, "train.precision": precision, "train.grad_clip": 1.0})
    ds = deepspeed_config(cfg, world, ckpt_stage)
    assert plain_step(cfg, world, ckpt_stage) is plain
    assert ds["zero_optimization"]["stage"] == ds_stage
    assert ds["timers"]["throughput"]["enabled"] is False  # its default synchronises the device twice per step
    if plain:  # clipping is PlainStep's (DeepSpeed's is off: its default is 1.0); bf16 is autocast over fp32 weights
        assert ds["gradient_clipping"] == 0.0 and "bf16" not in ds
        assert ds.get("torch_autocast", {}).get("enabled", False) is (precision == "bf16")
    else:
        assert ds["gradient_clipping"] == 1.0 and "torch_autocast" not in ds
        assert ("bf16" in ds) is (precision == "bf16") and ("fp16" in ds) is (precision == "fp16")


def test_no_clipping_means_none_from_deepspeed_either():
    """train.grad_clip=0 on ZeRO: DeepSpeed must be told 0 (without the key it clips at 1.0)."""
    ds = deepspeed_config(_cfg(**{"train.zero_stage": 2, "train.grad_clip": 0}), 4)
    assert ds["gradient_clipping"] == 0.0


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)


def _backward(model, scale=1.0):
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    (model(x).square().mean() * scale).backward()


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e6])
def test_plain_step_clips_as_torch_does(max_norm):
    ours, opt_ours = _model_and_optimizer()
    theirs, opt_theirs = _model_and_optimizer()
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            _backward(model, 10.0)
        step = PlainStep(opt_ours, max_norm)
        step.before_step()
        norm = (torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm) if max_norm
                else torch.nn.utils.get_total_norm([p.grad for p in theirs.parameters()]))
        opt_ours.step()
        opt_theirs.step()
        assert torch.equal(step.grad_norm, norm)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert step.grad_norm > 0.05  # the clipping cases did clip


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradients_skip_the_update_on_the_device(bad):
    model, opt = _model_and_optimizer()
    step = PlainStep(opt, 1.0)
    _backward(model)
    step.before_step()
    opt.step()  # one good step: moments exist
    saved = [p.detach().clone() for p in model.parameters()]
    moments = [(k, v.clone()) for p in model.parameters() for k, v in opt.state[p].items() if k != "step"]
    opt.zero_grad(set_to_none=True)
    _backward(model)
    next(model.parameters()).grad.view(-1)[3] = bad
    step.before_step()
    assert not math.isfinite(step.grad_norm.item())
    opt.step()
    for p, before in zip(model.parameters(), saved):
        assert torch.equal(p, before)
        assert opt.state[p]["step"].item() == 1  # the skipped step is not counted (Adam's bias correction)
    now = [v for p in model.parameters() for k, v in opt.state[p].items() if k != "step"]
    assert all(torch.equal(v, m) for v, (_, m) in zip(now, moments))
    opt.zero_grad(set_to_none=True)
    _backward(model)
    step.before_step()
    opt.step()  # and training goes on
    assert all(not torch.equal(p, before) for p, before in zip(model.parameters(), saved))
