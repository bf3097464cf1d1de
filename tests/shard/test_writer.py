import hashlib
import io
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.data.shard_index import index_path, scan_tar
from pipeline.shard.writer import ShardWriter


def _samples(n):
    return [(f"{i:06d}", {"txt": f"caption {i} é", "cls": str(i % 3), "bin": bytes(range(i % 256)) * 3})
            for i in range(n)]


def _write(out, n=25, per_shard=10):
    with ShardWriter(out, prefix="s", samples_per_shard=per_shard) as w:
        for key, members in _samples(n):
            w.write(key, members)
    return w


def test_plain_webdataset_reads_back_every_sample(tmp_path):
    w = _write(tmp_path)
    assert [p.name for p in w.shards] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    summary = (tmp_path / "summary.json").read_text()
    assert '"samples": 25' in summary and "s-{000000..000002}.tar" in summary
    got = list(wds.WebDataset(str(tmp_path / "s-{000000..000002}.tar"), shardshuffle=False))
    expected = _samples(25)
    assert [s["__key__"] for s in got] == [k for k, _ in expected]
    for s, (_, m) in zip(got, expected):
        assert s["txt"].decode() == m["txt"] and s["cls"].decode() == m["cls"] and s["bin"] == m["bin"]


def test_index_offsets_point_at_member_bytes(tmp_path):
    w = _write(tmp_path)
    expected = dict(_samples(25))
    for shard in w.shards:
        table = pq.read_table(index_path(shard)).to_pylist()
        data = shard.read_bytes()
        for row in table:
            for m in row["members"]:
                got = data[m["offset"]:m["offset"] + m["size"]]
                want = expected[row["key"]][m["ext"]]
                assert got == (want.encode() if isinstance(want, str) else want)


def test_output_is_byte_identical_across_runs(tmp_path):
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    digest = lambda ps: [hashlib.sha256(p.read_bytes()).hexdigest() for p in ps]
    assert digest(a.shards) == digest(b.shards)


def test_index_of_a_foreign_tar(tmp_path):
    """A tar written by someone else (plain tarfile, a directory prefix in names) gets the same grouping."""
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [("d/a.jpg", b"1"), ("d/a.txt", b"22"), ("d/b.seg.png", b"333"), ("d/b.txt", b"4"),
                           ("README", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rows = scan_tar(path).to_pylist()
    assert [r["key"] for r in rows] == ["d/a", "d/b"]
    assert [m["ext"] for m in rows[1]["members"]] == ["seg.png", "txt"]
    assert [m["size"] for m in rows[1]["members"]] == [3, 1]


def test_failure_mid_shard_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, prefix="s", samples_per_shard=10) as w:
            for key, members in _samples(15):
                w.write(key, members)
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.index.parquet", "s-000000.tar"]


@pytest.mark.parametrize("key", ["", "a.b", "dir/x.y"])
def test_bad_keys_are_refused(tmp_path, key):
    with ShardWriter(tmp_path) as w, pytest.raises(ValueError, match="invalid sample key"):
        w.write(key, {"txt": "x"})
