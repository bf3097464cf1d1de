"""`pipe:CMD` shard sources: the shell command's stdout is the tar, fetched into a local cache with timeouts.

WebDataset streams `pipe:` shards straight into the decoder, and a stalled command (a hung `aws s3 cp`, a
`curl` waiting on a dead connection) blocks the job forever. Our loader reads samples by offset through the
per-shard index, so it needs the tar as a local file anyway: each `pipe:` shard is copied once into a cache
directory, under a name derived from the command, and read from there.

A fetch runs the command (pipeline/data/pipe_command.py: timeouts, byte cap, no process left behind) into
`<name>.<id>.tmp` and renames it to `<name>` only when the command exited 0 and the bytes are a readable tar.

The index comes with the shard where the command can address it: the command with the shard's `.tar` token
changed to `.index.parquet` (`pipe:aws s3 cp s3://b/train-000001.tar -` -> `... s3://b/train-000001.index.parquet -`).
When that command fails, or gives an index that does not fit the tar, the index is built from the fetched tar
(headers only). The index is in place before the tar gets its final name, so a cached tar always has one.

Several processes (the ranks of a node) may share a cache directory: a lock file per shard makes one of them
fetch while the others wait for it, then use its copy.

Training streams fetch through `ShardCache` (pipeline/data/shard_cache.py), which bounds the cache.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.atomic_write import atomic_path
from pipeline.data.errors import DataError
from pipeline.data.pipe_command import PIPE_PREFIX, one_line, run_to_file
from pipeline.data.shard_index import INDEX_SCHEMA, index_mismatch, index_path, read_index, scan_tar

DEFAULT_TIMEOUT_S = 3600.0  # whole fetch of one shard
DEFAULT_STALL_TIMEOUT_S = 120.0  # no byte at all for this long
DEFAULT_PREFETCH = 4  # shards fetched at once
DEFAULT_MAX_BYTES = 64 * 10**9  # per shard (data.pipe_max_shard_gb): no real shard is near it, a runaway is
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
FETCH_TMP_OWNER = re.compile(r"\.(\d+)-[0-9a-f]{8}\.tmp$")  # fetch_pipe's temporary names carry the fetching pid


def _tmp_suffix() -> str:
    """The temporary-file suffix of one fetch: its pid (for FETCH_TMP_OWNER) and a random tag (threads share a pid)."""
    return f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


@dataclass(frozen=True)
class PipeSource:
    """One `pipe:CMD` shard."""
    url: str

    def __post_init__(self):
        if not is_pipe(self.url) or not self.command:
            raise DataError(f"not a pipe: source (expected 'pipe:COMMAND'): {self.url!r}")

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
            raise DataError(f"{one_line(src.url)}: cancelled (another shard failed)")
    try:
        table = scan_tar(tmp_tar)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # ValueError: DataError naming the tmp file
        reason = one_line(str(e).replace(str(tmp_tar), "output"), 160)
        raise DataError(f"{one_line(src.url)}: its output is not a whole tar ({reason})") from None
    if table.num_rows == 0:
        raise DataError(f"{one_line(src.url)}: its output has no samples (an empty or non-WebDataset tar)")
    pq.write_table(table, tmp_index)
    return table


def acquire_lock(lock_path: Path, shown: str, wait_s: float | None, cancel: threading.Event | None) -> int:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s if wait_s else float("inf")
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                os.close(fd)
                raise DataError(f"{shown}: another process has been fetching it for over {wait_s:g}s "
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
        raise DataError(f"cannot create the shard cache directory {cache_dir}: {e.strerror}") from None
    shown = one_line(url)
    lock_wait = (timeout_s * 2 + 60) if timeout_s else None  # the holder fetches tar + index under its timeouts
    lock_fd = acquire_lock(cache_dir / f".{final.name}.lock", shown, lock_wait, cancel)
    try:
        if final.is_file():  # another process fetched it while we waited
            return final
        tmp_suffix = _tmp_suffix()
        with atomic_path(final, tmp_suffix=tmp_suffix) as tmp_tar:
            run_to_file(src.command, tmp_tar, timeout_s, stall_timeout_s, cancel, max_bytes)
            if tmp_tar.stat().st_size == 0:
                raise DataError(f"{shown}: the command wrote nothing to stdout")
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
        raise DataError("the data has pipe: shards but no cache directory is set for them")
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
        raise DataError(f"cannot create the shard cache directory {cache_dir}: {e.strerror}") from None
    lock_wait = (timeout_s * 2 + 60) if timeout_s else None
    lock_fd = acquire_lock(cache_dir / f".{final.name}.lock", one_line(url), lock_wait, cancel)
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
