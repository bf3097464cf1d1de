"""Gradient accumulation with full-batch negatives (pipeline/train/full_batch_accumulation.py): M micro-batches
give the loss and gradients of one batch M times the size, for the CLIP and the SigLIP loss."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_pipeline, train_overrides
from pipeline.config import load_config
from pipeline.objectives.clip_loss import clip_loss
from pipeline.objectives.siglip_loss import siglip_loss
from pipeline.tasks.registry import build_task
from pipeline.tasks.contrastive import contrastive_loss
from pipeline.train.full_batch_accumulation import full_batch_losses
from pipeline.train.metrics import read_metrics
from accumulation_step import BASE, step_samples

STEP_SCRIPT = REPO / "tests" / "train" / "accumulation_step.py"


class TinyDualEncoder(torch.nn.Module):
    """Two linear towers with dropout (the random state must replay), a logit scale and bias."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(10, 8), torch.nn.Linear(6, 8)
        self.drop = torch.nn.Dropout(0.3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, batch):
        return {"image_features": F.normalize(self.drop(self.image(batch["x"])), dim=-1),
                "text_features": F.normalize(self.drop(self.text(batch["y"])), dim=-1),
                "logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}


def _loss_fn(name):
    if name == "siglip":
        return lambda out: (siglip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                                        out["logit_bias"]), {})
    return lambda out: (clip_loss(out["image_features"], out["text_features"], out["logit_scale"]), {})


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_micro_batches_give_the_full_batch_loss_and_gradient(loss):
    """Single process, as DeepSpeed accumulates: each pass's loss / M backpropagated, one step. Micro-batches of
    unequal size (a batch that lost bad samples) and dropout, replayed: the gradient is the one-big-batch
    gradient taken under the same dropout masks."""
    g = torch.Generator().manual_seed(0)
    sizes = [5, 3, 5, 4]
    batches = [{"x": torch.randn(n, 10, generator=g), "y": torch.randn(n, 6, generator=g)} for n in sizes]
    torch.manual_seed(0)
    model = TinyDualEncoder()
    loss_of = _loss_fn(loss)

    # the reference: the same dropout masks, drawn micro-batch by micro-batch as in the accumulated step
    torch.manual_seed(7)
    outs = [model(b) for b in batches]
    full = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    full.update(logit_scale=outs[0]["logit_scale"], logit_bias=outs[0]["logit_bias"])
    expected, _ = loss_of(full)
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    torch.manual_seed(7)
    losses = []
    for micro_loss, _ in full_batch_losses(model, loss_of, batches, ("image_features", "text_features"),
                                           torch.device("cpu")):
        (micro_loss / len(batches)).backward()  # what engine.backward does with gradient_accumulation_steps
        losses.append(micro_loss.detach())
    for value in losses:  # every pass is the full-batch loss: the cached features equal the live ones
        torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-7)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7, msg=name)
    # per-micro-batch negatives would give another gradient: the test can tell them apart
    model.zero_grad()
    torch.manual_seed(7)
    for b in batches:
        (loss_of(model(b))[0] / len(batches)).backward()
    assert not torch.allclose(model.image.weight.grad, reference["image.weight"], rtol=1e-2)
    # after the step the generator stands where one pass over the micro-batches leaves it
    torch.manual_seed(7)
    for b in batches:
        model(b)
    after_one_pass = torch.rand(1)
    torch.manual_seed(7)
    for micro_loss, _ in full_batch_losses(model, loss_of, batches, ("image_features", "text_features"),
                                           torch.device("cpu")):
        micro_loss.backward()
    assert torch.equal(torch.rand(1), after_one_pass)


def _reference(overrides: list[str], global_batch: int) -> tuple[torch.Tensor, dict]:
    """The whole step as one batch in this process, without DeepSpeed: loss and gradients."""
    cfg = load_config(None, BASE + overrides + ["train.grad_accum=1"])
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    model = task.model.train()
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    batch = step_samples(0, global_batch, size, task.tokenizer.context_length)
    out = model(task.decoder.image.model_input(batch["images"], "cpu", torch.float32), batch["texts"])
    loss = contrastive_loss(out, cfg)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _child_env() -> dict:
    """This checkout first on the path (a script run by path would import the installed package), no launcher
    variables of an enclosing job."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _run_step(tmp_path, nproc: int, overrides: list[str]) -> dict:
    out = tmp_path / "step.pt"
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
              if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launch, STEP_SCRIPT, out, *overrides], cwd=REPO, env=_child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


def _check_step(result: dict, overrides: list[str], global_batch: int, accum: int) -> None:
    loss, grads = _reference(overrides, global_batch)
    assert (result["global_steps"], result["micro_steps"]) == (1, accum)  # M backward calls, one optimizer step
    torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-6)
    for name, ref in grads.items():
        got = result["grads"][name]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=name)


@pytest.mark.parametrize("loss", ["clip", pytest.param("siglip", marks=pytest.mark.slow)])
def test_one_rank_deepspeed_step_equals_one_big_batch(tmp_path, loss):
    """Through a real DeepSpeed engine (one rank: the plain step): 4 micro-batches of 6 = one batch of 24."""
    overrides = [f"loss.name={loss}", "train.grad_accum=4", "train.batch_size=6"]
    _check_step(_run_step(tmp_path, 1, overrides), overrides, 24, 4)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_rank_deepspeed_step_equals_one_big_batch(tmp_path, loss, stage):
    """2 gloo ranks under torchrun, 4 micro-batches of 3 per rank = one batch of 24 in one process (features
    gathered across ranks, or the SigLIP ring), at ZeRO-0 (DeepSpeed's all-reduce, our step) and ZeRO-2 / 3."""
    overrides = [f"loss.name={loss}", "train.grad_accum=4", "train.batch_size=3", f"train.zero_stage={stage}"]
    _check_step(_run_step(tmp_path, 2, overrides), overrides, 24, 4)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/demo/clip_tiny.yaml", "configs/siglip/tiny_demo.yaml"],
                         ids=["clip", "siglip"])
def test_accumulated_run_tracks_the_big_batch_run(demo_data, tmp_path, config):
    """2 ranks x 4 micro-batches of 16 against 2 ranks x 64: every step sees the same 128 samples (the loader
    hands out global batches in order; augmentation is seeded per sample) at the same weights, so the losses
    differ only by fp32 summation order, which the optimizer carries forward: measured 2e-7 relative over 4 steps
    (CPU, fp32). Per-micro-batch negatives (32 pairs instead of 128) would be off by ~ln(128/32) = 1.4 nats at
    the first step, so 1e-4 separates the two by four orders of magnitude."""
    runs = {}
    for name, extra in (("accum", {"train.batch_size": 16, "train.grad_accum": 4}),
                        ("big", {"train.batch_size": 64})):
        out = tmp_path / name
        run_pipeline("train", "--config", REPO / config, "--nproc-per-node", "2",
                     *train_overrides(demo_data, out, **{"train.steps": 4, "train.ckpt_every": 0,
                                                         "train.eval_at_end": "false", **extra}))
        runs[name] = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    accum, big = runs["accum"], runs["big"]
    assert len(accum) == len(big) == 4
    assert accum[0] == pytest.approx(big[0], rel=1e-5)  # same weights, same pairs: rounding only
    assert accum == pytest.approx(big, rel=1e-4)
