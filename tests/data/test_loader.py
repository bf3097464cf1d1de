import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.loader import (DataError, ImageTextBatches, LoaderSpec, ShardSet, epoch_order, expand_shards,
                                  make_train_loader, rank_batches)
from pipeline.data.shard_writer import ShardWriter
from pipeline.models.clip import create_clip


@pytest.fixture(scope="module")
def clip_parts():
    _, train_tf, _, tokenizer = create_clip("clip-tiny")
    return train_tf, tokenizer


def test_epoch_split_is_exact_and_balanced():
    counts = np.array([90, 90, 90, 17, 90, 3, 90])  # uneven shards
    total = counts.sum()
    order = epoch_order(counts, seed=1, epoch=0, shuffle_block=64)
    assert sorted(order.tolist()) == list(range(total))
    assert not np.array_equal(order, epoch_order(counts, seed=1, epoch=1, shuffle_block=64))
    np.testing.assert_array_equal(order, epoch_order(counts, seed=1, epoch=0, shuffle_block=64))
    world, bs = 2, 16
    per_rank = [rank_batches(order, r, world, bs) for r in range(world)]
    assert per_rank[0].shape == per_rank[1].shape == (total // (world * bs), bs)
    seen = np.concatenate([p.ravel() for p in per_rank])
    assert len(set(seen.tolist())) == len(seen)  # no sample twice
    assert total - len(seen) < world * bs  # only the documented remainder is dropped


def _collect(dataset, n, workers):
    out = []
    for batch in make_train_loader(dataset, workers, pin_memory=False):
        out.append(batch)
        if len(out) == n:
            return out


def test_stream_is_independent_of_workers_and_resumes_exactly(demo_data, clip_parts):
    train_tf, tokenizer = clip_parts
    shards = ShardSet(expand_shards(demo_data["train"]))
    spec = LoaderSpec(batch_size=16, rank=1, world_size=2, seed=3, shuffle_block=50)
    full = _collect(ImageTextBatches(shards, spec, train_tf, tokenizer), 22, workers=0)  # crosses an epoch (17/epoch)
    assert [b["batch"] for b in full] == list(range(22)) and full[17]["epoch"] == 1
    two_workers = _collect(ImageTextBatches(shards, spec, train_tf, tokenizer), 22, workers=2)
    resumed = _collect(ImageTextBatches(shards, spec, train_tf, tokenizer, start_batch=13), 9, workers=2)
    for a, b in zip(full, two_workers):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["texts"], b["texts"])
    for a, b in zip(full[13:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    epoch0 = [k for b in full[:17] for k in b["keys"]]
    assert len(set(epoch0)) == len(epoch0) == 17 * 16


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
