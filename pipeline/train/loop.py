"""The training run: validate -> process group -> task (model, decoder, loss) -> engine -> resume -> steps ->
checkpoints -> eval. The same loop trains every task (pipeline/tasks/).

A sample's path: shards (pipeline/data/loader.py) -> the task's decoder in the loader workers -> the decoder's
`to_device` here (pipeline/data/decoders.py) -> the task's model and loss (e.g. pipeline/tasks/contrastive.py)
-> DeepSpeed step (pipeline/train/engine.py).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ConfigError, RunConfig, resolve_batch, to_dict, to_yaml
from pipeline.data.loader import (DataError, FetchSpec, LoaderSpec, ShardBatches, ShardSet, StreamPosition,
                                  epoch_length, expand_sources, make_train_loader, parse_weights)
from pipeline.tasks import step_losses
from pipeline.tasks.registry import build_task, check_task
from pipeline.train.checkpoint import (checkpoint_meta, complete_checkpoints, find_checkpoint, load_checkpoint,
                                       remove_partials, save_checkpoint, vet_checkpoint)
from pipeline.train.distributed import DistEnv, close_process_group, host_group, init_process_group
from pipeline.train.ema import WeightEMA, read_ema
from pipeline.train.engine import build_engine, compute_dtype
from pipeline.train.metrics import MetricsLog
from pipeline.train.nonfinite import NonFiniteGuard, check_weights_finite
from pipeline.train.profiling import StepProfiler
from pipeline.train.preemption import PREEMPTION_EXIT_CODE, PreemptionFlag


PREEMPTED_MARKER = "PREEMPTED"  # written to out_dir by rank 0 when a run stops on a signal


class Preempted(SystemExit):
    """The run stopped on a scheduler's signal after writing a checkpoint; the process exits with code 75."""

    def __init__(self):
        super().__init__(PREEMPTION_EXIT_CODE)


RUN_OUTPUTS = ("metrics.jsonl", "metrics.png", "tensorboard", "sample_keys", "eval.json", PREEMPTED_MARKER)


def validate_run(cfg: RunConfig, world_size: int, check_resume_files: bool = False) -> None:
    """Everything that can be checked before a process group starts; raises ConfigError / DataError /
    CheckpointError. check_resume_files: also check the files of the checkpoint to resume (see vet_checkpoint;
    the ranks do it anyway before loading)."""
    resolve_batch(cfg, world_size)
    parse_weights(cfg.data.train_weights, len(expand_sources(cfg.data.train, "data.train")))
    check_task(cfg)
    if cfg.train.ema_decay and cfg.train.zero_stage == 3 and world_size > 1:
        raise ConfigError("train.ema_decay needs whole weights on every rank: use train.zero_stage 0-2 (ZeRO-3 "
                          "partitions the weights)")
    if cfg.train.precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={cfg.train.precision} needs a GPU; use fp32 (or auto) on the CPU")
    out_dir = Path(cfg.train.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir={out_dir} exists and is not a directory")
    try:
        resume_from = find_checkpoint(out_dir / "checkpoints", cfg.train.resume)
    except FileNotFoundError as e:
        raise ConfigError(f"train.resume: {e}") from None
    found = other_run_outputs(cfg, resume_from)
    if found and not cfg.train.overwrite:
        raise ConfigError(f"train.out_dir={out_dir} holds another run's {' and '.join(found)}; set train.resume=auto "
                          f"to continue it, train.overwrite=true to replace it, or choose another out_dir")
    if check_resume_files and resume_from is not None:
        vet_checkpoint(resume_from)


def other_run_outputs(cfg: RunConfig, resume_from: Path | None) -> list[str]:
    """What a fresh run would overwrite in out_dir: checkpoints and metrics of a run it does not continue.
    `train.resume=auto` continues whatever is there; resuming a checkpoint of this out_dir continues its run."""
    out_dir = Path(cfg.train.out_dir)
    root = out_dir / "checkpoints"
    if cfg.train.resume == "auto" or (resume_from is not None and resume_from.resolve().parent == root.resolve()):
        return []
    found = []
    ckpts = complete_checkpoints(root)
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint{'s' if len(ckpts) > 1 else ''} (newest {ckpts[-1].name})")
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    return found


def clear_run_outputs(out_dir: Path) -> None:
    """train.overwrite: removes what a previous run wrote to out_dir (its checkpoints, metrics, logs), nothing
    else (data or exports kept there stay)."""
    root = out_dir / "checkpoints"
    for p in complete_checkpoints(root):
        shutil.rmtree(p)
    (root / "latest").unlink(missing_ok=True)
    for name in RUN_OUTPUTS:
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def device_peak_tflops(cfg: RunConfig) -> float:
    """The per-device peak MFU is measured against: train.peak_tflops, else the GPU's dense bf16 datasheet
    figure from pipeline.train.device_peak.DEVICE_PEAK_TFLOPS (0 when unknown, e.g. on a CPU: no MFU is reported)."""
    from pipeline.train.device_peak import peak_tflops_of

    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    if not torch.cuda.is_available():
        return 0.0
    return peak_tflops_of(torch.cuda.get_device_name())[0]


def configure_cuda(cfg: RunConfig) -> None:
    """cuDNN autotuning and TF32 for GPU runs (train.cudnn_benchmark, train.tf32; both on by default). bf16
    autocast does not use TF32; it speeds up what runs in fp32 (fp32 runs, and ops autocast keeps in fp32)."""
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32


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
        if "error" in batch:  # a whole shard is unusable (the loader names it)
            raise DataError(batch["error"])
        self.bad.update(batch["bad"])
        self.seen += batch_size
        n_bad = sum(self.bad.values())
        if not batch["keys"] or (self.seen >= 1000 and n_bad > self.max_fraction * self.seen):
            reasons = ", ".join(f"{k}: {v}" for k, v in self.bad.most_common())
            raise DataError(f"{n_bad} of {self.seen} training samples failed to decode ({reasons}), more than "
                            f"data.max_bad_fraction={self.max_fraction}")


def is_sample_count(key: str) -> bool:
    """Evaluation keys that count samples or classes (the same for the raw weights and their EMA)."""
    return key in ("samples", "classes", "labels_out_of_range") or key.endswith("_samples")


def run_training(cfg: RunConfig, env: DistEnv) -> dict:
    """Trains; returns the final evaluation results (rank 0) or {}."""
    validate_run(cfg, env.world_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        configure_cuda(cfg)
    init_process_group(env, "nccl" if use_cuda else "gloo")
    t = cfg.train
    out_dir = Path(t.out_dir)
    ckpt_root = out_dir / "checkpoints"
    is_main = env.rank == 0
    config_yaml = to_yaml(cfg)  # the resolved config, saved with every checkpoint
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if t.overwrite and other_run_outputs(cfg, find_checkpoint(ckpt_root, t.resume)):
            print(f"train.overwrite: removing the previous run's checkpoints and metrics in {out_dir}", flush=True)
            clear_run_outputs(out_dir)
        remove_partials(ckpt_root)
        (out_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)
    dist.barrier()

    _seed_everything(t.seed)  # same seed on every rank: identical initial weights
    task = build_task(cfg)
    resume_from = find_checkpoint(ckpt_root, t.resume)
    engine, _, plain = build_engine(task.model, cfg, env.world_size, task.param_groups(),
                                    checkpoint_meta(resume_from).get("zero_stage", 0) if resume_from else 0)

    sources = expand_sources(cfg.data.train, "data.train")  # pipe: shards stay URLs: streamed, not fetched now
    shards = ShardSet.from_sources(sources, FetchSpec.for_data(cfg.data))
    spec = LoaderSpec(t.batch_size, env.rank, env.world_size, t.seed, cfg.data.shuffle_block,
                      parse_weights(cfg.data.train_weights, len(sources)), cfg.data.resampled)
    start_step, position = 0, StreamPosition()
    ema = WeightEMA(engine.module, t.ema_decay) if t.ema_decay else None
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        if ema is not None:
            saved_ema = read_ema(resume_from)
            if saved_ema is not None:
                try:
                    ema.load_state_dict(saved_ema)
                except ValueError as e:
                    raise ConfigError(f"train.ema_decay: {resume_from}: {e}") from None
            else:  # the run enables the EMA only now: it starts from the resumed weights
                ema = WeightEMA(engine.module, t.ema_decay)
        if state["world_size"] != env.world_size and is_main:  # load_checkpoint converted it (universal)
            print(f"checkpoint {resume_from} was written by {state['world_size']} ranks; continuing on "
                  f"{env.world_size} (the data stream continues the epoch where it stopped)", flush=True)
        start_step, position = state["step"], StreamPosition.from_dict(state["data"])
        if state["data"]["epoch_samples"] != epoch_length(shards.counts, shards.sources, spec.weights):
            raise ConfigError(f"checkpoint {resume_from} was trained on data with {state['data']['epoch_samples']} "
                              f"samples per epoch; data.train now gives a different number, so its position "
                              f"cannot be continued")
        if is_main:
            print(f"resumed from {resume_from} at step {start_step} (epoch {position.epoch}, sample "
                  f"{position.offset})", flush=True)

    dataset = ShardBatches(shards, spec, task.decoder, start=position)
    # starting the loader draws the workers' base seed from torch's RNG (restored from the checkpoint above):
    # put it back, or the dropout masks of a resumed run would differ from an uninterrupted run's
    rng = torch.get_rng_state()
    batches = iter(make_train_loader(dataset, cfg.data.workers, pin_memory=use_cuda))
    torch.set_rng_state(rng)
    device, dtype = engine.device, compute_dtype(engine)
    metrics = (MetricsLog(out_dir, t.steps, start_step, t.progress, t.report_to, t.wandb_project, to_dict(cfg))
               if is_main else None)
    keys_log = SampleKeyLog(out_dir, env.rank, start_step) if cfg.data.log_sample_keys else None
    budget = BadSampleBudget(cfg.data.max_bad_fraction)
    peak_tflops = device_peak_tflops(cfg)
    profiler = StepProfiler(t.profile_steps, out_dir, env.rank, t.profile_ranks)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    samples_seen = start_step * t.global_batch_size
    window_start, window_wait, window_steps, window_flops = time.perf_counter(), 0.0, 0, 0.0

    def client_state(step: int) -> dict:
        return {"step": step, "data": {**position.to_dict(), "epoch_samples": dataset.epoch_len},
                "samples_seen": samples_seen, "world_size": env.world_size, "batch_size": t.batch_size,
                "seed": t.seed, "config": to_dict(cfg)}

    step, k = start_step, 0

    def step_batches(step_keys: list):
        """The step's train.grad_accum micro-batches, fetched when the task asks for them."""
        nonlocal k, position, window_wait
        for _ in range(t.grad_accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - wait_start
            if batch["index"] != k:
                raise RuntimeError(f"loader order broken: got batch {batch['index']}, expected {k}")
            k += 1
            position = StreamPosition.from_dict(batch["next"])
            budget.add(batch, t.batch_size)
            step_keys += batch["keys"]
            yield task.decoder.to_device(batch, device, dtype)

    loss_sum = torch.zeros((), device=device)
    nonfinite = NonFiniteGuard(t.max_nonfinite_steps, device)
    preemption = PreemptionFlag()  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit 75 (requeue)
    # Between log steps nothing reads a device value: the host only queues work, and the GPU never idles
    # waiting for it (tests/train/test_sync_free.py runs steps under torch.cuda.set_sync_debug_mode("error")).
    sync_debug = t.sync_debug if use_cuda else "off"
    try:
        while step < t.steps:
            profiler.step_begins(step + 1)
            if sync_debug != "off" and step > start_step:  # the first step initialises (optimizer state, cuDNN)
                torch.cuda.set_sync_debug_mode(sync_debug)
            step_keys = []
            step_loss = torch.zeros((), device=device)
            micro_steps = 0
            for loss, stats in step_losses(task, engine, step_batches(step_keys), device):
                engine.backward(loss)
                if plain is not None and engine.is_gradient_accumulation_boundary():
                    plain.before_step()  # clipping and the non-finite guard, on the device
                engine.step()
                step_loss += loss.detach() / t.grad_accum
                micro_steps += 1
                window_flops += task.batch_flops(t.global_batch_size // t.grad_accum, stats)
            if micro_steps != t.grad_accum:  # DeepSpeed steps on every grad_accum-th backward
                raise RuntimeError(f"the task gave {micro_steps} losses for train.grad_accum={t.grad_accum}")
            loss_sum += step_loss
            if ema is not None:
                ema.update()
            step += 1
            # fp16's loss scaler overflows on purpose (it skips those steps and lowers the scale): its grad norm is
            # no sign of divergence, the loss is
            nonfinite.update(step, step_loss, plain.grad_norm if plain is not None else
                             None if engine.fp16_enabled() else engine.get_global_grad_norm())
            window_steps += 1
            samples_seen += t.global_batch_size
            if keys_log:
                keys_log.write(step, step_keys)

            profiler.step_ends(step)
            preempted = preemption.requested(host_group())  # collective, on the host: all ranks stop together
            log_now = step % t.log_every == 0 or step == t.steps
            ckpt_now = (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps or preempted
            eval_now = cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps and not preempted
            if sync_debug != "off" and (log_now or ckpt_now or eval_now):  # these steps read values back
                torch.cuda.set_sync_debug_mode("default")
            if log_now:
                dist.all_reduce(loss_sum)
                loss_value = loss_sum.item()  # waits for the window's last step: the window's time is all in
                bad = Counter()
                for counts in _gather_objects(dict(budget.bad), env.world_size):
                    bad.update(counts)
                elapsed = time.perf_counter() - window_start
                grad_norm = plain.grad_norm if plain is not None else engine.get_global_grad_norm()
                record = {
                    "step": step, "loss": loss_value / env.world_size / window_steps,
                    "lr": engine.get_lr()[0],
                    **{name: float(v) for name, v in stats.items()},
                    "samples_per_s": window_steps * t.global_batch_size / elapsed,
                    "step_time_ms": 1000 * elapsed / window_steps,
                    "data_wait_frac": window_wait / elapsed,
                    "grad_norm": float(grad_norm if grad_norm is not None else 0.0),
                    "samples_seen": samples_seen,
                    "epoch": position.epoch,
                    "bad_samples": sum(bad.values()),
                    **{f"bad_samples/{reason}": n for reason, n in sorted(bad.items())},
                    "tflops_per_s": window_flops / elapsed / 1e12,
                }
                if peak_tflops:  # model FLOPs utilisation: achieved model TFLOP/s per device over its peak
                    record["mfu"] = record["tflops_per_s"] / env.world_size / peak_tflops
                if use_cuda:  # this rank's high-water mark of allocated memory since the first step
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record["nonfinite_steps"] = nonfinite.read()
                if metrics:
                    metrics.log(record)
                nonfinite.raise_if_tripped(step)  # after the record: the metrics show the non-finite loss
                loss_sum.zero_()
                window_start, window_wait, window_steps, window_flops = time.perf_counter(), 0.0, 0, 0.0
            if metrics:
                metrics.advance()
            if ckpt_now:
                if not log_now:
                    nonfinite.read()
                    nonfinite.raise_if_tripped(step)
                check_weights_finite(engine.module, step)
                save_checkpoint(engine, ckpt_root, step, client_state(step), config_yaml, t.keep_last,
                                ema.save if ema is not None else None)
                window_start = time.perf_counter()  # checkpoint time is not training throughput
            if eval_now:  # after the checkpoint: a failing evaluation loses no training
                results = evaluate_engine(engine, task, cfg, is_main)
                if metrics and results:
                    metrics.log_eval(step, results)
                window_start = time.perf_counter()
            if preempted and step < t.steps:
                if is_main:  # the marker tells a parent launcher (whose own exit code is torchrun's) what happened
                    (out_dir / PREEMPTED_MARKER).write_text(f"{step}\n")
                    print(f"preempted by a signal: checkpoint step {step} written; exiting with "
                          f"{PREEMPTION_EXIT_CODE} to be requeued", flush=True)
                if metrics:
                    metrics.close()
                if keys_log:
                    keys_log.close()
                close_process_group()  # every rank is here; exiting with the group alive could abort (not 75)
                raise Preempted()
        preemption.restore()
    finally:  # loader workers ignore SIGTERM (see loader.py): they must be shut down explicitly
        if sync_debug != "off":
            torch.cuda.set_sync_debug_mode("default")
        profiler.close()
        getattr(batches, "_shutdown_workers", lambda: None)()  # (single-process iterators have none)

    try:
        results = evaluate_engine(engine, task, cfg, is_main) if t.eval_at_end else {}
        if ema is not None and results:  # the average beside the raw weights, as ema_<metric>
            if is_main:
                print(f"evaluating the weight EMA (train.ema_decay={t.ema_decay})", flush=True)
            with ema.swapped_in():
                results.update({f"ema_{k}": v for k, v in evaluate_engine(engine, task, cfg, is_main).items()
                                if not is_sample_count(k)})
        if is_main and results:
            (out_dir / "eval.json").write_text(json.dumps({"step": step, **results}, indent=2))
        if metrics and results:
            metrics.log_eval(step, results)
    finally:
        if metrics:
            metrics.close()
    if keys_log:
        keys_log.close()
    dist.barrier()
    return results


def _gather_objects(obj, world_size: int) -> list:
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class SampleKeyLog:
    """Each rank's sample keys per optimizer step (`data.log_sample_keys`): the evidence that a resumed run
    saw exactly the samples an uninterrupted one would have. Lines after the resume step are dropped."""

    def __init__(self, out_dir: Path, rank: int, start_step: int):
        path = out_dir / "sample_keys" / f"rank_{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if json.loads(line)["step"] <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

    def write(self, step: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "keys": keys}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def evaluate_engine(engine, task, cfg: RunConfig, is_main: bool) -> dict:
    """Evaluates the full model (under ZeRO-3 all ranks gather the parameters first): on every rank for tasks
    whose evaluation is spread over the ranks (`evaluates_on_all_ranks`), else on rank 0 while the others wait.
    Returns the results on rank 0, {} elsewhere; every module's train/eval mode is as it was before."""
    import deepspeed

    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if cfg.train.zero_stage == 3 else nullcontext())
    modes = [(m, m.training) for m in engine.module.modules()]  # frozen parts stay in eval mode
    results = {}
    with gather:
        if is_main or getattr(task, "evaluates_on_all_ranks", False):
            results = task.evaluate(engine.module)
    for module, training in modes:
        module.training = training
    return results if is_main else {}
