"""The training run: validate -> process group -> model + data + engine -> resume -> steps -> checkpoints -> eval.

A sample's path: shards (pipeline/data/loader.py) -> open_clip model (pipeline/models/clip.py) ->
CLIP loss over all ranks (pipeline/objectives/clip_loss.py) -> DeepSpeed step (pipeline/train/engine.py).
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ConfigError, RunConfig, resolve_batch, to_dict, to_yaml
from pipeline.data.loader import (DataError, ImageTextBatches, LoaderSpec, ShardSet, expand_shards,
                                  make_train_loader)
from pipeline.models.clip import check_model_name, clip_flops_per_sample, create_clip, promote_scalar_params
from pipeline.objectives.clip_loss import clip_loss
from pipeline.objectives.siglip_loss import siglip_loss
from pipeline.train.checkpoint import find_checkpoint, load_checkpoint, remove_partials, save_checkpoint
from pipeline.train.distributed import DistEnv, init_process_group
from pipeline.train.engine import build_engine
from pipeline.train.metrics import MetricsLog


def validate_run(cfg: RunConfig, world_size: int) -> None:
    """Everything that can be checked before a process group starts; raises ConfigError / DataError."""
    resolve_batch(cfg, world_size)
    check_model_name(cfg.model.name)
    expand_shards(cfg.data.train, "data.train")
    if cfg.data.val:
        expand_shards(cfg.data.val, "data.val")
    if cfg.data.classes and not Path(cfg.data.classes).is_file():
        raise ConfigError(f"data.classes: file not found: {cfg.data.classes}")
    if cfg.train.precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={cfg.train.precision} needs a GPU; use fp32 (or auto) on the CPU")
    resume = cfg.train.resume
    if resume not in ("none", "auto"):
        try:
            find_checkpoint(Path(cfg.train.out_dir) / "checkpoints", resume)
        except FileNotFoundError as e:
            raise ConfigError(f"train.resume: {e}") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class BadSampleBudget:
    """Counts skipped samples by reason; stops the run once more than `max_fraction` of samples failed."""

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.bad: Counter = Counter()
        self.seen = 0

    def add(self, batch: dict, batch_size: int) -> None:
        self.bad.update(batch["bad"])
        self.seen += batch_size
        n_bad = sum(self.bad.values())
        if not batch["keys"] or (self.seen >= 1000 and n_bad > self.max_fraction * self.seen):
            reasons = ", ".join(f"{k}: {v}" for k, v in self.bad.most_common())
            raise DataError(f"{n_bad} of {self.seen} training samples failed to decode ({reasons}), more than "
                            f"data.max_bad_fraction={self.max_fraction}")


def run_training(cfg: RunConfig, env: DistEnv) -> dict:
    """Trains; returns the final evaluation results (rank 0) or {}."""
    validate_run(cfg, env.world_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    init_process_group(env, "nccl" if use_cuda else "gloo")
    t = cfg.train
    out_dir = Path(t.out_dir)
    ckpt_root = out_dir / "checkpoints"
    is_main = env.rank == 0
    config_yaml = to_yaml(cfg)  # the resolved config, saved with every checkpoint
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_partials(ckpt_root)
        (out_dir / "config.yaml").write_text(config_yaml)
    dist.barrier()

    _seed_everything(t.seed)  # same seed on every rank: identical initial weights
    model, train_tf, eval_tf, tokenizer = create_clip(cfg.model.name, cfg.model.activation_checkpointing,
                                                      cfg.loss.name)
    promote_scalar_params(model)
    engine, _ = build_engine(model, cfg, env.world_size)

    start_step, next_batch = 0, 0
    resume_from = find_checkpoint(ckpt_root, t.resume)
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        if state["world_size"] != env.world_size or state["batch_size"] != t.batch_size:
            raise ConfigError(f"checkpoint {resume_from} was written with world_size={state['world_size']}, "
                              f"batch_size={state['batch_size']}; this run has {env.world_size}, {t.batch_size}")
        start_step, next_batch = state["step"], state["next_batch"]
        if is_main:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)

    shards = ShardSet(expand_shards(cfg.data.train, "data.train"))
    spec = LoaderSpec(t.batch_size, env.rank, env.world_size, t.seed, cfg.data.shuffle_block)
    dataset = ImageTextBatches(shards, spec, train_tf, tokenizer, start_batch=next_batch)
    batches = iter(make_train_loader(dataset, cfg.data.workers, pin_memory=use_cuda))
    device = engine.device
    param_dtype = next(engine.module.parameters()).dtype
    image_size = engine.module.visual.image_size[0]
    flops_per_sample = clip_flops_per_sample(engine.module, image_size, tokenizer.context_length)

    metrics = MetricsLog(out_dir, t.steps, start_step, t.progress and is_main) if is_main else None
    budget = BadSampleBudget(cfg.data.max_bad_fraction)
    samples_seen = start_step * t.global_batch_size
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

    def client_state(step: int) -> dict:
        return {"step": step, "next_batch": next_batch, "samples_seen": samples_seen,
                "world_size": env.world_size, "batch_size": t.batch_size, "seed": t.seed,
                "epoch": next_batch // dataset.batches_per_epoch, "config": to_dict(cfg)}

    step = start_step
    loss_sum = torch.zeros((), device=device)
    while step < t.steps:
        for _ in range(t.grad_accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - wait_start
            assert batch["batch"] == next_batch, "loader order broken"
            next_batch += 1
            budget.add(batch, t.batch_size)
            out = engine(batch["images"].to(device, param_dtype, non_blocking=True),
                         batch["texts"].to(device, non_blocking=True))
            loss = contrastive_loss(out, cfg)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach() / t.grad_accum
        step += 1
        window_steps += 1
        samples_seen += t.global_batch_size

        if step % t.log_every == 0 or step == t.steps:
            dist.all_reduce(loss_sum)
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step, "loss": loss_sum.item() / env.world_size / window_steps,
                "lr": engine.get_lr()[0],
                "logit_scale": float(out["logit_scale"].detach().float().clamp(max=cfg.loss.logit_scale_max)),
                **({"logit_bias": float(out["logit_bias"].detach().float())} if "logit_bias" in out else {}),
                "samples_per_s": window_steps * t.global_batch_size / elapsed,
                "data_wait_frac": window_wait / elapsed,
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "samples_seen": samples_seen,
                "bad_samples": sum(budget.bad.values()),
                "tflops_per_s": window_steps * t.global_batch_size * flops_per_sample / elapsed / 1e12,
            }
            if metrics:
                metrics.log(record)
            loss_sum.zero_()
            window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
        if metrics:
            metrics.advance()
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
            save_checkpoint(engine, ckpt_root, step, client_state(step), config_yaml, t.keep_last)
            window_start = time.perf_counter()  # checkpoint time is not training throughput

    if metrics:
        metrics.close()
    results = {}
    if t.eval_at_end and cfg.data.val:
        results = evaluate_engine(engine, cfg, eval_tf, tokenizer, is_main)
        if is_main:
            (out_dir / "eval.json").write_text(json.dumps({"step": step, **results}, indent=2))
    dist.barrier()
    return results


def contrastive_loss(out: dict, cfg: RunConfig) -> torch.Tensor:
    if cfg.loss.name == "siglip":
        return siglip_loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"],
                           cfg.loss.logit_scale_max)
    return clip_loss(out["image_features"], out["text_features"], out["logit_scale"], cfg.loss.logit_scale_max)


def evaluate_engine(engine, cfg: RunConfig, eval_tf, tokenizer, is_main: bool) -> dict:
    """Rank 0 evaluates the full model (under ZeRO-3 all ranks gather the parameters first)."""
    from contextlib import nullcontext

    import deepspeed

    from pipeline.eval.zero_shot import evaluate, format_results

    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if cfg.train.zero_stage == 3 else nullcontext())
    results = {}
    with gather:
        if is_main:
            results = evaluate(engine.module, eval_tf, tokenizer, cfg.data.val, cfg.data.classes,
                               cfg.eval.batch_size, cfg.eval.recall_at)
            print("eval: " + format_results(results), flush=True)
    engine.module.train()
    return results
