"""`pipe:CMD` shard sources: the shell command's stdout is the tar, fetched into a local cache with timeouts.

WebDataset streams `pipe:` shards straight into the decoder, and a stalled command (a hung `aws s3 cp`, a
`curl` waiting on a dead connection) blocks the job forever. Our loader reads samples by offset through the
per-shard index, so it needs the tar as a local file anyway: each `pipe:` shard is copied once into a cache
directory, under a name derived from the command, and read from there.

A fetch runs the command with the shell in its own process group, copies its stdout into `<name>.<id>.tmp`
and renames it to `<name>` only when the command exited 0 and the bytes are a readable tar. It fails with one
line naming the command (and killing the whole process group) when no byte arrives for `stall_timeout_s`,
when the whole fetch takes longer than `timeout_s`, or when the command exits non-zero (the last line of its
stderr is quoted). Whatever happens, no temporary file and no process of the command is left behind.

The index comes with the shard where the command can address it: the command with the shard's `.tar` token
changed to `.index.parquet` (`pipe:aws s3 cp s3://b/train-000001.tar -` -> `... s3://b/train-000001.index.parquet -`).
When that command fails, or gives an index that does not fit the tar, the index is built from the fetched tar
(headers only). The index is in place before the tar gets its final name, so a cached tar always has one.

Several processes (the ranks of a node) may share a cache directory: a lock file per shard makes one of them
fetch while the others wait for it, then use its copy.

Training streams (`ShardCache`): `resolve_indexes` fetches only the indexes before step 1 (the epoch plan needs
the sample counts, nothing else); a tar is fetched when a reader needs it or a loader worker prefetches it for
its next batches. With a byte bound, a fetch first reserves the tar's size (bounded from its index) under a
lock on the whole cache, deleting the least recently used tars that this process is not about to read, so the
tars and reservations of all processes on the node stay within the bound. A deleted tar that some reader still
has open stays readable to it; one needed again is fetched again.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.atomic_write import atomic_path
from pipeline.data.shard_index import INDEX_SCHEMA, index_mismatch, index_path, read_index, scan_tar

PIPE_PREFIX = "pipe:"
CHUNK = 1 << 20
DEFAULT_TIMEOUT_S = 3600.0  # whole fetch of one shard
DEFAULT_STALL_TIMEOUT_S = 120.0  # no byte at all for this long
DEFAULT_PREFETCH = 4  # shards fetched at once
DEFAULT_MAX_BYTES = 64 * 10**9  # per shard (data.pipe_max_shard_gb): no real shard is near it, a runaway is
MIN_FREE_BYTES = 1 << 30  # a fetch stops before it leaves the cache's file system with less free space than this
GROUP_EXIT_WAIT_S = 10.0  # for SIGKILLed processes to exit: milliseconds, unless one is stuck in the kernel (D state)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TMP_OWNER = re.compile(r"\.(\d+)-[0-9a-f]{8}\.tmp$")  # fetch_pipe's temporary names carry the fetching pid


def _tmp_suffix() -> str:
    """The temporary-file suffix of one fetch: its pid (for _TMP_OWNER) and a random tag (threads share a pid)."""
    return f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _data_error(message: str) -> Exception:
    # Imported here, not at the top: pipeline.data.loader may import this module.
    from pipeline.data.loader import DataError

    return DataError(message)


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class PipeSource:
    """One `pipe:CMD` shard."""
    url: str

    def __post_init__(self):
        if not is_pipe(self.url) or not self.command:
            raise _data_error(f"not a pipe: source (expected 'pipe:COMMAND'): {self.url!r}")

    @property
    def command(self) -> str:
        return self.url[len(PIPE_PREFIX):].strip()

    @property
    def shard_token(self) -> str | None:
        """The last word of the command that names a `.tar` (query strings allowed), e.g. the S3 or HTTP URL."""
        try:
            words = shlex.split(self.command)
        except ValueError:  # unbalanced quotes: the shell will say so when it runs
            words = self.command.split()
        hits = [w for w in words if w.split("?", 1)[0].endswith(".tar")]
        return hits[-1] if hits else None

    @property
    def cache_name(self) -> str:
        """`<sha1 of the command, 16 hex>-<basename of the shard token>`, always ending in `.tar`."""
        digest = hashlib.sha1(self.command.encode("utf-8")).hexdigest()[:16]
        token = self.shard_token
        base = _SAFE.sub("_", token.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]) if token else "shard.tar"
        return f"{digest}-{base}"

    @property
    def index_command(self) -> str | None:
        """The command with the shard token's `.tar` replaced by `.index.parquet`; None if there is no such token."""
        token = self.shard_token
        if token is None:
            return None
        path, q, query = token.partition("?")
        new_token = path.removesuffix(".tar") + ".index.parquet" + q + query
        at = self.command.rfind(token)
        if at < 0:  # the token is written with quotes or escapes in the command; leave it alone
            return None
        return self.command[:at] + new_token + self.command[at + len(token):]

    def cached_path(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir) / self.cache_name


# ---------------------------------------------------------------------------------------------- running a command

def _write(out, data: bytes) -> None:
    out.write(data)


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


def _end_group(proc: subprocess.Popen, wait_s: float = GROUP_EXIT_WAIT_S) -> list[int]:
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
    shown = _one_line(f"{PIPE_PREFIX}{command}")
    start = time.monotonic()
    deadline = start + timeout_s if timeout_s else float("inf")
    stall = stall_timeout_s if stall_timeout_s else float("inf")
    with tempfile.TemporaryFile() as errf, open(dest, "wb") as out:
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errf, start_new_session=True)
        try:
            fd = proc.stdout.fileno()
            last_data = time.monotonic()
            total = 0
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise _data_error(f"{shown}: took longer than {timeout_s:g}s ({total} bytes so far); killed")
                if now - last_data >= stall:
                    raise _data_error(f"{shown}: no data for {stall_timeout_s:g}s ({total} bytes so far); killed")
                if cancel is not None and cancel.is_set():
                    raise _data_error(f"{shown}: cancelled (another shard failed)")
                wait = min(deadline - now, last_data + stall - now, 0.25)
                ready, _, _ = select.select([fd], [], [], max(wait, 0.0))
                if not ready:
                    continue
                data = os.read(fd, CHUNK)
                if not data:
                    break
                if max_bytes and total + len(data) > max_bytes:
                    raise _data_error(f"{shown}: wrote more than {max_bytes / 1e9:g} GB (data.pipe_max_shard_gb); "
                                      f"killed")
                if total // (64 * CHUNK) != (total + len(data)) // (64 * CHUNK):  # every 64 MiB
                    free = shutil.disk_usage(dest.parent).free
                    if free < MIN_FREE_BYTES:
                        raise _data_error(f"{shown}: the shard cache {dest.parent} has {free / 1e9:.2f} GB free "
                                          f"left after {total} bytes of this shard; killed")
                try:
                    _write(out, data)
                except OSError as e:
                    raise _data_error(f"{shown}: cannot write to the shard cache {dest.parent} after {total} "
                                      f"bytes: {e.strerror or e}; killed") from None
                total += len(data)
                last_data = time.monotonic()
            # stdout closed: give the command the rest of the time to exit
            while not _exited(proc.pid):
                if time.monotonic() >= deadline:
                    raise _data_error(f"{shown}: took longer than {timeout_s:g}s (output ended, the command did "
                                      f"not exit); killed")
                time.sleep(0.01)
        except BaseException as e:
            survivors = _end_group(proc)
            if survivors:
                e.add_note(_survivors_note(shown, survivors, GROUP_EXIT_WAIT_S))
            raise
        finally:
            proc.stdout.close()
        # background children it may have left; the group id is still ours (the shell is not reaped yet)
        survivors = _end_group(proc)
        if survivors:
            raise _data_error(_survivors_note(shown, survivors, GROUP_EXIT_WAIT_S))
        rc = proc.returncode
        if rc != 0:
            errf.seek(0)
            lines = [ln for ln in errf.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            detail = f": {_one_line(lines[-1], 200)}" if lines else ""
            raise _data_error(f"{shown}: exited with status {rc}{detail}")
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as e:
            raise _data_error(f"{shown}: cannot write to the shard cache {dest.parent}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------- fetching a shard

def _index_fits(table, tar: Path) -> bool:
    """Whether an index fetched from elsewhere describes this tar: its recorded size, member count and
    fingerprint match (`index_mismatch`), every member inside the file, and the tar header just before the
    first and the last sample's first member carries that member's name."""
    if table.num_rows == 0 or index_mismatch(table, tar) is not None:
        return False
    size = tar.stat().st_size
    keys, members = table.column("key").to_pylist(), table.column("members").to_pylist()
    if not all(ms for ms in members) or max(m["offset"] + m["size"] for ms in members for m in ms) > size:
        return False
    with open(tar, "rb") as f:
        for row in {0, len(keys) - 1}:
            first = members[row][0]
            if first["offset"] < 512:
                return False
            f.seek(first["offset"] - 512)
            header_name = f.read(100).split(b"\0", 1)[0].decode("utf-8", "replace")
            # ustar keeps at most 100 bytes of the name (the full one is in a PAX / GNU record before it)
            if not header_name or not f"{keys[row]}.{first['ext']}".startswith(header_name[:90]):
                return False
    return True


def _fetch_index(src: PipeSource, tmp_tar: Path, tmp_index: Path, timeout_s, stall_timeout_s, cancel,
                 max_bytes: int | None = None):
    """The index of the fetched tar: the remote one if it can be fetched and fits, else built from the tar."""
    command = src.index_command
    if command is not None:
        try:
            run_to_file(command, tmp_index, timeout_s, stall_timeout_s, cancel, max_bytes)
            table = read_index(tmp_index)
            if _index_fits(table, tmp_tar):
                return table
        except Exception:  # noqa: BLE001 - no usable remote index: build it (cancellation is re-checked below)
            pass
        if cancel is not None and cancel.is_set():
            raise _data_error(f"{_one_line(src.url)}: cancelled (another shard failed)")
    try:
        table = scan_tar(tmp_tar)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # ValueError: DataError naming the tmp file
        reason = _one_line(str(e).replace(str(tmp_tar), "output"), 160)
        raise _data_error(f"{_one_line(src.url)}: its output is not a whole tar ({reason})") from None
    if table.num_rows == 0:
        raise _data_error(f"{_one_line(src.url)}: its output has no samples (an empty or non-WebDataset tar)")
    pq.write_table(table, tmp_index)
    return table


def _lock(lock_path: Path, shown: str, wait_s: float | None, cancel: threading.Event | None) -> int:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s if wait_s else float("inf")
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                os.close(fd)
                raise _data_error(f"{shown}: another process has been fetching it for over {wait_s:g}s "
                                  f"(lock {lock_path})") from None
            time.sleep(0.1)


def fetch_pipe(url: str, cache_dir: str | Path, timeout_s: float | None = DEFAULT_TIMEOUT_S,
               stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S,
               cancel: threading.Event | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Path:
    """The local path of the `pipe:` shard `url`, fetched into `cache_dir` (with its index beside it) unless
    it is there already. Timeouts and `max_bytes` of 0 or None are off. Raises DataError with a one-line
    message."""
    src = PipeSource(url)
    cache_dir = Path(cache_dir)
    final = src.cached_path(cache_dir)
    if final.is_file():
        return final
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _data_error(f"cannot create the shard cache directory {cache_dir}: {e.strerror}") from None
    shown = _one_line(url)
    lock_wait = (timeout_s * 2 + 60) if timeout_s else None  # the holder fetches tar + index under its timeouts
    lock_fd = _lock(cache_dir / f".{final.name}.lock", shown, lock_wait, cancel)
    try:
        if final.is_file():  # another process fetched it while we waited
            return final
        tmp_suffix = _tmp_suffix()
        with atomic_path(final, tmp_suffix=tmp_suffix) as tmp_tar:
            run_to_file(src.command, tmp_tar, timeout_s, stall_timeout_s, cancel, max_bytes)
            if tmp_tar.stat().st_size == 0:
                raise _data_error(f"{shown}: the command wrote nothing to stdout")
            # the index gets its final name first (this inner block), so a tar under its final name always has
            # its index (which records the tar's size and fingerprint: load_or_build_index checks those, not
            # modification times)
            with atomic_path(index_path(final), tmp_suffix=tmp_suffix) as tmp_index:
                _fetch_index(src, tmp_tar, tmp_index, timeout_s, stall_timeout_s, cancel, max_bytes)
        return final
    finally:
        os.close(lock_fd)  # releases the lock


def resolve_sources(paths: list[str], cache_dir: str | Path, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                    stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S,
                    prefetch: int = DEFAULT_PREFETCH, max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """`paths` (expanded; local paths, `file:` paths and `pipe:` commands) as local paths, in the same order.
    `pipe:` shards are fetched `prefetch` at a time; the first failure cancels the rest and is raised."""
    out = [p.removeprefix("file:") for p in paths]
    pipes = list(dict.fromkeys(p for p in paths if is_pipe(p)))
    if not pipes:
        return out
    if cache_dir in (None, ""):
        raise _data_error("the data has pipe: shards but no cache directory is set for them")
    cancel = threading.Event()
    fetched: dict[str, Path] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="pipe-fetch")
    try:
        futures = {pool.submit(fetch_pipe, url, cache_dir, timeout_s, stall_timeout_s, cancel, max_bytes): url
                   for url in pipes}  # submitted in order, so shards are fetched in order
        for future in as_completed(futures):
            fetched[futures[future]] = future.result()
    finally:  # on an error (or Ctrl-C) the fetches still running stop within a fraction of a second
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return [str(fetched[p]) if is_pipe(p) else o for p, o in zip(paths, out)]


# ---------------------------------------------------------------------------------------------- streaming
def fetch_pipe_index(url: str, cache_dir: str | Path, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                     stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S,
                     cancel: threading.Event | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Path:
    """The cached tar path of `url` with its index in place beside it, fetching only the index (the command's
    `.index.parquet` twin) where the tar is not cached; where no index can be fetched, the whole tar is.
    `max_bytes` bounds each command's output (see fetch_pipe)."""
    src = PipeSource(url)
    cache_dir = Path(cache_dir)
    final = src.cached_path(cache_dir)
    if index_path(final).is_file():
        return final
    command = src.index_command
    if command is None:
        return fetch_pipe(url, cache_dir, timeout_s, stall_timeout_s, cancel, max_bytes)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _data_error(f"cannot create the shard cache directory {cache_dir}: {e.strerror}") from None
    lock_wait = (timeout_s * 2 + 60) if timeout_s else None
    lock_fd = _lock(cache_dir / f".{final.name}.lock", _one_line(url), lock_wait, cancel)
    try:
        if index_path(final).is_file():
            return final
        try:
            with atomic_path(index_path(final), tmp_suffix=_tmp_suffix()) as tmp_index:
                run_to_file(command, tmp_index, timeout_s, stall_timeout_s, cancel, max_bytes)
                if pq.read_table(tmp_index, schema=INDEX_SCHEMA).num_rows == 0:
                    raise ValueError("an empty index")  # not kept: the whole tar is fetched instead
            return final
        except Exception:  # noqa: BLE001 - no usable remote index: the whole tar, which builds one
            pass
        os.close(lock_fd)
        lock_fd = None
        return fetch_pipe(url, cache_dir, timeout_s, stall_timeout_s, cancel, max_bytes)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def resolve_indexes(urls: list[str], cache_dir: str | Path, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                    stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S,
                    prefetch: int = DEFAULT_PREFETCH, max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """The cached tar paths of the `pipe:` shards `urls` with their indexes in place (the tars themselves are
    fetched later, when read); `prefetch` at a time, the first failure cancelling the rest."""
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="pipe-index")
    try:
        futures = [pool.submit(fetch_pipe_index, u, cache_dir, timeout_s, stall_timeout_s, cancel, max_bytes)
                   for u in urls]
        return [str(f.result()) for f in futures]
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)


def tar_size_bound(index_file: Path) -> int:
    """An upper bound on the size of the tar an index describes: its last member's end, the two end blocks,
    rounded up to whole 10 kB records (how tar writers pad)."""
    table = pq.read_table(index_file, schema=INDEX_SCHEMA).column("members").to_pylist()
    end = max((m["offset"] + -(-m["size"] // 512) * 512 for ms in table for m in ms), default=0)
    return -(-(end + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class ShardCache:
    """`pipe:` tars fetched on demand into `cache_dir`, holding at most `max_bytes` of tars there (0: no
    bound): room is made before a fetch by deleting the least recently used cached tars that no reader of
    this process is using, under a lock on the whole cache, and the fetch's size (bounded from its index) is
    reserved meanwhile so that concurrent fetches of several processes add up within the bound. Indexes stay
    (they are small and the epoch plan was made from them). `prefetch(urls)` fetches ahead, `window` at a time."""

    def __init__(self, cache_dir: str | Path, max_bytes: int = 0, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S, window: int = DEFAULT_PREFETCH,
                 max_shard_bytes: int | None = DEFAULT_MAX_BYTES):
        self.dir, self.max_bytes, self.max_shard_bytes = Path(cache_dir), int(max_bytes), max_shard_bytes
        self.timeout_s, self.stall_timeout_s, self.window = timeout_s, stall_timeout_s, max(1, window)
        self._pending: dict[str, Future] = {}
        self._in_use: set[str] = set()
        self._guard = threading.Lock()

    def __getstate__(self):  # threads and futures stay in the process that made them
        state = self.__dict__.copy()
        state.update(_pending={}, _in_use=set(), _guard=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._guard = threading.Lock()

    def use(self, paths) -> None:
        """The cached tar paths this process reads now or next: never evicted by it."""
        self._in_use = set(map(str, paths))

    def ensure(self, url: str) -> Path:
        """The local path of `url`'s tar, fetched now if it is not cached (waiting for a prefetch under way)."""
        with self._guard:
            future = self._pending.get(url)
        if future is not None:
            return future.result()
        return self._fetch(url)

    def prefetch(self, urls: list[str]) -> None:
        """Starts fetching the first of `urls` not cached, `window` at a time. The threads are daemons: a loader
        worker that exits does not wait for them (their temporary files are removed by the next fetch)."""
        with self._guard:
            for done in [u for u, f in self._pending.items() if f.done()]:
                self._pending.pop(done).exception()  # a failed prefetch is retried (and raised) by ensure()
            for url in urls:
                if len(self._pending) >= self.window:
                    break
                if url not in self._pending and not PipeSource(url).cached_path(self.dir).is_file():
                    future = Future()
                    self._pending[url] = future
                    threading.Thread(target=self._fetch_into, args=(url, future), daemon=True,
                                     name="pipe-prefetch").start()

    def _fetch_into(self, url: str, future: Future) -> None:
        try:
            future.set_result(self._fetch(url))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the shard
            future.set_exception(e)

    def _fetch(self, url: str) -> Path:
        final = PipeSource(url).cached_path(self.dir)
        if final.is_file():
            return final
        reservation = self._reserve(final) if self.max_bytes else None
        try:
            return fetch_pipe(url, self.dir, self.timeout_s, self.stall_timeout_s, max_bytes=self.max_shard_bytes)
        finally:
            if reservation is not None:
                reservation.unlink(missing_ok=True)

    def _reserve(self, final: Path) -> Path:
        """Makes room for `final` (evicting) and reserves its bound; returns the reservation file."""
        need = tar_size_bound(index_path(final))
        if need > self.max_bytes:
            raise _data_error(f"{final.name}: up to {need} bytes, more than data.cache_max_gb allows "
                              f"({self.max_bytes} bytes); raise data.cache_max_gb")
        started = time.monotonic()
        deadline = started + (self.stall_timeout_s or DEFAULT_STALL_TIMEOUT_S)
        while True:
            fd = _lock(self.dir / ".cache.lock", str(self.dir), None, None)
            try:
                tars, reserved = [], 0
                for p in self.dir.iterdir():
                    if p.name.endswith(".tar"):
                        try:
                            st = p.stat()
                        except FileNotFoundError:
                            continue
                        tars.append((st.st_mtime, st.st_size, p))
                    elif p.name.startswith(".reserve-"):
                        if _process_gone(int(p.name.split("-")[1])):  # left by a killed process
                            p.unlink(missing_ok=True)
                        else:
                            reserved += int(p.name.rsplit("-", 1)[1])
                    elif p.name.endswith(".tmp") and (m := _TMP_OWNER.search(p.name)) and _process_gone(
                            int(m.group(1))):
                        p.unlink(missing_ok=True)  # a fetch of a killed process
                used = reserved + sum(size for _, size, _ in tars)
                mine = sum(size for _, size, p in tars if str(p) in self._in_use)
                if mine + need > self.max_bytes:  # waiting would not help: this reader needs them all at once
                    raise _data_error(f"data.cache_max_gb={self.max_bytes / 1e9:g} cannot hold the shards one "
                                      f"loader worker reads at once ({mine + need} bytes); raise it, or lower "
                                      f"data.shuffle_block or data.pipe_prefetch")
                for _, size, p in sorted(tars):
                    if used + need <= self.max_bytes:
                        break
                    if str(p) not in self._in_use:
                        p.unlink(missing_ok=True)  # readers with it open keep reading; others fetch it again
                        used -= size
                if used + need <= self.max_bytes:
                    reservation = self.dir / f".reserve-{os.getpid()}-{uuid.uuid4().hex[:8]}-{need}"
                    reservation.touch()
                    return reservation
            finally:
                os.close(fd)
            if time.monotonic() >= deadline:
                raise _data_error(f"the shard cache {self.dir} stayed full for {deadline - started:g}s "
                                  f"(data.cache_max_gb={self.max_bytes / 1e9:g}) with shards other readers use; "
                                  f"raise data.cache_max_gb")
            time.sleep(0.05)  # the shards in use, or other processes' reservations, will free room
