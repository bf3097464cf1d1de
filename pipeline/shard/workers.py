"""The worker processes of `python -m pipeline shard`: chunks of planned rows in, outcomes (Sample or Failure) out,
in input order, with a bounded number of chunks in flight."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Iterator

from pipeline.shard.images import describe_error
from pipeline.shard.samples import Failure, Sample, SampleSettings, build_sample

_WORKER_SETTINGS: SampleSettings | None = None  # set once per worker process by _init_worker


def _exit_with_parent(parent: int) -> None:
    """A worker whose main process was killed (kill -9 leaves no time to stop it) would wait for work forever:
    every worker holds the task queue's write end too, so it never sees end-of-file. Watch the parent instead."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _init_worker(settings: SampleSettings, parent: int) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _process_items(items: list, settings: SampleSettings) -> list[Sample | Failure]:
    out = []
    for item in items:
        if isinstance(item, Failure):  # decided while planning (duplicate key, unreadable row)
            out.append(item)
            continue
        key, row = item
        try:
            out.append(build_sample(key, row, settings))
        except Exception as e:  # bad input never stops the run; the reason says it was unexpected
            out.append(Failure("processing_error", describe_error(e)))
    return out


def _process_chunk(items: list) -> list[Sample | Failure]:
    return _process_items(items, _WORKER_SETTINGS)


def process_in_order(chunks: Iterator, settings: SampleSettings, workers: int) -> Iterator[tuple[list, list]]:
    """(metadata, outcomes) per chunk, in input order, with at most a few chunks per worker in flight."""
    if workers == 0:
        for meta, items in chunks:
            yield meta, _process_items(items, settings)
        return
    # spawn: workers import only what they need (no torch), and no lock held by a thread here is inherited
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(settings, os.getpid()))
    pending: deque = deque()
    try:
        for meta, items in chunks:
            pending.append((meta, pool.submit(_process_chunk, items)))
            if len(pending) >= 4 * workers:
                meta0, fut = pending.popleft()
                yield meta0, fut.result()
        while pending:
            meta0, fut = pending.popleft()
            yield meta0, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
