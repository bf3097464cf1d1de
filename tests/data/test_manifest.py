"""manifest.json: the loader's sample counts from one file; foreign tars counted once per dataset."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CaptionDecoder
from pipeline.data.errors import DataError
from pipeline.data.loader import LoaderSpec, ShardBatches, ShardSet, expand_shards
from pipeline.data.manifest import MANIFEST_NAME, read_manifest
from pipeline.data.shard_index import index_path
from pipeline.shard.writer import ShardWriter

REPO = Path(__file__).resolve().parents[2]


def _foreign_tars(directory: Path, sizes: list[int]) -> list[str]:
    """Plain tars as another tool writes them: no index, no manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(sizes):
        path = directory / f"{i:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for j in range(n):
                data = f"shard {i} sample {j}".encode()
                info = tarfile.TarInfo(f"{i:05d}{j:04d}.txt")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _written(tmp_path, sizes=(9, 4, 9, 1)) -> list[str]:
    with ShardWriter(tmp_path, prefix="m", samples_per_shard=max(sizes)) as w:
        for i, n in enumerate(sizes):
            for j in range(n):
                w.write(f"{i}_{j}", {"txt": f"{i} {j}"})
            if n < max(sizes):
                w._finish_shard()
    return expand_shards(str(tmp_path) + "/m-{000000..%06d}.tar" % (len(sizes) - 1))


def test_the_loader_takes_counts_from_the_manifest_without_opening_an_index(tmp_path):
    paths = _written(tmp_path)
    entries = read_manifest(tmp_path / MANIFEST_NAME)
    assert [entries[Path(p).name].samples for p in paths] == [9, 4, 9, 1]
    for p in paths:  # the indexes are gone: a reader that opened one would rebuild it
        index_path(p).unlink()
    shards = ShardSet(paths)
    assert shards.counts.tolist() == [9, 4, 9, 1] and shards.total == 23
    assert not any(index_path(p).exists() for p in paths)  # nothing was read or built at start-up
    assert shards.read(9)[0] == "1_0"  # a worker builds the index of the shard it reads, and only that one
    assert [index_path(p).exists() for p in paths] == [False, True, False, False]


def test_foreign_tars_are_counted_once_by_one_of_many_processes(tmp_path):
    """Four processes start on the same directory of 30 index-less tars at once: every shard is counted (its
    index built) exactly once in all, and all four get the same counts."""
    sizes = [int(x) for x in np.random.default_rng(0).integers(1, 12, 30)]
    paths = _foreign_tars(tmp_path / "d", sizes)
    child = (
        "import json, sys\n"
        "import pipeline.data.manifest as m\n"
        "calls = []\n"
        "real = m.count_shard\n"
        "m.count_shard = lambda p: (calls.append(str(p)), real(p))[1]\n"
        "entries = m.shard_entries(json.loads(sys.argv[1]))\n"  # what ShardSet reads its counts from
        "print(json.dumps({'counts': [e.samples for e in entries], 'counted': calls}))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", child, json.dumps(paths)], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(4)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(r["counts"] == sizes for r in results)
    counted = [p for r in results for p in r["counted"]]
    assert sorted(counted) == sorted(paths)  # each shard once, by whichever process held the lock
    entries = read_manifest(tmp_path / "d" / MANIFEST_NAME)
    assert [entries[Path(p).name].samples for p in paths] == sizes
    more = _foreign_tars(tmp_path / "d2", [3]) + paths[:2]  # a later run adds shards of another directory
    assert ShardSet(more).counts.tolist() == [3] + sizes[:2]


def test_a_shard_changed_after_the_manifest_stops_the_reader_naming_it(tmp_path):
    paths = _written(tmp_path)
    shards = ShardSet(paths)
    _foreign_tars(tmp_path / "other", [5])
    os.replace(tmp_path / "other" / "00000.tar", paths[1])  # 5 samples where the manifest says 4
    index_path(paths[1]).unlink()
    with pytest.raises(DataError, match=r"m-000001.tar: .*manifest"):
        shards.read(9)
    assert ShardSet(paths[:1]).read(0)[0] == "0_0"  # the others still read
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not a readable shard manifest .*delete it"):
        ShardSet(paths)


def test_where_the_directory_takes_no_lock_the_manifest_goes_to_the_shard_cache(tmp_path, monkeypatch):
    paths = _foreign_tars(tmp_path / "d", [3, 5])
    (tmp_path / "d" / f".{MANIFEST_NAME}.lock").mkdir()  # cannot be opened as a lock file
    monkeypatch.setenv("PIPELINE_SHARD_CACHE", str(tmp_path / "cache"))
    assert ShardSet(paths).counts.tolist() == [3, 5]
    assert not (tmp_path / "d" / MANIFEST_NAME).exists()
    [cached] = (tmp_path / "cache" / "manifests").glob(f"*-{MANIFEST_NAME}")
    assert {n: e.samples for n, e in read_manifest(cached).items()} == {"00000.tar": 3, "00001.tar": 5}


def test_a_reader_holds_only_the_shards_of_one_shuffle_block_and_reads_every_sample_once(tmp_path):
    sizes = [20, 7, 20, 20, 13, 20, 20, 3, 20, 20, 20, 20, 20, 20, 11, 20, 20, 20, 20, 20]
    paths = _written(tmp_path, sizes)
    shards = ShardSet(paths)
    ds = ShardBatches(shards, LoaderSpec(batch_size=8, seed=2, shuffle_block=16), CaptionDecoder())
    assert shards.cache_shards == 2 * (-(-16 // 3) + 1)  # twice the shards a block of 16 can span
    keys, held = [], []
    for k in range(ds.batches_per_epoch):
        keys += ds.make_batch(k)["keys"]
        held.append((len(shards._members), len(shards._fds)))
    assert len(keys) == len(set(keys)) == ds.batches_per_epoch * 8 and sum(sizes) - len(keys) < 8
    assert max(m for m, _ in held) <= shards.cache_shards and max(f for _, f in held) <= shards.cache_shards
    assert max(m for m, _ in held) < len(sizes)  # the LRU did evict
    shards.size_cache_for(16, resampled=True)
    assert shards.cache_shards == 2 * (8 + 1)  # resampled: a block holds 8 shard draws
    two = ShardSet.from_sources([paths[:10], paths[10:]])
    two.size_cache_for(16, weights=(1.0, 0.25))
    assert two.cache_shards == 2 * (-(-16 // 2) + 1)  # weight 0.25 takes floor(11 / 4) = 2 of the smallest shard
    open_before = len(os.listdir("/proc/self/fd"))
    shards.close()
    assert len(os.listdir("/proc/self/fd")) == open_before - held[-1][1]
