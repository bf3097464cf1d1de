"""The per-shard index: one parquet row per sample with the byte offset and size of each member.

`prefix-000123.tar` has its index in `prefix-000123.index.parquet`. The loader uses it for exact epoch sizes
and O(1) reads of any sample; a tar without an index (someone else's) gets one built by scanning its headers.
Samples are grouped the way WebDataset groups them: the key is the member path up to the first dot of its
file name, the extension is the rest.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("members", pa.list_(pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]))),
])


def index_path(tar_path: str | Path) -> Path:
    p = Path(tar_path)
    return p.with_name(p.name.removesuffix(".tar") + ".index.parquet")


def split_member_name(name: str) -> tuple[str, str] | None:
    """'dir/000001.seg.jpg' -> ('dir/000001', 'seg.jpg'); None for names WebDataset would not group."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{head}/{stem}" if head else stem), ext


def scan_tar(tar_path: str | Path) -> pa.Table:
    """Builds the index of a tar by reading its headers only (tarfile seeks past member data)."""
    keys: list[str] = []
    members: list[list[dict]] = []
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            parts = split_member_name(m.name)
            if parts is None:
                continue
            key, ext = parts
            if not keys or keys[-1] != key:  # members of a sample are contiguous, as WebDataset requires
                keys.append(key)
                members.append([])
            members[-1].append({"ext": ext, "offset": m.offset_data, "size": m.size})
    return pa.table({"key": keys, "members": members}, schema=INDEX_SCHEMA)


def write_index(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_or_build_index(tar_path: str | Path) -> pa.Table:
    """Reads the index beside the tar; builds (and, where the directory is writable, saves) it if missing
    or older than the tar."""
    ip = index_path(tar_path)
    try:
        if ip.stat().st_mtime >= Path(tar_path).stat().st_mtime:
            return pq.read_table(ip, schema=INDEX_SCHEMA)
    except FileNotFoundError:
        pass
    table = scan_tar(tar_path)
    try:
        write_index(table, ip)
    except OSError:
        pass  # read-only dataset: keep the index in memory only
    return table


@dataclass
class ShardMembers:
    """Member byte ranges of every sample of one shard, as plain lists for fast access in loader workers."""
    path: str
    keys: list[str]
    members: list[list[tuple[str, int, int]]]

    @classmethod
    def load(cls, tar_path: str) -> "ShardMembers":
        t = load_or_build_index(tar_path).to_pydict()
        return cls(tar_path, t["key"], [[(m["ext"], m["offset"], m["size"]) for m in ms] for ms in t["members"]])

    def read(self, row: int, fd: int) -> dict[str, bytes]:
        """Reads one sample's members from an open file descriptor of the shard. Positional reads (pread)
        share no file offset, so forked loader workers can use descriptors inherited from their parent."""
        out = {}
        for ext, offset, size in self.members[row]:
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise EOFError(f"{self.path}: member {self.keys[row]}.{ext} is truncated")
            out[ext] = data
        return out
