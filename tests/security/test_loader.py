"""Adversarial and unlucky shards against the loader: what a shard (tar, index, `pipe:` command) can do.

Threat model: shards come from anywhere (a colleague's bucket, img2dataset, a download cut short). A shard may
be truncated, regrown, rewritten, hand-edited or hostile; its index may be stale, partial or not an index at
all. None of that may be read silently as other data, fill the memory or the disk, or end the job with a
traceback: either the damage is repaired (a stale index rebuilt from the tar), or the sample is skipped and
counted once by reason, or the job stops with one line naming the shard.
"""
import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import CaptionDecoder
from pipeline.config import DataConfig
from pipeline.data.errors import BadSample, DataError
from pipeline.data.image_decode import ImageToTensor
from pipeline.data.decoders import ImageLabelDecoder
from pipeline.data.loader import (FetchSpec, ImageTextBatches, LoaderSpec, ShardBatches, ShardSet, expand_sources,
                                  make_train_loader)
from pipeline.data.manifest import MANIFEST_NAME
from pipeline.data.remote import PipeSource, fetch_pipe, resolve_sources
from pipeline.data.shard_index import index_path, load_or_build_index, scan_tar
from pipeline.models.clip import create_clip
from pipeline.shard.writer import ShardWriter
from pipeline.train.loop import BadSampleBudget


@pytest.fixture(scope="module")
def clip_parts():
    _, train_tf, _, tokenizer = create_clip("clip-tiny")
    return train_tf, tokenizer


def _jpeg(color=(200, 10, 10), size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(directory: Path, n: int, prefix: str = "s", key: str = "k", caption: str = "a red square") -> Path:
    """One shard of `n` samples `{key}{i:04d}` (jpg + txt), with its index; returns the tar's path. The
    dataset manifest the writer leaves is removed: the checks here are those of a shard read on its own (a
    foreign tar); test_a_cut_tar_listed_in_the_manifest_fails_when_read covers the manifest's."""
    with ShardWriter(directory, prefix=prefix, samples_per_shard=10_000) as w:
        for i in range(n):
            w.write(f"{key}{i:04d}", {"jpg": _jpeg(), "txt": f"{caption} {i:04d}"})
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    return directory / f"{prefix}-000000.tar"


def _keys(shards: ShardSet) -> list[str]:
    return [shards.read(i)[0] for i in range(shards.total)]


def _header_boundary(tar: Path, sample: int) -> int:
    """The offset of the tar header of `sample`'s first member: a cut there leaves a tar that Python's tarfile
    reads as a complete, shorter archive."""
    members = load_or_build_index(tar).column("members").to_pylist()
    return members[sample][0]["offset"] - 512


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------ truncated tars (item 5)

@pytest.mark.parametrize("old_index", ["none", "whole-tar-index-newer-than-the-tar"])
def test_tar_cut_at_a_header_boundary_is_refused_and_no_partial_index_is_written(tmp_path, old_index):
    tar = _shard(tmp_path, 10)
    cut = _header_boundary(tar, 5)
    with open(tar, "r+b") as f:
        f.truncate(cut)
    if old_index == "none":
        index_path(tar).unlink()
    else:  # the index of the whole tar, still beside it and newer: time says it is fresh
        os.utime(index_path(tar), (tar.stat().st_mtime + 10,) * 2)
    before = index_path(tar).read_bytes() if index_path(tar).exists() else None
    with pytest.raises(DataError, match=r"s-000000\.tar: truncated: the file ends after member 'k0004\.txt'"):
        ShardSet([str(tar)])
    after = index_path(tar).read_bytes() if index_path(tar).exists() else None
    assert after == before  # no partial index written next to the data


def test_a_cut_tar_listed_in_the_manifest_fails_when_read(tmp_path):
    """With the dataset manifest (what `shard` writes) the loader trusts its counts at start-up; the cut tar's
    size no longer matches its index, and the first read of the shard stops with one line naming it."""
    with ShardWriter(tmp_path, prefix="s", samples_per_shard=10_000) as w:
        for i in range(10):
            w.write(f"k{i:04d}", {"jpg": _jpeg(), "txt": f"a red square {i:04d}"})
    tar = tmp_path / "s-000000.tar"
    assert (tmp_path / MANIFEST_NAME).is_file()
    with open(tar, "r+b") as f:
        f.truncate(_header_boundary(tar, 5))
    shards = ShardSet([str(tar)])
    with pytest.raises(DataError, match=r"s-000000\.tar: truncated: the file ends after member 'k0004\.txt'") as e:
        shards.read(0)
    _one_line(e.value)


def test_tar_cut_mid_member_zero_byte_tar_and_a_10e12_byte_header_are_one_line_errors(tmp_path):
    tar = _shard(tmp_path, 4)
    index_path(tar).unlink()
    members = scan_tar(tar).column("members").to_pylist()
    with open(tar, "r+b") as f:  # cut in the middle of the last sample's image
        f.truncate(members[3][0]["offset"] + members[3][0]["size"] // 2)
    with pytest.raises(DataError, match=r"truncated or corrupt: member 'k0003\.jpg' claims \d+ bytes"):
        _one_line(ShardSet([str(tar)]))
    assert not index_path(tar).exists()

    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.tar: empty file \(0 bytes\), not a tar"):
        ShardSet([str(empty)])

    huge = tmp_path / "huge.tar"  # one real member, then a header claiming 10^12 bytes of data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    head = buf.getvalue()[:1024]  # the member (header + one data block), without the end-of-archive blocks
    liar = tarfile.TarInfo("b.jpg")
    liar.size = 10**12
    huge.write_bytes(head + liar.tobuf(tarfile.PAX_FORMAT) + bytes(1024))
    with pytest.raises(DataError, match=r"huge\.tar: truncated or corrupt: member 'b\.jpg' claims 1000000000000"):
        _one_line(ShardSet([str(huge)]))


def test_pipe_source_cut_at_a_header_boundary_fails_and_nothing_is_cached(tmp_path):
    tar = _shard(tmp_path / "data", 10)
    cut = _header_boundary(tar, 5)
    url = f"pipe:head -c {cut} {tar}"
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"pipe:head -c \d+ .*s-000000\.tar: its output is not a whole tar "
                                        r"\(output: truncated"):
        _one_line(fetch_pipe(url, cache))
    assert not PipeSource(url).cached_path(cache).exists()
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # no index, no temporary file


# ------------------------------------------------------------------------------ stale indexes (item 8)

def _older(path: Path, than: Path) -> None:
    t = than.stat().st_mtime - 100
    os.utime(path, (t, t))


@pytest.mark.parametrize("change", ["rewritten-same-size", "regrown", "shrunk"])
def test_an_index_of_another_version_of_the_shard_is_rebuilt_whatever_the_mtime(tmp_path, change):
    old = _shard(tmp_path / "old", 8)
    old_index = index_path(old).read_bytes()
    new_dir = tmp_path / "new"
    if change == "rewritten-same-size":  # other keys and captions of the same lengths: only content differs
        new = _shard(new_dir, 8, key="q", caption="a big square")
        assert new.stat().st_size == old.stat().st_size
    else:
        new = _shard(new_dir, 16 if change == "regrown" else 5)
    expected = _keys(ShardSet([str(new)]))
    # the new tar in place of the old one, with the old index beside it, the tar older than the index
    os.replace(new, old)
    index_path(old).write_bytes(old_index)
    _older(old, index_path(old))
    shards = ShardSet([str(old)])
    assert _keys(shards) == expected  # every sample of the new tar, under its own key
    assert [shards.read(i)[1]["txt"] for i in range(shards.total)] == \
        [ShardSet([str(old)]).read(i)[1]["txt"] for i in range(shards.total)]
    assert load_or_build_index(old).num_rows == len(expected)  # and the index beside it was replaced


def test_a_shard_changed_during_the_run_stops_it_naming_the_shard(tmp_path):
    tar = _shard(tmp_path / "a", 8)
    shards = ShardSet([str(tar)])  # the epoch plan is made with 8 samples
    regrown = _shard(tmp_path / "b", 16)
    os.replace(regrown, tar)
    os.replace(index_path(regrown), index_path(tar))
    dataset = ShardBatches(shards, LoaderSpec(batch_size=4, shuffle_block=1), CaptionDecoder())
    batch = next(iter(make_train_loader(dataset, workers=1, pin_memory=False)))
    with pytest.raises(DataError, match=r"s-000000\.tar: its index has 16 samples, the manifest 8 \(the shard changed"):
        _one_line(BadSampleBudget(0.5).add(batch, 4))


# ------------------------------------------------------------------------------ hostile indexes (item 10)

def test_an_index_entry_of_10e12_bytes_is_not_read_the_tar_is_reindexed(tmp_path):
    tar = _shard(tmp_path, 4)
    t = pq.read_table(index_path(tar))
    members = t.column("members").to_pylist()
    members[2][0]["size"] = 10**12
    t = t.set_column(1, "members", pa.array(members, t.schema.field("members").type))
    pq.write_table(t, index_path(tar))  # the recorded size, count and fingerprint still match the tar
    shards = ShardSet([str(tar)])
    assert [len(shards.read(i)[1]["jpg"]) for i in range(4)] == [len(_jpeg())] * 4


@pytest.mark.parametrize("content", ["not parquet", "no members column"])
def test_an_index_that_is_not_an_index_is_a_one_line_error_naming_it(tmp_path, content):
    tar = _shard(tmp_path, 4)
    if content == "not parquet":
        index_path(tar).write_bytes(b"PAR1 this is not parquet at all")
    else:
        pq.write_table(pa.table({"key": ["k0000"]}), index_path(tar))
    with pytest.raises(DataError, match=r"s-000000\.index\.parquet: not a (readable )?shard index .*delete it"):
        _one_line(ShardSet([str(tar)]))


# ------------------------------------------------------------------------------ counting (item 6)

@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_counted_once_through_the_dataloader(tmp_path, clip_parts, workers):
    jpg = _jpeg()
    with ShardWriter(tmp_path, prefix="bad", samples_per_shard=100) as w:
        for i in range(16):
            broken = i % 4 == 1  # 4 of 16 truncated
            w.write(f"{i:03d}", {"jpg": jpg[: len(jpg) // 3] if broken else jpg, "txt": f"sample {i}"})
    shards = ShardSet([str(tmp_path / "bad-000000.tar")])
    dataset = ImageTextBatches(shards, LoaderSpec(batch_size=8, shuffle_block=1), *clip_parts)
    budget = BadSampleBudget(1.0)
    loader = iter(make_train_loader(dataset, workers, pin_memory=False))
    for _ in range(2):  # one epoch: the 16 samples
        batch = next(loader)
        budget.add(batch, 8)
    assert dict(budget.bad) == {"bad_image": 4}
    assert budget.seen == 16


# ------------------------------------------------------------------------------ limits (item 9)

def test_a_megabyte_caption_is_a_bad_sample_not_a_minute_of_tokenising(tmp_path, clip_parts):
    with ShardWriter(tmp_path, prefix="long", samples_per_shard=100) as w:
        w.write("000", {"jpg": _jpeg(), "txt": "a red square"})
        w.write("001", {"jpg": _jpeg(), "txt": "red " * 250_000})
        w.write("002", {"jpg": _jpeg(), "txt": "x" * 16384})  # at the limit: kept
    shards = ShardSet([str(tmp_path / "long-000000.tar")])
    batch = ImageTextBatches(shards, LoaderSpec(batch_size=3, shuffle_block=1), *clip_parts).make_batch(0)
    assert sorted(batch["keys"]) == ["000", "002"]
    assert batch["bad"] == {"caption_too_long": 1}
    tight = ImageTextBatches(shards, LoaderSpec(batch_size=3, shuffle_block=1), *clip_parts,
                             max_caption_bytes=100).make_batch(0)
    assert tight["keys"] == ["000"] and tight["bad"] == {"caption_too_long": 2}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels, with one row of data: decoding it would
    allocate the whole image before finding out it is truncated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
            + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header is patched to claim width x height."""
    data = bytearray(_jpeg(size=16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "PIL path"])
def test_images_over_12000_squared_pixels_are_refused_before_decoding(clip_parts, fast):
    train_tf, _ = clip_parts
    if not fast:
        from torchvision.transforms import ColorJitter, Compose
        train_tf = Compose([ColorJitter(0.1), *train_tf.transforms])  # a step the fast path does not take
    image = ImageToTensor(train_tf)
    assert image.fast == fast
    for data in (_png_header_only(12_001, 12_001), _jpeg_claiming(12_001, 12_001), _png_header_only(16_000, 16_000)):
        with pytest.raises(BadSample) as e:
            image(data)
        assert e.value.reason == "image_too_large"
    assert image(_jpeg()).shape[0] == 3  # an ordinary image still decodes


def test_a_pipe_that_never_ends_is_stopped_at_the_byte_cap_with_one_line(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"pipe:yes x\.tar: wrote more than 0\.004 GB \(data\.pipe_max_shard_gb\); "
                                        r"killed"):
        _one_line(resolve_sources(["pipe:yes x.tar"], cache, timeout_s=60, stall_timeout_s=10,
                                  max_bytes=4_000_000))
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]
    # the config key reaches the fetch
    spec = FetchSpec.for_data(DataConfig(cache_dir=str(cache), pipe_max_shard_gb=0.004))
    with pytest.raises(DataError, match=r"wrote more than 0\.004 GB"):
        expand_sources("pipe:yes y.tar", "data.train", spec)


@pytest.mark.parametrize("read_size", [None, 3000], ids=["whole-reads", "small-reads"])
def test_a_full_cache_disk_is_one_line_and_leaves_no_temporary_file(read_size, tmp_path):
    """The disk fills while a pipe: shard is fetched (RLIMIT_FSIZE: writes past 1 MB fail as they would on
    a full disk). Small reads from the pipe (a busy machine, a command writing little at a time) once left
    refused bytes in a file buffer whose close failed again: a traceback instead of the line."""
    cache = tmp_path / "cache"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "from pipeline.data.errors import DataError\n"
            + (f"import pipeline.data.pipe_command as pc; pc.CHUNK = {read_size}\n" if read_size else "") +
            "from pipeline.data.remote import fetch_pipe\n"
            f"try:\n    fetch_pipe('pipe:head -c 5000000 /dev/zero # z.tar', {str(cache)!r}, 60, 10)\n"
            "except DataError as e:\n    print('error:', e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "" and proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    assert "cannot write to the shard cache" in proc.stdout and "File too large" in proc.stdout
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


# ------------------------------------------------------------------------------ labels (item 10)

def test_class_ids_outside_the_model_s_classes_are_bad_samples(tmp_path, clip_parts):
    train_tf, _ = clip_parts
    with ShardWriter(tmp_path, prefix="cls", samples_per_shard=100) as w:
        for i, label in enumerate(["0", "9", "10", "-1", "99999999999999999999999", "3"]):
            w.write(f"{i:03d}", {"jpg": _jpeg(), "cls": label})
    shards = ShardSet([str(tmp_path / "cls-000000.tar")])
    decoder = ImageLabelDecoder(train_tf, num_classes=10)
    batch = ShardBatches(shards, LoaderSpec(batch_size=6, shuffle_block=1), decoder).make_batch(0)
    assert batch["keys"] == ["000", "001", "005"]
    assert batch["labels"].tolist() == [0, 9, 3]
    assert batch["bad"] == {"label_out_of_range": 3}
    # the supervised task gives its decoder the model's class count
    from pipeline.config import RunConfig
    from pipeline.tasks.backbone import SupervisedTask

    cfg = RunConfig()
    cfg.task = "supervised"
    cfg.model.name = "demo_vit"
    task = SupervisedTask(cfg)
    assert task.decoder.num_classes == task.model.num_classes > 0
