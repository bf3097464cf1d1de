import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CaptionDecoder
from pipeline.data.epoch_plan import epoch_length, epoch_order
from pipeline.data.loader import (DataError, ImageTextBatches, LoaderSpec, ShardBatches, ShardSet, StreamPosition,
                                  FetchSpec, batch_position, expand_shards, expand_sources, local_shards,
                                  make_train_loader, parse_weights)
from pipeline.models.clip import create_clip
from pipeline.shard.writer import ShardWriter


@pytest.fixture(scope="module")
def clip_parts():
    _, train_tf, _, tokenizer = create_clip("clip-tiny")
    return train_tf, tokenizer


def _collect(dataset, n, workers):
    out = []
    for batch in make_train_loader(dataset, workers, pin_memory=False):
        out.append(batch)
        if len(out) == n:
            return out


def _datasets(shards, world, bs, decoder=None, start=StreamPosition(), **spec):
    return [ShardBatches(shards, LoaderSpec(bs, r, world, **spec), decoder, start) for r in range(world)]


def test_epoch_split_is_exact_and_balanced():
    counts = np.array([90, 90, 90, 17, 90, 3, 90])  # uneven shards
    total = counts.sum()
    order = epoch_order(counts, seed=1, epoch=0, shuffle_block=64)
    assert sorted(order.tolist()) == list(range(total))
    assert not np.array_equal(order, epoch_order(counts, seed=1, epoch=1, shuffle_block=64))
    np.testing.assert_array_equal(order, epoch_order(counts, seed=1, epoch=0, shuffle_block=64))
    world, bs = 2, 16
    per_epoch = total // (world * bs)
    seen = []
    for k in range(per_epoch + 1):
        pos = batch_position(StreamPosition(), k, total, world * bs)
        assert pos == (StreamPosition(0, k * world * bs) if k < per_epoch else StreamPosition(1, 0))
        if k < per_epoch:
            seen += order[pos.offset:pos.offset + world * bs].tolist()
    assert len(set(seen)) == len(seen) == per_epoch * world * bs  # no sample twice
    assert total - len(seen) < world * bs  # only the documented remainder is dropped


def test_uneven_shards_give_equal_steps_on_every_rank_and_worker_count(demo_data):
    shards = ShardSet(expand_shards(demo_data["train"]))  # 7 shards: 6 x 90 + 1 x 20
    assert sorted(shards.counts.tolist()) == [20] + [90] * 6
    world, bs = 2, 16
    datasets = _datasets(shards, world, bs, CaptionDecoder(), seed=5, shuffle_block=37)
    per_epoch = shards.total // (world * bs)
    streams = []
    for ds in datasets:
        batches = _collect(ds, per_epoch, workers=3)  # 3 loader workers per rank
        assert len(batches) == per_epoch and all(len(b["keys"]) == bs for b in batches)
        assert all(b["epoch"] == 0 for b in batches)
        streams.append([k for b in batches for k in b["keys"]])
    keys = streams[0] + streams[1]
    assert len(set(keys)) == len(keys) == per_epoch * world * bs


def test_stream_is_independent_of_workers_and_resumes_exactly(demo_data, clip_parts):
    train_tf, tokenizer = clip_parts
    shards = ShardSet(expand_shards(demo_data["train"]))
    spec = LoaderSpec(batch_size=16, rank=1, world_size=2, seed=3, shuffle_block=50)
    full = _collect(ImageTextBatches(shards, spec, train_tf, tokenizer), 22, workers=0)  # crosses an epoch (17/epoch)
    assert [b["index"] for b in full] == list(range(22)) and full[17]["epoch"] == 1 and full[16]["epoch"] == 0
    two_workers = _collect(ImageTextBatches(shards, spec, train_tf, tokenizer), 22, workers=2)
    resume_at = StreamPosition.from_dict(full[12]["next"])
    resumed = _collect(ImageTextBatches(shards, spec, train_tf, tokenizer, start=resume_at), 9, workers=2)
    for a, b in zip(full, two_workers):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
    for a, b in zip(full[13:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    epoch0 = [k for b in full[:17] for k in b["keys"]]
    assert len(set(epoch0)) == len(epoch0) == 17 * 16


@pytest.mark.parametrize("new_world,new_bs", [(1, 16), (1, 24), (4, 8)])
def test_elastic_resume_on_a_different_world_size_continues_the_epoch(demo_data, new_world, new_bs):
    """2 ranks x 16 for 7 steps, then `new_world` ranks: the epoch's keys are all distinct, and together they are
    the epoch except a tail shorter than one global batch."""
    shards = ShardSet(expand_shards(demo_data["train"]))
    before = _datasets(shards, 2, 16, CaptionDecoder(), seed=9, shuffle_block=64)
    keys = [k for ds in before for b in (ds.make_batch(i) for i in range(7)) for k in b["keys"]]
    resume_at = StreamPosition.from_dict(before[0].make_batch(6)["next"])
    assert resume_at == StreamPosition(0, 7 * 32)
    after = _datasets(shards, new_world, new_bs, CaptionDecoder(), start=resume_at, seed=9, shuffle_block=64)
    k = 0
    while True:
        batches = [ds.make_batch(k) for ds in after]
        if batches[0]["epoch"] != 0:
            break
        keys += [key for b in batches for key in b["keys"]]
        k += 1
    assert len(set(keys)) == len(keys)  # nothing repeated
    epoch_keys = set(shards.read(int(i))[0] for i in epoch_order(shards.counts, 9, 0, 64))
    assert set(keys) <= epoch_keys and len(epoch_keys) - len(keys) < new_world * new_bs  # only the tail is left


def test_weighted_sources_mix_in_proportion(demo_data):
    paths = expand_shards(demo_data["train"])
    shards = ShardSet.from_sources([paths[:2], paths[2:]])
    n_a = int(shards.counts[:2].sum())
    n_b = shards.total - n_a
    weights = parse_weights("2::0.5", 2)
    order = epoch_order(shards.counts, 0, 0, 64, shards.sources, weights)
    assert len(order) == epoch_length(shards.counts, shards.sources, weights) == 2 * n_a + round(n_b / 2)
    from_a = order[order < n_a]
    assert len(from_a) == 2 * n_a and np.all(np.bincount(from_a, minlength=n_a) == 2)  # every sample twice
    from_b = order[order >= n_a]
    assert len(from_b) == len(set(from_b.tolist())) == round(n_b / 2)  # half of b, no repeats
    other_epoch = epoch_order(shards.counts, 0, 1, 64, shards.sources, weights)
    assert set(from_b.tolist()) != set(other_epoch[other_epoch >= n_a].tolist())  # a different half each epoch
    resampled = epoch_order(shards.counts, 0, 0, 64, shards.sources, (1.0, 1.0), resampled=True)
    assert len(resampled) == shards.total and len(set(resampled.tolist())) < shards.total  # with replacement
    draws = np.concatenate([epoch_order(shards.counts, 0, e, 64, shards.sources, (3.0, 1.0), resampled=True)
                            for e in range(5)])
    expected_a = 3 * n_a / (3 * n_a + n_b)
    assert abs(np.mean(draws < n_a) - expected_a) < 0.03
    for bad, msg in [("1", "1 weights for 2 sources"), ("a::1", "numbers separated"), ("0::0", "not all 0"),
                     ("-1::1", ">= 0")]:
        with pytest.raises(DataError, match=msg):
            parse_weights(bad, 2)


def test_pickled_members_are_never_unpickled(tmp_path, clip_parts):
    """A .pyd/.pickle/.npy member whose unpickling would write a file: the loader reads the sample and never
    unpickles, so the file is never written."""
    import pickle

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_FileWriter(str(marker)))
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 120, 10)).save(good, format="PNG")
    with ShardWriter(tmp_path, prefix="evil", samples_per_shard=100) as w:
        for i in range(4):
            w.write(f"{i:03d}", {"png": good.getvalue(), "txt": "a green square", "pyd": payload,
                                 "pickle": payload, "npy": payload})
    shards = ShardSet(expand_shards(str(tmp_path / "evil-000000.tar")))
    batch = ImageTextBatches(shards, LoaderSpec(batch_size=4), *clip_parts).make_batch(0)
    assert len(batch["keys"]) == 4 and not batch["bad"]
    assert not marker.exists()
    pickle.loads(payload)  # the test's control: unpickling really would have written it
    assert marker.exists()


class _FileWriter:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_samples_are_skipped_and_counted(tmp_path, clip_parts):
    train_tf, tokenizer = clip_parts
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good, format="JPEG")
    jpg = good.getvalue()
    with ShardWriter(tmp_path, prefix="bad", samples_per_shard=100) as w:
        w.write("000", {"jpg": jpg, "txt": "ok"})
        w.write("001", {"jpg": jpg[: len(jpg) // 3], "txt": "truncated jpeg"})
        w.write("002", {"jpg": jpg})
        w.write("003", {"jpg": jpg, "txt": b"\xff\xfe bad utf8"})
        w.write("004", {"txt": "no image"})
        w.write("005", {"jpg": b"", "txt": "empty file"})
        w.write("006", {"jpg": jpg, "txt": "   "})
        w.write("007", {"jpg": jpg, "txt": "fine too"})
    shards = ShardSet(expand_shards(str(tmp_path / "bad-000000.tar")))
    ds = ImageTextBatches(shards, LoaderSpec(batch_size=8, shuffle_block=1), train_tf, tokenizer)
    batch = ds.make_batch(0)
    assert sorted(batch["keys"]) == ["000", "007"]
    assert batch["images"].shape[0] == batch["texts"].shape[0] == 2
    assert dict(batch["bad"]) == {"bad_image": 2, "missing_caption": 1, "bad_caption": 1, "missing_image": 1,
                                  "empty_caption": 1}


def test_missing_and_too_small_data_is_a_clear_error(demo_data, clip_parts):
    with pytest.raises(DataError, match=r"data.train: 1 of 3 shards not found \(first: .*x-2.tar\)"):
        expand_shards(demo_data["train"].split("{")[0] + "{000000..000001}.tar::/tmp/x-2.tar", "data.train")
    shards = ShardSet(expand_shards(demo_data["val"]))
    with pytest.raises(DataError, match="fewer than one global batch"):
        ImageTextBatches(shards, LoaderSpec(batch_size=64, world_size=2), *clip_parts)


def test_pipe_sources_are_fetched_and_mixed_with_local_ones(demo_data, tmp_path):
    local = expand_shards(demo_data["train"])
    spec = f"pipe:cat {local[0]}::{local[1]}"
    assert expand_sources(spec) == [[f"pipe:cat {local[0]}"], [local[1]]]  # validation does not fetch
    fetched = expand_sources(spec, fetch=FetchSpec(str(tmp_path / "cache"), 60, 10))
    assert fetched[1] == [local[1]] and Path(fetched[0][0]).parent == tmp_path / "cache"
    shards = ShardSet.from_sources(fetched)
    assert shards.counts.tolist() == ShardSet(local[:2]).counts.tolist()
    assert shards.read(0) == ShardSet(local[:1]).read(0)
    with pytest.raises(DataError, match="pipe:sleep 5; cat x: no data for 1s"):
        expand_sources("pipe:sleep 5; cat x", fetch=FetchSpec(str(tmp_path / "cache"), 60, 1))


def test_evaluation_reads_pipe_shards_through_the_run_cache(demo_data, tmp_path):
    from pipeline.config import DataConfig
    from pipeline.eval.knn import extract_features
    from pipeline.models.backbone import backbone_transforms, create_backbone

    local = expand_shards(demo_data["val"])
    data = DataConfig(cache_dir=str(tmp_path / "cache"))
    fetched = local_shards(f"pipe:cat {local[0]}", "data.val", data)
    assert Path(fetched[0]).parent == tmp_path / "cache" and expand_shards(fetched) == fetched
    assert local_shards(demo_data["val"], "data.val", data) == local  # local shards are not copied
    torch.manual_seed(0)
    model = create_backbone("demo_vit")
    transform = backbone_transforms(model, train=False)
    feats, labels = extract_features(model, fetched, transform, batch_size=32)
    expected, expected_labels = extract_features(model, demo_data["val"], transform, batch_size=32)
    assert feats.shape[0] == 80 and torch.equal(labels, expected_labels)
    torch.testing.assert_close(feats, expected)
