"""Starting real multi-process jobs the way each launcher does, watching them, and cleaning up after them."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import REPO
from pipeline.train.distributed import slurm_master_port

LAUNCH_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"}


def clean_env(**extra) -> dict:
    """This environment without any launcher's variables (a test may itself run under torchrun or SLURM), for
    children that run this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_KEYS and not k.startswith(("SLURM_", "TORCHELASTIC_", "ACCELERATE_", "PET_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    # Children run this checkout with this interpreter however they start: a script run by path has its own
    # directory first on sys.path and would import the installed package, which may be another checkout, and
    # launch/*.sh run REPO/.venv/bin/python, else the first python3 on PATH.
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PIPELINE_PYTHON=sys.executable)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_slurm_job_id() -> str:
    """A job id whose derived rendezvous port is free here."""
    for _ in range(200):
        job = random.randrange(1, 10**7)
        if port_is_free(slurm_master_port(job)):
            return str(job)
    raise RuntimeError("no free port in the SLURM-derived range")


def srun_task_env(rank: int, ntasks: int, job_id: str, nodelist: str = "localhost", **extra) -> dict:
    """What `srun` sets for task `rank` of `ntasks` on one node (the fields the trainer reads)."""
    return clean_env(SLURM_PROCID=rank, SLURM_NTASKS=ntasks, SLURM_LOCALID=rank, SLURM_NODEID=0,
                     SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist,
                     SLURM_JOB_NUM_NODES=1, **extra)


class Job:
    """Processes started in their own sessions, with their output in files; `kill()` ends every one of them."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []

    def start(self, cmd: list, env: dict, name: str) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        self.names.append(name)
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        p = self.log_dir / f"{name}.log"
        return p.read_text(errors="replace")[-tail:] if p.is_file() else ""

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {n} (exit {p.poll()}) ---\n{self.log(n, tail)}" for n, p in zip(self.names, self.procs))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logs = self.logs()
                self.kill()
                raise AssertionError(f"job still running after {timeout:.0f} s:\n{logs}") from None
        return [p.returncode for p in self.procs]

    def exit_code(self, proc: subprocess.Popen, timeout: float, what: str) -> int:
        """`proc`'s exit code; an AssertionError carrying every log if it runs longer than `timeout`."""
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{what} still running {timeout:.0f} s later:\n{self.logs()}") from None

    def descendants(self) -> list[psutil.Process]:
        out = []
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                out += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def kill(self) -> None:
        everything = self.descendants()  # torchrun starts its workers in sessions of their own
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the session leader's group: the launcher and its ranks
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for p in alive(everything):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_for(predicate, timeout: float, what: str, job: Job | None = None, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if job is not None and all(p.poll() is not None for p in job.procs):
            raise AssertionError(f"job ended before {what}:\n{job.logs()}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f":\n{job.logs()}" if job else ""))


def last_step(out_dir: Path) -> int:
    from pipeline.train.metrics import read_metrics

    path = Path(out_dir) / "metrics.jsonl"
    try:
        return max((r["step"] for r in read_metrics(path)), default=0) if path.is_file() else 0
    except (ValueError, KeyError):  # a line being written
        return 0


def rank_processes(job: Job, rank: int) -> list[psutil.Process]:
    """The training processes of a rank (not its loader workers, which share its environment)."""
    found = []
    for p in job.descendants():
        try:
            cmd = p.cmdline()
            runs_pipeline = any(a == "-m" and b == "pipeline" for a, b in zip(cmd, cmd[1:]))
            if runs_pipeline and p.environ().get("RANK") == str(rank) and psutil.Process(p.ppid()).cmdline() != cmd:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


PY = sys.executable


FAKE_SRUN = r"""#!/bin/bash
# fake srun: the command as FAKE_SRUN_TASKS (else SLURM_NTASKS) tasks on this machine; USR1 / TERM are passed on to
# every task, as srun does; the exit code is the highest of the tasks'
while [[ "${1:-}" == --* ]]; do shift; done
n=${FAKE_SRUN_TASKS:-${SLURM_NTASKS:-1}}
pids=()
for ((i = 0; i < n; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
    pids+=($!)
done
forward() { for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null; done; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null; do wait "$p"; done
    wait "$p"; r=$?
    if [ "$r" -gt "$rc" ]; then rc=$r; fi
done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/bin/bash
# fake scontrol: `show hostnames` expands nothing (the test's node list is one host); anything else is logged
if [ "$1 $2" = "show hostnames" ]; then echo "$3"; else echo "$*" >> "$FAKE_SCONTROL_LOG"; fi
"""


def fake_slurm_bin(directory: Path) -> Path:
    """A directory with `srun` and `scontrol` stand-ins, to put first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory
