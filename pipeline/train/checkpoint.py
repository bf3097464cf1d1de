"""Checkpoints that are either complete or invisible.

Layout under `<out_dir>/checkpoints/`:
    step_00000200/        DeepSpeed files + rank_00000.pt ... (per-rank RNG) + config.yaml
    latest                text file naming the newest complete checkpoint

Every rank writes into `step_XXXXXXXX.partial/`; after a barrier rank 0 renames it to its final name and then
replaces `latest` atomically. A kill at any moment leaves either the previous state or the new one: a
`.partial` directory is never read and is removed by the next run.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def newest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, else the highest complete step under root; None if there is none."""
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named.is_dir() and STEP_DIR.match(named.name):
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, root: Path, step: int, client_state: dict, config_yaml: str, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
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
    dist.barrier()
    if rank == 0:
        if final.exists():  # the same step saved before (e.g. a rerun of a finished job): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / "latest", final.name)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, path: Path) -> dict:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns the client state."""
    rank = dist.get_rank()
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank_{rank:05d}.pt"
    if rank_file.is_file():
        set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return client_state
