"""Who am I in the job: rank, world size, local rank and the rendezvous address from any launcher, read before
anything starts.

- torchrun, the DeepSpeed launcher (`deepspeed --module pipeline ...`) and `accelerate launch` set RANK /
  WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
- `srun python -m pipeline train` (one task per GPU) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the
  rendezvous host is the first node of the step's node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST,
  parsed here: `scontrol` is not needed), the port is derived from SLURM_JOB_ID so every task of a job agrees on
  it without talking. MASTER_ADDR / MASTER_PORT in the environment win over both.
- A plain `python` start is a world of one.

Collectives time out after PIPELINE_DIST_TIMEOUT seconds (default 600; DeepSpeed's DEEPSPEED_TIMEOUT, in
minutes, is honoured when ours is unset): a rank that dies or stalls outside torchrun makes the others fail in
bounded time instead of hanging for ever. That holds for every process group, not only the default one: DeepSpeed
makes its own (the data-parallel group every gradient all-reduce runs in) without a timeout, which torch would
otherwise give its built-in default (30 minutes for gloo), so it is made torch's default as well. On GPUs, NCCL's
watchdog ends a rank whose collective timed out (TORCH_NCCL_ASYNC_ERROR_HANDLING=3 unless set otherwise).
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

DEFAULT_TIMEOUT_S = 600.0
SLURM_PORT_BASE = 15000  # derived ports: 15000 + SLURM_JOB_ID % 15000, below Linux's ephemeral range (32768+)
SLURM_PORT_SPAN = 15000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # started by a launcher (as opposed to a plain single process)
    launcher: str = "none"  # torchrun | deepspeed | accelerate | slurm | env (RANK/WORLD_SIZE from elsewhere) | none
    master_addr: str = ""  # rendezvous host and port ("" / 0: not known, a world of one picks its own)
    master_port: int = 0


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(spec: str, nodelist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as Slurm does)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"cannot parse {item!r} in node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list {nodelist!r}")
        width = len(lo)
        out.extend(f"{n:0{width}d}" for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list: 'node[01-03,07],gpu-a1' -> node01 node02 node03 node07 gpu-a1.

    Handles several bracket groups in one name ('rack[1-2]-n[1-2]' -> rack1-n1 rack1-n2 rack2-n1 rack2-n2) and
    suffixes after a bracket ('n[1-2]-ib'). Equivalent to `scontrol show hostnames` for the forms Slurm prints.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        names = [""]
        for literal, bracket in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if not literal and not bracket:
                continue
            names = [n + literal for n in names]
            if bracket:
                names = [n + x for n in names for x in _expand_range_list(bracket, nodelist)]
        hosts.extend(n for n in names if n)
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def first_host(nodelist: str) -> str:
    return expand_nodelist(nodelist)[0]


def slurm_master_port(job_id: str | int) -> int:
    """The rendezvous port every task of a job derives alike from its SLURM_JOB_ID (digits of array/het ids)."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} holds no digits")
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def _launcher_name(e: Mapping[str, str]) -> str:
    if any(k.startswith("ACCELERATE_") for k in e):
        return "accelerate"
    if "CROSS_RANK" in e and "LOCAL_SIZE" in e:  # deepspeed.launcher.launch
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in e or "GROUP_RANK" in e:
        return "torchrun"
    return "env"


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)), True,
                       _launcher_name(e), e.get("MASTER_ADDR", ""), int(e.get("MASTER_PORT", 0) or 0))
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        addr = e.get("MASTER_ADDR", "")
        if not addr:
            nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("srun task without SLURM_JOB_NODELIST: set MASTER_ADDR")
            addr = first_host(nodelist)
        port = int(e.get("MASTER_PORT", 0) or 0)
        if not port:
            if "SLURM_JOB_ID" not in e:
                raise RuntimeError("srun task without SLURM_JOB_ID: set MASTER_PORT")
            port = slurm_master_port(e["SLURM_JOB_ID"])
        local = int(e.get("SLURM_LOCALID", 0))
        visible = [d for d in e.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible and local >= len(visible):  # --gpus-per-task / --gpu-bind: this task sees only its own GPU(s)
            local %= len(visible)
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), local, True, "slurm", addr, port)
    return DistEnv(0, 1, 0, False)


def collective_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """PIPELINE_DIST_TIMEOUT (seconds), else DEEPSPEED_TIMEOUT (minutes), else 10 minutes."""
    e = os.environ if environ is None else environ
    if e.get("PIPELINE_DIST_TIMEOUT"):
        seconds = float(e["PIPELINE_DIST_TIMEOUT"])
    elif e.get("DEEPSPEED_TIMEOUT"):
        seconds = 60.0 * float(e["DEEPSPEED_TIMEOUT"])
    else:
        seconds = DEFAULT_TIMEOUT_S
    if seconds <= 0:
        raise ValueError(f"PIPELINE_DIST_TIMEOUT must be > 0 seconds, not {seconds:g}")
    return timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(env: DistEnv, backend: str) -> None:
    """Starts torch.distributed through DeepSpeed (which also picks its accelerator), with a bounded
    collective timeout (`collective_timeout`)."""
    import deepspeed

    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.master_port:
            os.environ["MASTER_PORT"] = str(env.master_port)
        elif env.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set; start multi-process runs with torchrun or srun")
        else:
            os.environ["MASTER_PORT"] = str(free_port())
    timeout = collective_timeout()
    _default_group_timeout(timeout)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    if backend == "nccl":
        # the watchdog aborts the process once a collective exceeds the timeout (torch's default since 2.2; older
        # versions and a stray NCCL_ASYNC_ERROR_HANDLING=0 would leave the rank blocked instead)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if _torchrun_restart() > 0:
        _init_on_fresh_keys(env, backend, timeout)  # DeepSpeed then adopts the initialised default group
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    global _HOST_GROUP
    if backend != "gloo" and env.world_size > 1:  # collective: every rank creates it, here, in the same order
        import torch.distributed as dist

        _HOST_GROUP = dist.new_group(backend="gloo", timeout=timeout)


_HOST_GROUP = None  # a gloo group over every rank when the default group is NCCL's


def close_process_group(barrier: bool = True) -> None:
    """Leaves torch.distributed once a verb is done: a barrier (no rank tears its groups down while a peer is still
    inside a collective; `barrier=False` when this rank alone stops on an error), then `destroy_process_group`.
    A process that exits with its gloo group alive has the group's worker threads destroyed during interpreter
    shutdown, and can then abort ("terminate called without an active exception", SIGABRT): a finished eval or
    training run fails in torchrun's eyes, and a one-line error exits -6 instead of 2. A no-op outside a
    distributed run."""
    if "torch.distributed" not in sys.modules:  # never started (the shard verb does not import torch at all)
        return
    import torch.distributed as dist

    global _HOST_GROUP
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier(group=host_group())
    dist.destroy_process_group()  # every group, the host group included
    _HOST_GROUP = None


def rank_sizes(n: int) -> list[int]:
    """Every rank's `n` (e.g. its local batch size), agreed on the host over `host_group()`."""
    import torch
    import torch.distributed as dist

    sizes = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    sizes[dist.get_rank()] = n
    dist.all_reduce(sizes, group=host_group())
    return sizes.tolist()


def host_group():
    """The process group for small host values (a batch size, a stop flag): gloo, on CPU tensors, so agreeing
    on them never waits for the GPU's queue (an NCCL exchange of a size, read back with .item(), would stall
    the host until the GPU reached it, every step). None means the default group, when that is gloo already."""
    return _HOST_GROUP


def extensions_dir(prefix: str | None = None) -> str:
    """Where torch builds the C++ ops DeepSpeed compiles at start-up (its CPU shared-memory all-reduce), unless
    TORCH_EXTENSIONS_DIR says otherwise: one directory per Python environment. torch's default is one directory per
    user, shared by every environment; the op's sources differ between two installs of DeepSpeed, so two
    environments used at once rebuilt it in turn, and each rank waited on the other's build behind one lock
    (minutes on a loaded machine: runs and tests stalled at start-up)."""
    prefix = sys.prefix if prefix is None else prefix
    tag = hashlib.sha256(os.path.realpath(prefix).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"env-{tag}")


def _default_group_timeout(timeout: timedelta) -> None:
    """Makes `timeout` what torch gives a process group created without one. DeepSpeed creates its groups with
    `torch.distributed.new_group(ranks)` (its clone of the world group carries every gradient all-reduce), and
    torch would give them its built-in 30 minutes (gloo; 10 for NCCL): a hung peer then held the others there
    long after PIPELINE_DIST_TIMEOUT."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:  # None: torch built without NCCL
        c10d.default_pg_nccl_timeout = timeout


def _torchrun_restart() -> int:
    """How many times torchrun restarted the worker group (0 on the first attempt or outside torchrun)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return 0
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _init_on_fresh_keys(env: DistEnv, backend: str, timeout: timedelta) -> None:
    """After a torchrun restart (--max-restarts) the workers share the agent's store with the failed attempt,
    whose keys are still there (torch 2.14, --standalone): gloo then dials the dead attempt's addresses and the
    group never forms. Namespacing the keys by attempt avoids that."""
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"/pipeline/attempt_{_torchrun_restart()}", store)
    dist.init_process_group(backend, store=prefixed, rank=env.rank, world_size=env.world_size, timeout=timeout)
