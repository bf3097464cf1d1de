"""The per-shard index: one parquet row per sample with the byte offset and size of each member.

`prefix-000123.tar` has its index in `prefix-000123.index.parquet`. The loader uses it for exact epoch sizes
and O(1) reads of any sample; a tar without an index (someone else's) gets one built by scanning its headers.
Samples are grouped the way WebDataset groups them: the key is the member path up to the first dot of its
file name, the extension is the rest.

An index says which tar it describes: its parquet metadata holds the tar's size in bytes, the number of
members it lists and a fingerprint of the tar's content (a hash of a few blocks spread over the file). An
index is used only if these match the tar beside it, so a shard rewritten, regrown or cut short since its
index was written is noticed whatever its modification time says; such an index is rebuilt from the tar.
An index without that metadata (written by an older version, or by another tool) is used if its first and
last samples sit where the tar's headers say and the tar's end-of-archive block follows its last member.

Building an index reads every header and checks the tar is whole: each member's data inside the file and the
end-of-archive block after the last one. A tar cut short (even exactly at a 512-byte header boundary, which
the `tarfile` module reads as a shorter complete archive) is refused with one line naming it, so a partial
index is never built, used, written or cached.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic_write import write_atomic
from pipeline.data.errors import DataError

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("members", pa.list_(pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]))),
])
META_TAR_BYTES = b"pipeline.tar_bytes"
META_MEMBERS = b"pipeline.tar_members"
META_FINGERPRINT = b"pipeline.tar_fingerprint"
FINGERPRINT_PIECES = 8      # blocks hashed, spread evenly from the first to the last byte of the tar
FINGERPRINT_PIECE = 4096    # bytes per block: 32 KiB read per check, against an index of ~50 bytes per sample
BLOCK = tarfile.BLOCKSIZE


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


def tar_fingerprint(fd: int, size: int) -> str:
    """A cheap content fingerprint: a hash of the size and of FINGERPRINT_PIECES blocks spread over the file
    (the first holds the first headers, the last the final member and the end-of-archive blocks)."""
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    span = max(size - FINGERPRINT_PIECE, 0)
    for i in range(FINGERPRINT_PIECES):
        h.update(os.pread(fd, FINGERPRINT_PIECE, span * i // (FINGERPRINT_PIECES - 1)))
    return h.hexdigest()


def _file_fingerprint(path: str | Path) -> tuple[int, str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return size, tar_fingerprint(fd, size)
    finally:
        os.close(fd)


def scan_tar(tar_path: str | Path) -> pa.Table:
    """Builds the index of a tar by reading its headers only (tarfile seeks past member data); raises
    DataError (one line naming the tar) unless the tar is whole."""
    keys: list[str] = []
    members: list[list[dict]] = []
    size = os.stat(tar_path).st_size
    if size == 0:
        raise DataError(f"{tar_path}: empty file (0 bytes), not a tar")
    last = "(none)"
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                if m.offset_data + m.size > size:
                    raise DataError(f"{tar_path}: truncated or corrupt: member {m.name!r} claims {m.size} bytes, "
                                    f"the file ends {size - m.offset_data} bytes into it")
                last = m.name
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
            end = tf.offset  # where tarfile stopped: the end-of-archive block of a whole tar
            with open(tar_path, "rb") as f:
                f.seek(end)
                marker = f.read(BLOCK)
    except tarfile.TarError as e:
        raise DataError(f"{tar_path}: not a readable tar after member {last!r} ({e})") from None
    if len(marker) < BLOCK:
        raise DataError(f"{tar_path}: truncated: the file ends after member {last!r} with no end-of-archive "
                        f"block ({size} bytes; a copy or download was cut short?)")
    if marker.count(0) != BLOCK:
        raise DataError(f"{tar_path}: unreadable after member {last!r} (offset {end}: not a tar header)")
    table = pa.table({"key": keys, "members": members}, schema=INDEX_SCHEMA)
    size_now, fingerprint = _file_fingerprint(tar_path)
    return table.replace_schema_metadata({
        META_TAR_BYTES: str(size_now).encode(), META_MEMBERS: str(sum(len(ms) for ms in members)).encode(),
        META_FINGERPRINT: fingerprint.encode()})


def with_tar_metadata(table: pa.Table, scanned: pa.Table) -> pa.Table:
    """`table` (an index with more columns, as `shard` writes) carrying the tar metadata of `scanned`."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **(scanned.schema.metadata or {})})


def write_index(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def read_index(path: str | Path) -> pa.Table:
    """An index file's key and members columns, with its metadata; DataError (one line) if it is not one."""
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "key" not in names or "members" not in names:
            raise DataError(f"{path}: not a shard index (columns {', '.join(names) or 'none'}; 'key' and "
                            f"'members' needed); delete it to have it rebuilt from the tar")
        table = pf.read(columns=["key", "members"])
        meta = pf.schema_arrow.metadata
        table = table.cast(INDEX_SCHEMA)
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"{path}: not a readable shard index ({detail}); delete it to have it rebuilt from "
                        f"the tar") from None
    return table.replace_schema_metadata(meta)


def index_mismatch(table: pa.Table, tar_path: str | Path) -> str | None:
    """Why `table` does not describe the tar at `tar_path` (None when it does); see the module docstring."""
    meta = table.schema.metadata or {}
    members = table.column("members").to_pylist()
    fd = os.open(tar_path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if META_TAR_BYTES in meta:
            if int(meta[META_TAR_BYTES]) != size:
                return f"the index is of a {int(meta[META_TAR_BYTES])}-byte tar, the file has {size} bytes"
            if int(meta.get(META_MEMBERS, -1)) != sum(len(ms) for ms in members):
                return "the index lists another number of members than it records"
            if meta.get(META_FINGERPRINT, b"").decode() != tar_fingerprint(fd, size):
                return "the tar's content differs from the one indexed (fingerprint)"
        if any(not ms for ms in members):
            return "a sample without members"
        if any(m["offset"] < BLOCK or m["size"] < 0 or m["offset"] + m["size"] > size for ms in members for m in ms):
            return "a member outside the file"
        if META_TAR_BYTES in meta or not members:
            return None
        # an index without metadata: the headers of the first and last samples, and the end after the last
        keys = table.column("key").to_pylist()
        for row in {0, len(keys) - 1}:
            first = members[row][0]
            name = os.pread(fd, 100, first["offset"] - BLOCK).split(b"\0", 1)[0].decode("utf-8", "replace")
            # ustar keeps at most 100 bytes of the name (the full one is in a PAX / GNU record before it)
            if not name or not f"{keys[row]}.{first['ext']}".startswith(name[:90]):
                return f"the tar header before sample {keys[row]!r} names another member"
        last = max(m["offset"] + m["size"] for m in members[-1])
        end = -(-last // BLOCK) * BLOCK
        if os.pread(fd, BLOCK, end) != bytes(BLOCK):
            return "the tar goes on after the last indexed member (or was cut short)"
        return None
    finally:
        os.close(fd)


def load_or_build_index(tar_path: str | Path) -> pa.Table:
    """Reads the index beside the tar if it describes the tar (`index_mismatch`); otherwise builds it from the
    tar and, where the directory is writable, saves it. Raises DataError (one line) for a tar that is not
    whole or an index file that is not an index."""
    ip = index_path(tar_path)
    if not os.path.isfile(tar_path):
        raise DataError(f"{tar_path}: shard not found")
    if ip.is_file():
        table = read_index(ip)
        if index_mismatch(table, tar_path) is None:
            return table
    table = scan_tar(tar_path)
    # ranks and loader workers may rebuild the same index at once: each writes its own temporary file
    try:
        write_atomic(ip, lambda tmp: pq.write_table(table, tmp),
                     tmp_suffix=f".{os.getpid()}-{threading.get_ident()}.tmp")
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
