"""From brace-expanded shard paths to training batches, exactly, resumably and elastically.

The order of an epoch is a pure function of (seed, epoch, shard sizes, source weights): shards are shuffled,
then samples are shuffled within blocks of `shuffle_block`. It is never materialised: `EpochPlan`
(pipeline/data/epoch_plan.py) maps any position to its sample id in O(1), from arrays of one entry per shard.
The shard sizes come from one `manifest.json` per shard directory (pipeline/data/manifest.py), and a reader keeps
only the member tables and descriptors of the shards one shuffle block spans (an LRU), so neither start-up nor
a worker's memory grows with the number of shards. The epoch is consumed one global batch at a time:
the global batch at sample offset `o` is `order[o : o + G]` (G = world_size x batch_size) and rank r takes
its r-th slice. The remainder of an epoch that does not fill a global batch is dropped, so every rank has the
same number of batches (DDP never hangs on uneven shards) and no sample is seen twice within an epoch.

The loader's whole state is a `StreamPosition(epoch, offset)`: it does not depend on the world size, so a run
checkpointed on 2 ranks continues on 1 rank (or 4) exactly where the epoch stopped, without repeating or
skipping a sample (elastic resumption). Batch k after the start is built by loader worker k % workers, so
the stream is the same for any worker count; augmentation randomness is seeded per (seed, epoch, sample), so
resumed batches are bit-identical.

Several sources (`a/{0..99}.tar::b/{0..9}.tar`) can be mixed with per-source weights: a weight w makes a
source contribute round(w x its size) samples per epoch (whole copies plus a seeded subset spread over its
shards in proportion to their sizes, so w=0.5 halves and w=2 doubles it). `resampled` mode draws every epoch
with replacement instead, with per-sample probability proportional to its source's weight (open_clip's
`--dataset-resampled`).

`pipe:CMD` shards (object stores: `pipe:aws s3 cp s3://b/train-000001.tar -`) are fetched into a node-local cache
with a stall timeout, so a stalled pipe fails with one line naming the command instead of hanging the job. A
training `ShardSet` streams them: only their indexes are fetched up front, each tar when it is first read and
ahead of use by the worker that will read it, into a cache bounded by `data.cache_max_gb` (`ShardCache`).

What a sample becomes is its decoder's business (pipeline/data/decoders.py): the stream reads its members,
seeds the decoder per sample and counts the samples it rejects.
"""
from __future__ import annotations

import math
import os
import signal
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.decoders import MAX_CAPTION_BYTES, ImageTextDecoder, SampleDecoder
from pipeline.data.errors import BadSample, DataError
from pipeline.data.remote import DEFAULT_MAX_BYTES, PipeSource, is_pipe, resolve_indexes, resolve_sources
from pipeline.data.shard_cache import ShardCache
from pipeline.data.epoch_plan import RESAMPLED_SHARDS_PER_BLOCK, EpochPlan, epoch_length
from pipeline.data.manifest import MANIFEST_NAME, shard_entries
from pipeline.data.shard_index import ShardMembers

DEFAULT_CACHE_SHARDS = 4  # member tables held by a reader that goes through shards in order (evaluation)
MAX_CACHE_SHARDS = 1024  # a shuffle block over tiny shards: the tables are tiny too
PREFETCH_BATCHES = 4  # how far ahead (in this worker's batches) streamed shards are looked for
MAX_OPEN_SHARDS = 64  # descriptors per process, well under the usual 1024 limit with 8+ workers per rank


# ----------------------------------------------------------------------------------------------- sources
@dataclass
class FetchSpec:
    """Where and how `pipe:` shards are fetched (pipeline/data/remote.py)."""
    cache_dir: str
    timeout_s: float
    stall_timeout_s: float
    prefetch: int = 4
    max_shard_bytes: int | None = DEFAULT_MAX_BYTES  # one `pipe:` command's output; None: no limit
    cache_max_bytes: int = 0  # bound on the cached tars of a training stream; 0: none

    @classmethod
    def for_data(cls, d) -> FetchSpec:
        """From a DataConfig: data.cache_dir, else $PIPELINE_SHARD_CACHE, else ~/.cache/pipeline/shards."""
        cache = d.cache_dir or os.environ.get("PIPELINE_SHARD_CACHE") or str(Path.home() / ".cache/pipeline/shards")
        return cls(cache, d.pipe_timeout_s, d.pipe_stall_timeout_s, d.pipe_prefetch,
                   int(d.pipe_max_shard_gb * 1e9) or None, int(d.cache_max_gb * 1e9))

    def cache(self) -> ShardCache:
        return ShardCache(self.cache_dir, self.cache_max_bytes, self.timeout_s, self.stall_timeout_s, self.prefetch,
                          self.max_shard_bytes)


def expand_sources(spec: str, key: str = "data", fetch: FetchSpec | None = None) -> list[list[str]]:
    """'a/{000..009}.tar::b/x.tar' -> one list of local paths per '::'-separated source.

    `pipe:CMD` shards are fetched into `fetch.cache_dir` (with a stall timeout) and replaced by their cached
    paths; without `fetch` they are only checked for syntax (so validation never downloads)."""
    if not spec:
        raise DataError(f"{key} is empty; give a shard pattern such as 'data/train-{{000000..000009}}.tar'")
    sources = [[p if is_pipe(p) else p.removeprefix("file:") for p in braceexpand(part.strip())]
               for part in spec.split("::")]
    paths = [p for source in sources for p in source]
    if any(is_pipe(p) for p in paths):
        if fetch is None:
            for p in paths:
                if is_pipe(p):
                    PipeSource(p)
        else:
            fetched = iter(resolve_sources(paths, fetch.cache_dir, fetch.timeout_s, fetch.stall_timeout_s,
                                           fetch.prefetch, fetch.max_shard_bytes))
            sources = [[next(fetched) for _ in source] for source in sources]
            paths = [p for source in sources for p in source]
    missing = [p for p in paths if not is_pipe(p) and not os.path.isfile(p)]
    if missing:
        raise DataError(f"{key}: {len(missing)} of {len(paths)} shards not found (first: {missing[0]})")
    return sources


def expand_shards(spec: str | list[str], key: str = "data", fetch: FetchSpec | None = None) -> list[str]:
    """All shards of `spec` as one list of local paths; fails naming `key` if any is missing. A list is
    taken as paths already expanded (and fetched)."""
    if isinstance(spec, list):
        return list(spec)
    return [p for source in expand_sources(spec, key, fetch) for p in source]


def local_shards(spec: str, key: str, data) -> list[str]:
    """`spec`'s shards as local paths, `pipe:` ones fetched into the run's shard cache (`data`: a DataConfig);
    what evaluation reads, so `data.val` (and the kNN bank from `data.train`) may be object-store URLs too."""
    return expand_shards(spec, key, FetchSpec.for_data(data))


def parse_weights(text: str, num_sources: int, key: str = "data.train_weights") -> tuple[float, ...] | None:
    """'1::0.5' -> (1.0, 0.5), one weight per source; '' -> None (every source weight 1)."""
    if not text:
        return None
    try:
        weights = tuple(float(w) for w in str(text).split("::"))
    except ValueError:
        raise DataError(f"{key}={text!r}: weights are numbers separated by '::', e.g. '1::0.5'") from None
    if len(weights) != num_sources:
        raise DataError(f"{key} has {len(weights)} weights for {num_sources} sources (separate both with '::')")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise DataError(f"{key}={text!r}: weights must be finite, >= 0 and not all 0")
    return weights


class ShardSet:
    """The shards of a dataset, their sample counts (from the directory's manifest, built once where missing)
    and sources; reads samples through a small LRU of member tables and open descriptors."""

    def __init__(self, paths: list[str], source_of_shard: list[int] | None = None, fetch: FetchSpec | None = None):
        self.remote: dict[int, str] = {i: p for i, p in enumerate(paths) if is_pipe(p)}  # shard -> pipe: URL
        self.cache = None
        if self.remote:  # streamed: only the indexes are fetched now, each tar when it is read
            if fetch is None:
                raise DataError("pipe: shards need a cache to stream into (FetchSpec)")
            self.cache = fetch.cache()
            local = resolve_indexes(list(self.remote.values()), fetch.cache_dir, fetch.timeout_s,
                                    fetch.stall_timeout_s, fetch.prefetch, fetch.max_shard_bytes)
            paths = list(paths)
            for i, path in zip(self.remote, local):
                paths[i] = path
        self.paths = paths
        entries = shard_entries(paths)
        self.counts = np.array([e.samples for e in entries], dtype=np.int64)
        self.sizes = np.array([e.bytes for e in entries], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.total = int(self.counts.sum())
        self.sources = np.zeros(len(paths), np.int64) if source_of_shard is None else np.asarray(source_of_shard)
        self.cache_shards = DEFAULT_CACHE_SHARDS
        self._members: OrderedDict[int, ShardMembers] = OrderedDict()
        self._fds: OrderedDict[int, int] = OrderedDict()

    @classmethod
    def from_sources(cls, sources: list[list[str]], fetch: FetchSpec | None = None) -> "ShardSet":
        return cls([p for s in sources for p in s], [i for i, s in enumerate(sources) for _ in s], fetch)

    def size_cache_for(self, shuffle_block: int, weights: tuple[float, ...] | None = None,
                       resampled: bool = False) -> None:
        """Holds as many shards open as one shuffle block can span, twice (a batch may straddle two blocks):
        the block's samples come from consecutive shards of the epoch's order (resampled: from a fixed number
        of shard draws), so the LRU never thrashes within a block and a worker's memory stays that of a few
        shards however many it reads in an epoch."""
        if resampled:
            footprint = min(max(1, shuffle_block), RESAMPLED_SHARDS_PER_BLOCK) + 1
        else:  # the fewest samples a shard contributes: a weight below 1 takes that fraction of each shard
            w = np.ones(int(self.sources.max()) + 1) if weights is None else np.asarray(weights, np.float64)
            share = np.floor(self.counts * np.where(w[self.sources] >= 1, 1.0, w[self.sources]))
            share = share[(self.counts > 0) & (w[self.sources] > 0)]
            smallest = max(1, int(share.min())) if share.size else 1
            footprint = -(-max(1, shuffle_block) // smallest) + 1
        self.cache_shards = int(min(max(DEFAULT_CACHE_SHARDS, 2 * footprint), MAX_CACHE_SHARDS))

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, sample_id, side="right") - 1)
        return shard, int(sample_id - self.starts[shard])

    def _members_of(self, shard: int) -> ShardMembers:
        members = self._members.get(shard)
        if members is not None:
            self._members.move_to_end(shard)
            return members
        members = ShardMembers.load(self.paths[shard])
        if len(members.keys) != self.counts[shard]:
            raise DataError(f"{self.paths[shard]}: its index has {len(members.keys)} samples, the manifest "
                            f"{self.counts[shard]} (the shard changed after {MANIFEST_NAME} was written; delete "
                            f"that file to have it rebuilt)")
        self._members[shard] = members
        while len(self._members) > self.cache_shards:
            self._members.popitem(last=False)
        return members

    def _fd_of(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        fd = os.open(self.paths[shard], os.O_RDONLY)
        size = os.fstat(fd).st_size
        if 0 <= self.sizes[shard] != size:
            os.close(fd)
            raise DataError(f"{self.paths[shard]}: {size} bytes, the manifest says {self.sizes[shard]} (the shard "
                            f"changed after {MANIFEST_NAME} was written; delete that file to have it rebuilt)")
        self._fds[shard] = fd
        while len(self._fds) > min(self.cache_shards, MAX_OPEN_SHARDS):
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def read(self, sample_id: int) -> tuple[str, dict[str, bytes]]:
        """Returns (key, {ext: bytes}) of one sample; a `pipe:` shard's tar is fetched first if not cached."""
        shard, row = self.locate(sample_id)
        for attempt in range(3):
            if shard in self.remote and shard not in self._fds:
                self.cache.ensure(self.remote[shard])
            try:
                members = self._members_of(shard)
                return members.keys[row], members.read(row, self._fd_of(shard))
            except FileNotFoundError:  # another process evicted it between the fetch and the open
                if shard not in self.remote or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def prefetch(self, sample_ids: np.ndarray, upcoming: np.ndarray) -> None:
        """Streams: keeps the shards of `sample_ids` (being read) and of `upcoming` (in the order they will be
        read) from eviction and fetches the first of `upcoming` ahead of use."""
        if self.cache is None:
            return
        now = np.searchsorted(self.starts, sample_ids, side="right") - 1
        ahead = np.searchsorted(self.starts, upcoming, side="right") - 1
        ahead = [int(s) for s in dict.fromkeys(ahead.tolist()) if int(s) in self.remote]
        keep = {self.paths[int(s)] for s in now} | {self.paths[s] for s in ahead}
        self.cache.use(keep)
        self.cache.prefetch([self.remote[s] for s in ahead])

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        self._members.clear()

    def __getstate__(self):  # descriptors do not travel to spawned worker processes
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        state["_members"] = OrderedDict()
        return state


# ----------------------------------------------------------------------------------------------- epoch plan
@dataclass(frozen=True)
class StreamPosition:
    """Where the next global batch starts: sample `offset` of epoch `epoch`. Independent of the world size."""
    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        return cls(int(d["epoch"]), int(d["offset"]))


def batch_position(start: StreamPosition, k: int, epoch_len: int, global_batch: int) -> StreamPosition:
    """Position of the k-th global batch after `start` (an epoch's tail shorter than a global batch is skipped)."""
    per_epoch = epoch_len // global_batch
    first = max(0, (epoch_len - start.offset) // global_batch)  # batches left in the start epoch
    if k < first:
        return StreamPosition(start.epoch, start.offset + k * global_batch)
    epoch, j = divmod(k - first, per_epoch)
    return StreamPosition(start.epoch + 1 + epoch, j * global_batch)


@dataclass
class LoaderSpec:
    batch_size: int  # per rank
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_block: int = 4096
    weights: tuple[float, ...] | None = None  # per source; None: all 1
    resampled: bool = False


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, sample_id]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class DecodedSamples:
    samples: list  # the decoder's samples, in the order of the ids
    keys: list[str]  # their keys
    # skipped samples by reason, a plain dict: the DataLoader's default_convert copies a mapping and then
    # update()s the copy with its own items, which adds a Counter's counts to themselves (each counted twice)
    bad: dict[str, int]
    error: str | None = None  # a shard that stopped being readable as indexed (DataError): the batch is void


def decode_samples(shards: ShardSet, ids, decoder: SampleDecoder,
                   seed_of: Callable[[int], int] | None = None) -> DecodedSamples:
    """Reads and decodes the samples `ids`, skipping unreadable ones and those the decoder refuses (BadSample),
    counted by reason; a DataError (the shard changed under the run) stops the batch. With `seed_of`, torch's
    CPU generator is seeded per sample id around `decoder.sample` (training augmentation, resumable)."""
    samples, keys, bad = [], [], Counter()
    for sid in ids:
        try:
            key, raw = shards.read(sid)
        except (OSError, EOFError):
            bad["unreadable"] += 1
            continue
        except DataError as e:
            return DecodedSamples(samples, keys, dict(bad), str(e))
        try:
            if seed_of is None:
                samples.append(decoder.sample(raw))
            else:
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also queues a lazy seed for every accelerator
                    # backend, with a stack trace each (~1 ms, as long as the image's whole resize)
                    torch.default_generator.manual_seed(seed_of(sid))
                    samples.append(decoder.sample(raw))
        except BadSample as e:
            bad[e.reason] += 1
            continue
        keys.append(key)
    return DecodedSamples(samples, keys, dict(bad))


# ----------------------------------------------------------------------------------------------- stream
class ShardBatches(IterableDataset):
    """Endless stream of this rank's batches, from `start` on.

    Each item is the decoder's batch plus {"keys": [...], "bad": {reason: count}, "index": k (batches since
    start), "epoch", "offset": where this global batch starts, "next": the StreamPosition after it}. Samples
    that fail to decode are left out of their batch and counted by reason in "bad". A problem with a whole
    shard (changed or cut short during the run) ends the batch with "error": a one-line message, which the
    training loop raises as a DataError (raised in a loader worker it would arrive wrapped in a traceback).
    """

    def __init__(self, shards: ShardSet, spec: LoaderSpec, decoder: SampleDecoder,
                 start: StreamPosition = StreamPosition()):
        self.shards, self.spec, self.decoder, self.start = shards, spec, decoder, start
        self.epoch_len = epoch_length(shards.counts, shards.sources, spec.weights)
        self.global_batch = spec.world_size * spec.batch_size
        self.batches_per_epoch = self.epoch_len // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"the training data has {self.epoch_len} samples per epoch, fewer than one global "
                            f"batch ({spec.world_size} ranks x {spec.batch_size})")
        shards.size_cache_for(spec.shuffle_block, spec.weights, spec.resampled)
        self._stride = 1  # batches k, k + stride, ... are built by this process (one loader worker's share)
        self._plan: EpochPlan | None = None

    def epoch_plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            s = self.spec
            self._plan = EpochPlan(self.shards.counts, s.seed, epoch, s.shuffle_block, self.shards.sources,
                                   s.weights, s.resampled)
        return self._plan

    def batch_ids(self, k: int) -> tuple[StreamPosition, np.ndarray]:
        pos = batch_position(self.start, k, self.epoch_len, self.global_batch)
        lo = pos.offset + self.spec.rank * self.spec.batch_size
        return pos, self.epoch_plan(pos.epoch).ids(np.arange(lo, lo + self.spec.batch_size))

    def make_batch(self, k: int) -> dict:
        pos, ids = self.batch_ids(k)
        if self.shards.cache is not None:  # streamed shards: this worker's next batches are fetched meanwhile
            ahead = [self.batch_ids(k + j * self._stride)[1] for j in range(1, PREFETCH_BATCHES + 1)]
            self.shards.prefetch(ids, np.concatenate(ahead))
        read = decode_samples(self.shards, ids.tolist(), self.decoder,
                              seed_of=lambda sid: sample_seed(self.spec.seed, pos.epoch, sid))
        batch = self.decoder.collate(read.samples) if read.samples and read.error is None else {}
        nxt = StreamPosition(pos.epoch, pos.offset + self.global_batch)
        out = {**batch, "keys": read.keys, "bad": read.bad, "index": k, "epoch": pos.epoch, "offset": pos.offset,
               "next": nxt.to_dict()}
        if read.error is not None:
            out["error"] = read.error
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self._stride = workers
        k = worker
        while True:
            yield self.make_batch(k)
            k += workers


def ImageTextBatches(shards: ShardSet, spec: LoaderSpec, transform: Callable, tokenizer: Callable,
                     start: StreamPosition = StreamPosition(), reduced_decode: bool = True,
                     max_caption_bytes: int = MAX_CAPTION_BYTES) -> ShardBatches:
    """The image-caption stream (CLIP / SigLIP training)."""
    return ShardBatches(shards, spec, ImageTextDecoder(transform, tokenizer, reduced_decode, max_caption_bytes),
                        start)


def _ignore_stop_signals(_worker_id: int) -> None:
    # A scheduler signals every process of the job: the workers must outlive the step in flight, which the
    # main process finishes and checkpoints before it exits (and takes its workers with it)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def make_train_loader(dataset: ShardBatches, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      worker_init_fn=_ignore_stop_signals if workers else None)

