"""Checkpoints that are either complete or invisible.

Layout under `<out_dir>/checkpoints/`:
    step_00000200/        DeepSpeed files + rank_00000.pt ... (per-rank RNG) + config.yaml + meta.json
        universal/        (only after a resume on another world size) DeepSpeed universal checkpoint
    latest                text file naming the newest complete checkpoint

Every rank writes into `step_XXXXXXXX.partial/`; after a barrier rank 0 renames it to its final name and then
replaces `latest` atomically. A kill at any moment leaves either the previous state or the new one: a
`.partial` directory is never read and is removed by the next run.

Resuming on another world size: ZeRO 1-3 partition the optimizer state (and ZeRO-3 the weights) by rank, and
DeepSpeed refuses to load partitions written by a different number of ranks. `load_checkpoint` then converts
the checkpoint once into DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`: one fp32 tensor
per parameter plus its Adam moments, independent of the partitioning) inside the checkpoint, as
`step_XXXXXXXX/universal/` (written as `universal.partial/` and renamed when complete, like the checkpoint
itself), and loads that with DeepSpeed's universal-checkpoint loader, which re-partitions for the current ranks.
Without ZeRO (stage 0, fp32) the optimizer state is whole in `mp_rank_00_model_states.pt` and loads as is.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.atomic_write import write_atomic
from pipeline.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{8})$")
RANK_FILE = re.compile(r"^rank_(\d{5})\.pt$")
UNIVERSAL = "universal"  # the converted copy inside a checkpoint directory
META = "meta.json"
CONVERT_TIMEOUT_S = float(os.environ.get("PIPELINE_UNIVERSAL_TIMEOUT", 4 * 3600))


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used as asked (unsafe, foreign, unreadable); the message is one line."""


def newest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, else the highest complete step under root; None if there is none.
    `latest` may only name a step directory beside it: a path elsewhere (absolute, `..`) is refused, so a run
    never silently continues another run's checkpoint."""
    latest = root / "latest"
    if latest.is_file():
        try:
            name = latest.read_bytes()[:256].decode().strip()
        except UnicodeDecodeError:
            name = "<not text>"
        if not STEP_DIR.match(name):
            raise CheckpointError(f"{latest} names {name!r}, not a checkpoint of this run (a step_XXXXXXXX "
                                  f"directory beside it); correct or delete that file")
        named = root / name
        if named.is_dir():
            return named
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as is; a checkpoints/ folder or a run directory -> its newest checkpoint."""
    p = Path(path)
    if p.is_dir() and STEP_DIR.match(p.name):
        return p
    for root in (p / "checkpoints", p):
        found = newest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{p} is not a complete checkpoint (step_XXXXXXXX), nor a run or checkpoints/ "
                            f"directory holding one")


def find_checkpoint(root: Path, resume: str) -> Path | None:
    """train.resume: 'none' -> None; 'auto' -> newest under root, if any; a path -> resolve_checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_checkpoint(root)
    return resolve_checkpoint(resume)


def _deepspeed_state_classes() -> list:
    """The only classes a checkpoint may rebuild when loaded: the small objects DeepSpeed's ZeRO optimizer
    state pickles (its loss scaler, the stage enum, parameter fragment addresses). Everything else in our
    checkpoints is tensors and plain values (numbers, strings, lists, dicts), which a weights-only load accepts."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_state_file(path: str | Path, mmap: bool = False):
    """`torch.load(weights_only=True)` of a checkpoint file: tensors, plain values and the allow-listed DeepSpeed
    classes, never code from the file (a pickle that names anything else is refused: CheckpointError).
    mmap: map tensor storages instead of reading them (zip-format files), to check a file cheaply."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(f"{path}: refused to load: it asks to build objects a checkpoint never holds "
                              f"({why or 'not tensors or plain values'}); it may run code if unpickled") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def vet_checkpoint(path: str | Path) -> None:
    """Every `*.pt` under a checkpoint directory loads with `load_state_file`, or CheckpointError.

    DeepSpeed reads checkpoints with `torch.load(weights_only=False)` (its engine's loader, zero_to_fp32,
    ds_to_universal): we cannot switch that off, so we call this first on whatever DeepSpeed will read; a file
    that passes holds only tensors, plain values and the allow-listed classes, so DeepSpeed's full unpickling
    of it runs no foreign code. Collective when a process group is up: each rank checks its share of the files
    (storages memory-mapped, not read) and all ranks raise the first failure found."""
    files = sorted(Path(path).rglob("*.pt"))
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    error = ""
    for f in files[rank::world]:
        try:
            load_state_file(f, mmap=True)
        except CheckpointError as e:
            error = str(e)
            break
    if distributed:
        errors = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), "")
    if error:
        raise CheckpointError(error)


def remove_partials(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".partial"):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, client_state: dict, config_yaml: str, keep_last: int,
                    write_extra=None) -> Path:
    """Collective: every rank calls it. Returns the final directory. `write_extra(directory)` writes more files
    into the checkpoint on rank 0 before it becomes visible (the weight EMA)."""
    rank = dist.get_rank()
    final = root / step_dirname(step)
    partial = root / (final.name + ".partial")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial.name, client_state=client_state, save_latest=False)
    torch.save({"rng": rng_state()}, partial / f"rank_{rank:05d}.pt")
    if rank == 0:
        (partial / "config.yaml").write_text(config_yaml)
        (partial / META).write_text(json.dumps(_meta(engine, step), indent=2))
        if write_extra is not None:
            write_extra(partial)
    dist.barrier()
    if rank == 0:
        if final.exists():  # the same step saved before (e.g. a rerun of a finished job): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        write_atomic(root / "latest", final.name, fsync=True)
        for old in complete_checkpoints(root)[:-keep_last]:
            if old != final:  # higher steps of an older run (a resume from an earlier step) never push it out
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _precision(engine) -> str:
    if engine.torch_autocast_enabled():  # fp32 weights, activations in the autocast dtype (one-rank GPU runs)
        return f"fp32 weights, {str(engine.torch_autocast_dtype()).removeprefix('torch.')} autocast"
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def _meta(engine, step: int) -> dict:
    import deepspeed

    return {"step": step, "world_size": dist.get_world_size(), "zero_stage": int(engine.zero_optimization_stage()),
            "precision": _precision(engine),
            "deepspeed": deepspeed.__version__}


def checkpoint_meta(path: str | Path) -> dict:
    """What meta.json records (step, world_size, zero_stage, precision, deepspeed version); {} if absent."""
    f = Path(path) / META
    return json.loads(f.read_text()) if f.is_file() else {}


def checkpoint_world_size(path: str | Path) -> int:
    """The number of ranks that wrote a checkpoint: meta.json, else the per-rank RNG files, else the ZeRO
    partition files, else DeepSpeed's own record (dp_world_size in mp_rank_00_model_states.pt)."""
    p = Path(path)
    meta = checkpoint_meta(p)
    if "world_size" in meta:
        return int(meta["world_size"])
    ranks = [f for f in p.iterdir() if RANK_FILE.match(f.name)]
    if ranks:
        return len(ranks)
    partitions = _zero_partition_files(p)
    if partitions:
        return len(partitions)
    states = load_state_file(p / "mp_rank_00_model_states.pt", mmap=True)
    return int(states.get("dp_world_size", 1))


def _zero_partition_files(path: Path) -> list[Path]:
    """ZeRO 1-3 optimizer partitions (one per data-parallel rank); not stage 0's bf16_zero_* files."""
    return sorted(path.glob("zero_pp_rank_*_mp_rank_*_optim_states.pt"))


def universal_checkpoint(path: str | Path) -> Path:
    """The universal-format copy of a ZeRO checkpoint, made on first use. Collective: rank 0 converts (in a
    subprocess) while the others wait for the directory to appear."""
    path = Path(path)
    out = path / UNIVERSAL
    partial = path / (UNIVERSAL + ".partial")
    failed = path / (UNIVERSAL + ".failed")
    rank = dist.get_rank()
    if rank == 0 and not out.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        failed.unlink(missing_ok=True)
    dist.barrier()  # stale markers are gone before anyone looks for them
    if rank == 0 and not out.is_dir():
        try:
            convert_to_universal(path, partial)
            os.replace(partial, out)
        except Exception as e:
            try:  # tell the waiting ranks (a read-only checkpoint directory cannot take the marker either)
                write_atomic(failed, f"{type(e).__name__}: {e}", fsync=True)
            except OSError:
                pass
            raise
    else:
        deadline = time.monotonic() + CONVERT_TIMEOUT_S
        while not out.is_dir():  # a file poll, not a collective: the conversion may outlast the timeout
            if failed.is_file():
                raise RuntimeError(f"rank 0 could not convert {path} to a universal checkpoint: "
                                   f"{failed.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no universal checkpoint in {out} after {CONVERT_TIMEOUT_S:.0f} s "
                                   f"(PIPELINE_UNIVERSAL_TIMEOUT)")
            time.sleep(0.5)
    dist.barrier()
    return out


def convert_to_universal(path: Path, out: Path, workers: int | None = None) -> None:
    """DeepSpeed checkpoint directory -> universal checkpoint directory (DeepSpeed's ds_to_universal, which
    unpickles with weights_only=False: its only caller, load_checkpoint, has run vet_checkpoint on `path`)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(out), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
           "--inject_missing_state"]  # our client state carries no universal_checkpoint_info of its own
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    (out.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer file: we name tags ourselves
    if proc.returncode != 0 or not (out / "zero").is_dir():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"ds_to_universal failed on {path} (exit {proc.returncode}): {' | '.join(tail)}")


def load_checkpoint(engine, path: Path) -> dict:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns the client state.

    Works when the checkpoint was written by another number of ranks (see the module docstring); the client
    state is then the writer's (its `world_size` says how many ranks wrote it). Ranks the writer did not have
    keep their RNG state."""
    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    vet_checkpoint(path)  # before DeepSpeed (and its universal converter) unpickles anything in it
    saved_world = checkpoint_world_size(path)
    if saved_world != world and _zero_partition_files(path):
        load_dir, tag, universal = path, universal_checkpoint(path).name, True
    elif saved_world != world and checkpoint_meta(path).get("zero_stage") == 0 and engine.zero_optimization_stage():
        raise RuntimeError(f"{path} was written without ZeRO (stage 0, as every one-rank run is) and holds the whole "
                           f"optimizer state; resume it on {world} ranks with train.zero_stage=0, which loads it as is")
    elif saved_world != world and any(path.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        raise RuntimeError(f"{path} holds DeepSpeed's stage-0 bf16 optimizer partitions for {saved_world} ranks; "
                           f"resuming it on {world} ranks is not supported (use ZeRO 1-3, or {saved_world} ranks)")
    else:
        load_dir, tag, universal = path.parent, path.name, False

    # DeepSpeed's loader unpickles with weights_only=False: safe here only because vet_checkpoint passed above
    config = engine._config  # DeepSpeed has no public switch; its loader reads this flag at load time
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    try:
        _, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = previous
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank_{rank:05d}.pt"
    if rank_file.is_file():
        set_rng_state(load_state_file(rank_file)["rng"])
    return client_state
