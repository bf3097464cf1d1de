"""The data path at LAION scale: epoch planning, start-up over many shards, worker memory over an epoch.

    python bench/loader_scale.py --work /tmp/loader_scale            # all three parts
    python bench/loader_scale.py --work /tmp/loader_scale --parts plan

Each measurement runs in a fresh Python process, so imports and peak RSS are those of one loader process.

1. plan: `EpochPlan` for 41,408 shards x 10,000 samples (no files: the counts are all a plan needs): build
   time, peak RSS of the process, and single-position lookups timed at the start, middle and end of the epoch.
   Baseline: the materialised order the loader used before (`_materialised_order` below, the removed
   `epoch_order`) on a tenth of the shards, as the full size needs ~7 GB.
2. start: `--shards` real indexed shards (4 caption-only samples each) with one manifest.json; time from process
   start to the first batch of the last of 256 ranks (64 per rank, 2 loader workers), and how long the ShardSet took.
   Baseline: the start-up the loader did before, opening every shard's index for its row count, same shards.
3. rss: `--rss-shards` shards of 100 samples; one loader worker reads a whole epoch; its RSS when it has read
   100 shards and at the end. Baseline: the same with an unbounded member-table cache (the loader before).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pipeline package, whatever is installed


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ 1. plan
PLAN_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
from pipeline.data.epoch_plan import EpochPlan
rss_mb = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
before = rss_mb()
counts = np.full(int(sys.argv[1]), int(sys.argv[2]), dtype=np.int64)
t = time.perf_counter()
plan = EpochPlan(counts, 0, 5, 4096)
build = time.perf_counter() - t
lookups = {}
for name, start in (("start", 0), ("middle", plan.length // 2), ("end", plan.length - 1000)):
    t = time.perf_counter()
    for p in range(start, start + 1000):
        plan.ids(p)
    single = (time.perf_counter() - t) / 1000
    window = np.arange(min(start, plan.length - 256 * 20), min(start, plan.length - 256 * 20) + 256 * 20)
    t = time.perf_counter()
    for b in range(20):
        plan.ids(window[b * 256:(b + 1) * 256])
    lookups[name] = {"single_us": single * 1e6, "batch256_ms": (time.perf_counter() - t) / 20 * 1e3}
print(json.dumps({"samples": plan.length, "build_s": build, "rss_after_import_mb": before, "rss_mb": rss_mb(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "lookups": lookups}))
"""

OLD_PLAN_CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from loader_scale import _materialised_order
rss_mb = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
before = rss_mb()
counts = np.full(int(sys.argv[1]), int(sys.argv[2]), dtype=np.int64)
t = time.perf_counter()
order = _materialised_order(counts, 0, 5, 4096)
build = time.perf_counter() - t
print(json.dumps({"samples": len(order), "build_s": build, "rss_after_import_mb": before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _materialised_order(counts, seed, epoch, shuffle_block):
    """The loader's epoch order before the lazy plan (unweighted case): the whole epoch as one int64 array."""
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.concatenate([np.arange(starts[s], starts[s] + counts[s]) for s in rng.permutation(len(counts))])
    for b in range(0, len(order), shuffle_block):
        rng.shuffle(order[b:b + shuffle_block])
    return order


def bench_plan(shards: int, per_shard: int) -> dict:
    ours = _child(PLAN_CHILD, str(shards), str(per_shard))
    old = _child(OLD_PLAN_CHILD, str(shards // 10), str(per_shard), str(Path(__file__).parent))
    print(f"[plan] lazy EpochPlan, {shards} x {per_shard} = {ours['samples']:,} samples: built in "
          f"{ours['build_s'] * 1e3:.1f} ms; process peak RSS {ours['peak_rss_mb']:.0f} MB (numpy + the plan; "
          f"{ours['rss_after_import_mb']:.0f} MB after imports)")
    for name, t in ours["lookups"].items():
        print(f"[plan]   lookup at the {name:<6}: {t['single_us']:.1f} us per single position, "
              f"{t['batch256_ms']:.2f} ms per 256 positions")
    print(f"[plan] baseline, materialised order (the loader before), {shards // 10} x {per_shard} = "
          f"{old['samples']:,} samples: {old['build_s']:.2f} s, peak RSS {old['peak_rss_mb']:.0f} MB")
    return {"lazy": ours, "materialised_tenth": old}


# ------------------------------------------------------------------------------------------------ data
def _write_shards(directory: Path, count: int, per_shard: int) -> list[str]:
    """`count` indexed caption-only shards and their manifest, written directly (no fsync per shard: ~2 ms each)."""
    import pyarrow as pa

    from pipeline.data.manifest import ShardEntry, manifest_path, write_manifest
    from pipeline.data.shard_index import INDEX_SCHEMA, index_path, write_index

    paths = [directory / f"s-{i:06d}.tar" for i in range(count)]
    if manifest_path(directory).is_file():
        return [str(p) for p in paths]
    directory.mkdir(parents=True, exist_ok=True)
    entries = {}
    started = time.perf_counter()
    for i, path in enumerate(paths):
        buf = io.BytesIO()
        keys, members = [], []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(per_shard):
                key = f"{i:06d}{j:04d}"
                data = f"a caption of sample {j} of shard {i}".encode()
                info = tarfile.TarInfo(f"{key}.txt")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                keys.append(key)
                members.append([{"ext": "txt", "offset": tf.members[-1].offset_data, "size": len(data)}])
        path.write_bytes(buf.getvalue())
        write_index(pa.table({"key": keys, "members": members}, schema=INDEX_SCHEMA), index_path(path))
        entries[path.name] = ShardEntry(per_shard, len(buf.getvalue()))
        if (i + 1) % 5000 == 0:
            print(f"[data] {i + 1}/{count} shards written ({time.perf_counter() - started:.0f} s)", flush=True)
    write_manifest(directory, entries)
    return [str(p) for p in paths]


# ------------------------------------------------------------------------------------------------ 2. start
START_CHILD = r"""
import time
t0 = time.perf_counter()
import json, sys
from pipeline.data.loader import LoaderSpec, ShardBatches, ShardSet, expand_sources, make_train_loader
class Captions:
    def sample(self, raw): return {"txt": raw["txt"].decode()}
    def collate(self, samples): return {"txt": [s["txt"] for s in samples]}
t_import = time.perf_counter() - t0
sources = expand_sources(sys.argv[1], "data.train")
t = time.perf_counter()
shards = ShardSet.from_sources(sources)
t_shardset = time.perf_counter() - t
world = min(256, shards.total // 64)
ds = ShardBatches(shards, LoaderSpec(batch_size=64, rank=world - 1, world_size=world, seed=0), Captions())
batch = next(iter(make_train_loader(ds, 2, pin_memory=False)))
assert len(batch["keys"]) == 64
print(json.dumps({"shards": len(shards.paths), "world": world, "first_batch_s": time.perf_counter() - t0, "imports_s": t_import,
                  "shardset_s": t_shardset}))
"""

OLD_START_CHILD = r"""
import json, sys, time
from pipeline.data.loader import expand_shards
from pipeline.data.shard_index import load_or_build_index
paths = expand_shards(sys.argv[1])
t = time.perf_counter()
total = sum(load_or_build_index(p).num_rows for p in paths)
print(json.dumps({"shards": len(paths), "samples": total, "counting_s": time.perf_counter() - t}))
"""


def bench_start(work: Path, count: int) -> dict:
    directory = work / f"start_{count}"
    _write_shards(directory, count, 4)
    pattern = str(directory) + "/s-{000000..%06d}.tar" % (count - 1)
    ours = _child(START_CHILD, pattern)
    old = _child(OLD_START_CHILD, pattern)
    print(f"[start] {count} indexed shards, one manifest.json: first batch of the last of {ours['world']} ranks after "
          f"{ours['first_batch_s']:.2f} s from process start (imports {ours['imports_s']:.2f} s, ShardSet "
          f"{ours['shardset_s']:.2f} s)")
    print(f"[start] baseline, one index read per shard (the loader before): {old['counting_s']:.2f} s for the "
          f"counts alone")
    return {"ours": ours, "one_index_per_shard": old}


# ------------------------------------------------------------------------------------------------ 3. rss
RSS_CHILD = r"""
import json, sys
import numpy as np
from pipeline.data.loader import LoaderSpec, ShardBatches, ShardSet, expand_shards, make_train_loader
def rss_mb(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
class Captions:
    def sample(self, raw): return {"txt": raw["txt"].decode()}
    def collate(self, samples): return {"txt": [s["txt"] for s in samples]}
class Measured(ShardBatches):
    touched = None
    def make_batch(self, k):  # runs in the worker: its RSS and how many shards it has read so far
        batch = super().make_batch(k)
        self.touched = set() if self.touched is None else self.touched
        _, ids = self.batch_ids(k)
        self.touched.update(np.searchsorted(self.shards.starts, ids, side="right").tolist())
        return {**batch, "rss_mb": rss_mb(), "touched": len(self.touched)}
shards = ShardSet(expand_shards(sys.argv[1]))
ds = Measured(shards, LoaderSpec(batch_size=256, seed=0), Captions())
if sys.argv[2] == "unbounded":
    shards.cache_shards = 10**9
    import pipeline.data.loader as L; L.MAX_OPEN_SHARDS = 10**9
samples = []
for batch in make_train_loader(ds, 1, pin_memory=False):
    samples.append((batch["touched"], batch["rss_mb"]))
    if batch["index"] == ds.batches_per_epoch - 1:
        break
at100 = next(r for t, r in samples if t >= 100)
print(json.dumps({"rss_at_100_mb": at100, "rss_end_mb": samples[-1][1], "shards_end": samples[-1][0],
                  "rss_first_mb": samples[0][1], "batches": len(samples), "cache_shards": shards.cache_shards}))
"""


def bench_rss(work: Path, count: int) -> dict:
    directory = work / f"rss_{count}"
    _write_shards(directory, count, 100)
    pattern = str(directory) + "/s-{000000..%06d}.tar" % (count - 1)
    ours = _child(RSS_CHILD, pattern, "bounded")
    old = _child(RSS_CHILD, pattern, "unbounded")
    growth = (ours["rss_end_mb"] / ours["rss_at_100_mb"] - 1) * 100
    print(f"[rss] one worker over {ours['shards_end']} shards x 100 ({ours['batches']} batches of 256), LRU of "
          f"{ours['cache_shards']} shards: RSS {ours['rss_at_100_mb']:.1f} MB after 100 shards, "
          f"{ours['rss_end_mb']:.1f} MB at the end ({growth:+.1f}%)")
    old_growth = (old["rss_end_mb"] / old["rss_at_100_mb"] - 1) * 100
    print(f"[rss] baseline, unbounded member tables (the loader before): {old['rss_at_100_mb']:.1f} MB after 100 "
          f"shards, {old['rss_end_mb']:.1f} MB at the end ({old_growth:+.1f}%)")
    return {"ours": ours, "unbounded": old}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="where the generated shards go (reused if present)")
    ap.add_argument("--parts", default="plan,start,rss")
    ap.add_argument("--plan-shards", type=int, default=41_408)
    ap.add_argument("--plan-samples-per-shard", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=41_408, help="indexed shards for the start-up part")
    ap.add_argument("--rss-shards", type=int, default=2_000)
    a = ap.parse_args()
    parts = a.parts.split(",")
    results = {}
    if "plan" in parts:
        results["plan"] = bench_plan(a.plan_shards, a.plan_samples_per_shard)
    if "start" in parts:
        results["start"] = bench_start(a.work, a.shards)
    if "rss" in parts:
        results["rss"] = bench_rss(a.work, a.rss_shards)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
