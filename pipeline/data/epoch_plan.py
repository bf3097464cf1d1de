"""The order of an epoch as a pure function of (seed, epoch, position), evaluated lazily.

An epoch is never materialised: `EpochPlan.ids(positions)` maps any global positions of epoch `epoch` to sample
ids in O(1) each, from a handful of arrays with one entry per shard (41,408 shards: about 2 MB in all). The
order it describes:

1. the shards are put in a seeded order (a keyed permutation of the shard indexes);
2. each shard contributes its samples in that order, a source of weight w contributing floor(w) passes over
   every sample of its shards plus a seeded subset of round(w x size) - floor(w) x size samples, spread over
   its shards in proportion to their sizes (in the epoch's shard order, so the split moves from epoch to epoch)
   and drawn by a keyed permutation inside each shard;
3. the resulting sequence is cut into blocks of `shuffle_block` positions and each block is permuted by its own
   keyed permutation (the last block, shorter, too).

Every keyed permutation is a Feistel network over the smallest even power of two covering its domain, made a
permutation of [0, n) by cycle walking (re-encrypting until the value falls inside), so it needs no table and
is a bijection by construction: every sample is placed exactly once (as many times as its weight says).
`resampled` plans draw with replacement, like open_clip's `--dataset-resampled` (which draws shards with
replacement and streams each): every run of `shuffle_block / 8` positions draws a shard with probability
proportional to weight x size and each of its positions a uniform sample of that shard (keyed hashes), so every
position holds a given sample with probability proportional to its source's weight; the blocks are then
permuted as above, so a block mixes 8 shard draws and a reader holds a few shards at a time.

This module needs only numpy, so a process can plan an epoch without importing torch.
"""
from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
_ROUNDS = 4
# Purposes of the keys derived from (seed, epoch): each permutation draws from its own stream.
_SHARDS, _BLOCKS, _EXTRAS, _RESAMPLE = 1, 2, 3, 4
RESAMPLED_SHARDS_PER_BLOCK = 8  # shard draws a shuffle block mixes in resampled mode


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fast, well-mixed 64-bit hash."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(seed: int, epoch: int, purpose: int) -> np.uint64:
    z = np.array([(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64], np.uint64)
    for part in (epoch, purpose):
        z = _mix(z ^ np.uint64(part & _M64)) + np.uint64(0x9E3779B97F4A7C15)
    return z[0]


def permute(values: np.ndarray, sizes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """values[i] (in [0, sizes[i])) through the permutation of [0, sizes[i]) keyed by keys[i]; element-wise,
    every element with its own domain and key. Sizes of 0 or 1 map to 0."""
    v = np.asarray(values, dtype=np.uint64).copy()
    n = np.asarray(sizes, dtype=np.uint64)
    keys = np.asarray(keys, dtype=np.uint64)
    v, n, keys = np.broadcast_arrays(v, n, keys)
    v = v.copy()
    bits = np.maximum(np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))), 2).astype(np.uint64)
    half = (bits + np.uint64(1)) >> np.uint64(1)
    mask = (np.uint64(1) << half) - np.uint64(1)
    round_keys = [_mix(keys + np.uint64((r + 1) * 0x9E3779B97F4A7C15 & _M64)) for r in range(_ROUNDS)]
    todo = np.arange(v.size)
    while todo.size:  # cycle walking: on average fewer than 4 encryptions, as the domain is < 4 n
        x, h, m = v[todo], half[todo], mask[todo]
        left, right = x >> h, x & m
        for rk in round_keys:
            left, right = right, left ^ (_mix(right ^ rk[todo]) & m)
        v[todo] = (left << h) | right
        todo = todo[v[todo] >= n[todo]]
    return v.astype(np.int64)


def epoch_length(counts: np.ndarray, sources: np.ndarray | None = None,
                 weights: tuple[float, ...] | None = None) -> int:
    """Samples per epoch: each source contributes round(weight x size)."""
    if weights is None:
        return int(np.sum(counts))
    sizes = _source_sizes(np.asarray(counts), np.asarray(sources))
    return int(sum(round(w * n) for w, n in zip(weights, sizes)))


def _source_sizes(counts: np.ndarray, sources: np.ndarray) -> np.ndarray:
    return np.bincount(sources, weights=counts, minlength=int(sources.max()) + 1).astype(np.int64)


class EpochPlan:
    """Epoch `epoch` of a dataset (shard sample counts, source of each shard, weights) under `seed`.

    Built in O(shards) time and memory (no per-sample array); `ids(positions)` is O(1) per position (a binary
    search over the shards aside)."""

    def __init__(self, counts: np.ndarray, seed: int, epoch: int, shuffle_block: int,
                 sources: np.ndarray | None = None, weights: tuple[float, ...] | None = None,
                 resampled: bool = False):
        counts = np.asarray(counts, dtype=np.int64)
        sources = np.zeros(len(counts), np.int64) if sources is None else np.asarray(sources, dtype=np.int64)
        self.seed, self.epoch, self.block = int(seed), int(epoch), max(1, int(shuffle_block))
        self.resampled = resampled
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.length = epoch_length(counts, sources, weights)
        num_sources = int(sources.max()) + 1 if len(sources) else 1
        w = np.ones(num_sources) if weights is None else np.asarray(weights, dtype=np.float64)
        if resampled:
            self._plan_resampled(counts, sources, w)
        else:
            self._plan_passes(counts, sources, w, weights is not None)

    # -------------------------------------------------------------------------------------- without replacement
    def _plan_passes(self, counts: np.ndarray, sources: np.ndarray, w: np.ndarray, weighted: bool) -> None:
        num = len(counts)
        self.slot_shard = permute(np.arange(num), np.full(num, num), _key(self.seed, self.epoch, _SHARDS))
        self.copies = np.floor(w).astype(np.int64)[sources]
        extras = np.zeros(num, np.int64)
        if weighted:
            sizes = _source_sizes(counts, sources)
            for s, n in enumerate(sizes):
                extra = round(w[s] * n) - int(np.floor(w[s])) * int(n)
                if extra <= 0:
                    continue
                # source s's shards in the epoch's order; shard j gets floor(E C_after / n) - floor(E C_before / n)
                slots = self.slot_shard[sources[self.slot_shard] == s]
                after = np.cumsum(counts[slots])
                before = after - counts[slots]
                extras[slots] = (extra * after) // n - (extra * before) // n
        self.extras = extras
        self.slot_end = np.cumsum((self.copies * counts + extras)[self.slot_shard])
        self._extra_key = _key(self.seed, self.epoch, _EXTRAS)
        self._block_key = _key(self.seed, self.epoch, _BLOCKS)

    def _within_block(self, p: np.ndarray) -> np.ndarray:
        """Where position p lands after the seeded permutation inside its shuffle block (the last, shorter
        block is permuted within its own length)."""
        b = p // self.block
        i = p - b * self.block
        size = np.minimum(self.block, self.length - b * self.block)
        return b * self.block + permute(i, size, _mix(b.astype(np.uint64) ^ self._block_key))

    def _ids_passes(self, p: np.ndarray) -> np.ndarray:
        q = self._within_block(p)
        slot = np.searchsorted(self.slot_end, q, side="right")
        shard = self.slot_shard[slot]
        t = q - (self.slot_end[slot] - self.copies[shard] * self.counts[shard] - self.extras[shard])
        c = self.counts[shard]
        passes = self.copies[shard] * c
        row = np.where(t < passes, t % np.maximum(c, 1), 0)
        extra = t >= passes
        if extra.any():
            keys = _mix(shard[extra].astype(np.uint64) ^ self._extra_key)
            row[extra] = permute(t[extra] - passes[extra], c[extra], keys)
        return self.starts[shard] + row

    # -------------------------------------------------------------------------------------- with replacement
    def _plan_resampled(self, counts: np.ndarray, sources: np.ndarray, w: np.ndarray) -> None:
        mass = w[sources] * counts  # a shard is drawn in proportion to weight x size: each sample, to its weight
        self.shard_cdf = np.cumsum(mass) / mass.sum()
        self.chunk = max(1, self.block // RESAMPLED_SHARDS_PER_BLOCK)
        self._draw_key = _key(self.seed, self.epoch, _RESAMPLE)
        self._block_key = _key(self.seed, self.epoch, _BLOCKS)

    def _ids_resampled(self, p: np.ndarray) -> np.ndarray:
        q = self._within_block(p)
        chunk = (q // self.chunk).astype(np.uint64)
        u = (_mix(chunk ^ self._draw_key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        shard = np.minimum(np.searchsorted(self.shard_cdf, u, side="right"), len(self.counts) - 1)
        while np.any(self.counts[shard] == 0):  # float round-off at a cdf step onto an empty shard
            shard = np.where(self.counts[shard] == 0, shard - 1, shard)
        draw = _mix(_mix(q.astype(np.uint64) ^ self._draw_key) ^ np.uint64(0xD1B54A32D192ED03))
        return self.starts[shard] + (draw % self.counts[shard].astype(np.uint64)).astype(np.int64)

    # -------------------------------------------------------------------------------------- lookups
    def ids(self, positions) -> np.ndarray:
        """Sample ids at `positions` (ints in [0, length)) of this epoch, as an int64 array."""
        p = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        if p.size and (p.min() < 0 or p.max() >= self.length):
            raise IndexError(f"positions must lie in [0, {self.length}) for this epoch")
        if not p.size:
            return p
        return self._ids_resampled(p) if self.resampled else self._ids_passes(p)

    def __len__(self) -> int:
        return self.length


def epoch_order(counts: np.ndarray, seed: int, epoch: int, shuffle_block: int,
                sources: np.ndarray | None = None, weights: tuple[float, ...] | None = None,
                resampled: bool = False) -> np.ndarray:
    """The whole epoch as one array: `EpochPlan(...).ids(range(length))`. For tests and small datasets only;
    the loader looks positions up lazily."""
    plan = EpochPlan(counts, seed, epoch, shuffle_block, sources, weights, resampled)
    return plan.ids(np.arange(plan.length))

