"""Running a `pipe:` command into a file, with timeouts, and never leaving a process of it behind.

The command runs under the shell in a new process group; its stdout is copied into the destination file. The
copy fails with one line naming the command (a `DataError`) when no byte arrives for the stall timeout, when the
whole run takes longer than the total timeout, when it writes more than its byte cap, when the file system
holding the destination is about to fill, or when the command exits non-zero (the last line of its stderr is
quoted). On any failure, and after success (stray background children), the whole group is killed, and the
call returns only once its processes have exited: a `cat` still holding a half-written file open is how a
retry or a cleanup sees a file change under it.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from pipeline.data.errors import DataError

PIPE_PREFIX = "pipe:"
CHUNK = 1 << 20
MIN_FREE_BYTES = 1 << 30  # a fetch stops before it leaves the cache's file system with less free space than this
GROUP_EXIT_WAIT_S = 10.0  # for SIGKILLed processes to exit: milliseconds, unless one is stuck in the kernel (D state)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _write(out, data: bytes) -> None:
    """All of `data` to the unbuffered file `out` (a raw write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


_EXITED = ("Z", "X")  # /proc states of a process that has exited: zombie (not yet reaped), dead (being reaped)


def _group_member_state(pid: int, pgid: int) -> str | None:
    """The state letter of process `pid` if it is a member of process group `pgid` (None if it is not, or is
    gone). Read from /proc/<pid>/stat; the name in parentheses may itself hold spaces and ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    return fields[0].decode() if int(fields[2]) == pgid else None


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that have not exited (zombies and dying ones excluded). Empty where there is
    no /proc to read (not Linux)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    return [int(e) for e in entries if e.isdigit() and _group_member_state(int(e), pgid) not in (None, *_EXITED)]


def end_group(proc: subprocess.Popen, wait_s: float = GROUP_EXIT_WAIT_S) -> list[int]:
    """SIGKILL to the command's whole process group, then waits (at most `wait_s`) until every member has
    exited, and reaps the shell. Returns the pids still alive after that (normally none).

    A SIGKILLed process exits only once the scheduler runs it again, milliseconds later on a busy machine: the
    kill alone does not mean the `cat` holding the shard open is gone. The shell is reaped last: until then it
    is a zombie that keeps the group id from being reused, so every pid found in the group is the command's."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + wait_s
    # listed after the kill: a member cannot fork once SIGKILL is pending, so no one joins later
    live = _live_group_members(pgid)
    while live and time.monotonic() < deadline:
        time.sleep(0.002)
        live = [pid for pid in live if _group_member_state(pid, pgid) not in (None, *_EXITED)]
    try:
        proc.wait(max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:  # the shell itself is stuck in the kernel; Popen reaps it later
        pass
    return live


def _exited(pid: int) -> bool:
    """Whether `pid` (our child) has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _survivors_note(shown: str, survivors: list[int], wait_s: float) -> str:
    return f"{shown}: processes {survivors} of the command were still alive {wait_s:g}s after SIGKILL"


def run_to_file(command: str, dest: Path, timeout_s: float | None, stall_timeout_s: float | None,
                cancel: threading.Event | None = None, max_bytes: int | None = None) -> None:
    """Runs `command` with the shell in a new process group and copies its stdout to `dest` (created).
    Raises DataError (one line, naming the command) on a stall, the total timeout, a non-zero exit, `cancel`,
    more output than `max_bytes`, or a cache disk that is full or about to be (less than MIN_FREE_BYTES left);
    kills the whole process group on any failure and after success (stray background children), and returns
    or raises only once its processes have exited (`_end_group`)."""
    shown = one_line(f"{PIPE_PREFIX}{command}")
    start = time.monotonic()
    deadline = start + timeout_s if timeout_s else float("inf")
    stall = stall_timeout_s if stall_timeout_s else float("inf")
    # Unbuffered: a buffered file keeps what a full disk refused and fails again when it is closed, which
    # would replace the one-line error with a traceback.
    with tempfile.TemporaryFile() as errf, open(dest, "wb", buffering=0) as out:
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errf, start_new_session=True)
        try:
            fd = proc.stdout.fileno()
            last_data = time.monotonic()
            total = 0
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise DataError(f"{shown}: took longer than {timeout_s:g}s ({total} bytes so far); killed")
                if now - last_data >= stall:
                    raise DataError(f"{shown}: no data for {stall_timeout_s:g}s ({total} bytes so far); killed")
                if cancel is not None and cancel.is_set():
                    raise DataError(f"{shown}: cancelled (another shard failed)")
                wait = min(deadline - now, last_data + stall - now, 0.25)
                ready, _, _ = select.select([fd], [], [], max(wait, 0.0))
                if not ready:
                    continue
                data = os.read(fd, CHUNK)
                if not data:
                    break
                if max_bytes and total + len(data) > max_bytes:
                    raise DataError(f"{shown}: wrote more than {max_bytes / 1e9:g} GB (data.pipe_max_shard_gb); "
                                      f"killed")
                if total // (64 * CHUNK) != (total + len(data)) // (64 * CHUNK):  # every 64 MiB
                    free = shutil.disk_usage(dest.parent).free
                    if free < MIN_FREE_BYTES:
                        raise DataError(f"{shown}: the shard cache {dest.parent} has {free / 1e9:.2f} GB free "
                                          f"left after {total} bytes of this shard; killed")
                try:
                    _write(out, data)
                except OSError as e:
                    raise DataError(f"{shown}: cannot write to the shard cache {dest.parent} after {total} "
                                      f"bytes: {e.strerror or e}; killed") from None
                total += len(data)
                last_data = time.monotonic()
            # stdout closed: give the command the rest of the time to exit
            while not _exited(proc.pid):
                if time.monotonic() >= deadline:
                    raise DataError(f"{shown}: took longer than {timeout_s:g}s (output ended, the command did "
                                      f"not exit); killed")
                time.sleep(0.01)
        except BaseException as e:
            survivors = end_group(proc)
            if survivors:
                e.add_note(_survivors_note(shown, survivors, GROUP_EXIT_WAIT_S))
            raise
        finally:
            proc.stdout.close()
        # background children it may have left; the group id is still ours (the shell is not reaped yet)
        survivors = end_group(proc)
        if survivors:
            raise DataError(_survivors_note(shown, survivors, GROUP_EXIT_WAIT_S))
        rc = proc.returncode
        if rc != 0:
            errf.seek(0)
            lines = [ln for ln in errf.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            detail = f": {one_line(lines[-1], 200)}" if lines else ""
            raise DataError(f"{shown}: exited with status {rc}{detail}")
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as e:
            raise DataError(f"{shown}: cannot write to the shard cache {dest.parent}: {e.strerror or e}") from None
