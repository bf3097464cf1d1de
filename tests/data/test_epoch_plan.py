"""The lazy epoch plan: exact sample accounting, O(1) lookups at LAION scale, no per-sample array."""
import time
import tracemalloc

import numpy as np
import pytest

from pipeline.data.epoch_plan import EpochPlan, epoch_length, epoch_order, permute


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 100, 1023, 1025, 4096, 10_000])
def test_keyed_permutation_is_a_bijection_for_every_size(n):
    for key in (0, 1, 2**63 + 12345):
        out = permute(np.arange(n), np.full(n, n), np.full(n, key, np.uint64))
        assert np.array_equal(np.sort(out), np.arange(n))
    if n >= 64:  # different keys give different orders, and not the identity
        a = permute(np.arange(n), np.full(n, n), np.uint64(1))
        b = permute(np.arange(n), np.full(n, n), np.uint64(2))
        assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(n))


@pytest.mark.parametrize("block", [1, 7, 64, 1000, 10_000])
def test_every_sample_exactly_once_with_uneven_and_empty_shards(block):
    counts = np.array([90, 0, 90, 17, 90, 3, 1, 0, 250])
    order = epoch_order(counts, seed=4, epoch=2, shuffle_block=block)
    assert np.array_equal(np.sort(order), np.arange(counts.sum()))
    again = EpochPlan(counts, 4, 2, block)
    positions = np.array([0, 5, 100, 399, counts.sum() - 1])
    assert np.array_equal(again.ids(positions), order[positions])  # a lookup is the order at that position
    assert not np.array_equal(order, epoch_order(counts, 4, 3, block))  # another epoch, another order
    assert not np.array_equal(order, epoch_order(counts, 5, 2, block))  # another seed, another order
    with pytest.raises(IndexError):
        again.ids([counts.sum()])


def test_a_shuffle_block_reads_consecutive_shards_of_the_epochs_shard_order():
    counts = np.full(50, 100)
    block = 250
    plan = EpochPlan(counts, 0, 0, block)
    order = plan.ids(np.arange(plan.length))
    shard_of = order // 100
    for b in range(0, plan.length, block):
        expected = set(plan.slot_shard[b // 100:(min(b + block, plan.length) - 1) // 100 + 1].tolist())
        assert set(shard_of[b:b + block].tolist()) == expected and len(expected) <= 4  # ceil(250 / 100) + 1


def test_weights_give_whole_copies_plus_a_seeded_subset_spread_over_shards():
    counts = np.array([40, 40, 20, 30, 30, 50, 7])
    sources = np.array([0, 0, 0, 1, 1, 1, 1])
    n_a, n_b = 100, 117
    weights = (2.5, 0.4)
    length = epoch_length(counts, sources, weights)
    assert length == 250 + round(0.4 * 117)
    subsets = []
    for epoch in range(3):
        order = epoch_order(counts, 1, epoch, 32, sources, weights)
        assert len(order) == length
        times = np.bincount(order, minlength=counts.sum())
        assert set(times[:n_a].tolist()) == {2, 3} and (times[:n_a] == 3).sum() == 50  # 2 copies + 50 extra
        assert set(times[n_a:].tolist()) <= {0, 1} and times[n_a:].sum() == round(0.4 * n_b)  # no repeats
        per_shard = np.add.reduceat(times[n_a:], [0, 30, 60, 110])
        assert np.all(np.abs(per_shard - 0.4 * counts[3:]) < 1 + 1e-9)  # stratified: in proportion to size
        subsets.append(frozenset(np.flatnonzero(times[n_a:]).tolist()))
    assert len(set(subsets)) == 3  # a different subset each epoch
    zero = epoch_order(counts, 1, 0, 32, sources, (1.0, 0.0))
    assert np.array_equal(np.sort(zero), np.arange(n_a))  # a weight of 0 leaves the source out


def test_resampled_draws_with_replacement_in_proportion_to_weight_x_size():
    counts = np.array([300, 200, 100, 400])
    sources = np.array([0, 0, 1, 1])
    order = epoch_order(counts, 0, 0, 64, sources, (3.0, 1.0), resampled=True)
    assert len(order) == epoch_length(counts, sources, (3.0, 1.0))
    assert order.min() >= 0 and order.max() < counts.sum() and len(set(order.tolist())) < len(order)
    plan = EpochPlan(counts, 0, 0, 64, sources, (3.0, 1.0), resampled=True)
    for b in range(0, plan.length, 64):  # a block mixes 8 shard draws: a reader holds a few shards at a time
        block = order[b:b + 64]
        assert len(np.unique(np.searchsorted(plan.starts, block, side="right"))) <= 8
    draws = np.concatenate([epoch_order(counts, 0, e, 64, sources, (3.0, 1.0), resampled=True) for e in range(20)])
    assert abs(np.mean(draws < 500) - 3 * 500 / (3 * 500 + 500)) < 0.03
    hist = np.bincount(draws[draws < 500], minlength=500)  # uniform within the source
    assert hist.min() > 0 and hist.max() < 4 * hist.mean()
    only_a = epoch_order(counts, 0, 0, 64, sources, (1.0, 0.0), resampled=True)
    assert only_a.max() < 500  # weight 0: never drawn
    again = EpochPlan(counts, 0, 0, 64, sources, (3.0, 1.0), resampled=True)
    assert np.array_equal(again.ids([7, 1000, 3]), order[[7, 1000, 3]])


def test_laion_scale_plan_is_lazy_small_and_constant_time_per_lookup():
    """41,408 shards x 10,000 samples: the plan holds a few per-shard arrays (no per-sample array), and a
    lookup costs the same at the start, middle and end of the 414M-sample epoch."""
    counts = np.full(41_408, 10_000)
    tracemalloc.start()
    started = time.perf_counter()
    plan = EpochPlan(counts, 7, 3, 4096)
    build_s = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.length == 414_080_000
    assert peak < 20 * 2**20 and build_s < 5  # ~2 MB of arrays; the whole epoch as int64 would be 3.3 GB
    timings = []
    for start in (0, plan.length // 2, plan.length - 4096):
        ids = plan.ids(np.arange(start, start + 4096))  # one whole shuffle block
        shards = np.unique(ids // 10_000)
        assert len(set(ids.tolist())) == 4096 and len(shards) <= 2  # a block spans consecutive shards
        t = time.perf_counter()
        for p in range(start, start + 200):
            plan.ids(p)
        timings.append(time.perf_counter() - t)
    assert max(timings) < 3 * min(timings) + 0.01
    assert np.array_equal(EpochPlan(counts, 7, 3, 4096).ids([0, 123_456_789, plan.length - 1]),
                          plan.ids([0, 123_456_789, plan.length - 1]))  # a pure function of (seed, epoch, position)
