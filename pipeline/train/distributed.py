"""Who am I in the job: rank, world size and local rank from any launcher, read before anything starts.

torchrun, the DeepSpeed launcher and accelerate set RANK / WORLD_SIZE / LOCAL_RANK; `srun python` sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. A plain `python` start is a world of one.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # started by a launcher (as opposed to a plain single process)


def read_dist_env() -> DistEnv:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)), True)
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)), True)
    return DistEnv(0, 1, 0, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(env: DistEnv, backend: str) -> None:
    """Starts torch.distributed through DeepSpeed (which also picks its accelerator)."""
    import deepspeed

    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set; start multi-process runs with torchrun or srun")
        os.environ["MASTER_PORT"] = str(free_port())
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
