"""The bounded `pipe:` cache of a training stream: tars fetched when read or prefetched, evicted least recently
used so that all processes of a node stay within `data.cache_max_gb`.

`resolve_indexes` (pipeline/data/remote.py) fetches only the indexes before step 1 (the epoch plan needs the
sample counts, nothing else); a tar is fetched when a reader needs it or a loader worker prefetches it for its
next batches. With a byte bound, a fetch first reserves the tar's size (bounded from its index) under a lock on
the whole cache, deleting the least recently used tars that this process is not about to read, so the tars and
reservations of all processes on the node stay within the bound. A deleted tar that some reader still has open
stays readable to it; one needed again is fetched again.
"""
from __future__ import annotations

import os
import tarfile
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.data.errors import DataError
from pipeline.data.remote import (DEFAULT_MAX_BYTES, DEFAULT_PREFETCH, DEFAULT_STALL_TIMEOUT_S, DEFAULT_TIMEOUT_S,
                                  FETCH_TMP_OWNER, PipeSource, acquire_lock, fetch_pipe)
from pipeline.data.shard_index import INDEX_SCHEMA, index_path


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
            raise DataError(f"{final.name}: up to {need} bytes, more than data.cache_max_gb allows "
                              f"({self.max_bytes} bytes); raise data.cache_max_gb")
        started = time.monotonic()
        deadline = started + (self.stall_timeout_s or DEFAULT_STALL_TIMEOUT_S)
        while True:
            fd = acquire_lock(self.dir / ".cache.lock", str(self.dir), None, None)
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
                    elif p.name.endswith(".tmp") and (m := FETCH_TMP_OWNER.search(p.name)) and _process_gone(
                            int(m.group(1))):
                        p.unlink(missing_ok=True)  # a fetch of a killed process
                used = reserved + sum(size for _, size, _ in tars)
                mine = sum(size for _, size, p in tars if str(p) in self._in_use)
                if mine + need > self.max_bytes:  # waiting would not help: this reader needs them all at once
                    raise DataError(f"data.cache_max_gb={self.max_bytes / 1e9:g} cannot hold the shards one "
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
                raise DataError(f"the shard cache {self.dir} stayed full for {deadline - started:g}s "
                                  f"(data.cache_max_gb={self.max_bytes / 1e9:g}) with shards other readers use; "
                                  f"raise data.cache_max_gb")
            time.sleep(0.05)  # the shards in use, or other processes' reservations, will free room
