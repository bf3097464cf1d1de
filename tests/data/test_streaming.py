"""`pipe:` shards streamed during training: fetched ahead of use into a bounded cache, read key for key as
the same shards read locally."""
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import CaptionDecoder
from pipeline.data.errors import DataError
from pipeline.data.loader import FetchSpec, LoaderSpec, ShardBatches, ShardSet, expand_shards, make_train_loader
from pipeline.data.shard_cache import tar_size_bound
from pipeline.data.shard_index import index_path
from pipeline.shard.writer import ShardWriter


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_src")
    with ShardWriter(root, prefix="s", samples_per_shard=6) as w:
        for i in range(200 * 6):
            w.write(f"{i:06d}", {"txt": f"sample {i:06d} " + "x" * 2000})  # ~15 kB per shard
    return expand_shards(str(root) + "/s-{000000..000199}.tar")


def _cache_bytes(cache: Path) -> int:
    total = 0
    for p in cache.iterdir():
        if p.name.endswith(".tar") or (p.name.endswith(".tmp") and ".tar." in p.name):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
    return total


def test_pipe_stream_in_a_cache_of_20_shards_gives_the_local_runs_keys(local_shards, tmp_path):
    spec = LoaderSpec(batch_size=12, seed=3, shuffle_block=24)
    local = ShardBatches(ShardSet(local_shards), spec, CaptionDecoder())
    n = local.batches_per_epoch + 3  # into the next epoch: shards come back after their eviction
    expected = [local.make_batch(k)["keys"] for k in range(n)]

    cache = tmp_path / "cache"
    bound = 20 * tar_size_bound(index_path(local_shards[0]))
    fetch = FetchSpec(str(cache), 60, 10, prefetch=3, cache_max_bytes=bound)
    started = time.monotonic()
    streamed = ShardSet([f"pipe:cat {p}" for p in local_shards], fetch=fetch)
    assert streamed.counts.tolist() == ShardSet(local_shards).counts.tolist()
    assert not list(cache.glob("*.tar"))  # only the indexes were fetched before step 1
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _cache_bytes(cache))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got, tars_at_first = [], None
        for batch in make_train_loader(ShardBatches(streamed, spec, CaptionDecoder()), 2, pin_memory=False):
            if tars_at_first is None:
                tars_at_first = len(list(cache.glob("*.tar")))
            got.append(batch["keys"])
            if len(got) == n:
                break
    finally:
        stop.set()
        watcher.join()
    assert got == expected  # key for key, across the epoch boundary
    assert tars_at_first < 30  # the first batch did not wait for the dataset
    assert 0 < peak[0] <= bound  # the cache never held more than its bound
    assert time.monotonic() - started < 120


def test_a_bound_smaller_than_one_shard_is_a_one_line_error(local_shards, tmp_path):
    fetch = FetchSpec(str(tmp_path / "cache"), 60, 10, prefetch=2, cache_max_bytes=1000)
    shards = ShardSet([f"pipe:cat {p}" for p in local_shards[:3]], fetch=fetch)
    with pytest.raises(DataError, match="more than data.cache_max_gb allows"):
        shards.read(0)


def test_a_bound_below_what_one_reader_needs_at_once_fails_fast(local_shards, tmp_path):
    """A shuffle block over all 200 shards with a cache of 20 would wait for room that never comes: one line."""
    bound = 20 * tar_size_bound(index_path(local_shards[0]))
    fetch = FetchSpec(str(tmp_path / "cache"), 60, 30, prefetch=2, cache_max_bytes=bound)
    shards = ShardSet([f"pipe:cat {p}" for p in local_shards], fetch=fetch)
    ds = ShardBatches(shards, LoaderSpec(batch_size=600, seed=0, shuffle_block=1200), CaptionDecoder())
    started = time.monotonic()
    # a shard-level problem ends the batch with its one-line message, which the training loop raises
    assert re.search(r"data.cache_max_gb=.* cannot hold the shards one loader worker reads", ds.make_batch(0)["error"])
    assert time.monotonic() - started < 25  # not the stall timeout (30 s)
