"""Writes samples into WebDataset tars (`prefix-000000.tar`, ...) with a parquet index beside each.

`TarShard` is the one tar writer core: both `ShardWriter` below and the `shard` tool (`splits.py`) write
every shard through it. A shard is written under a temporary name and renamed only when complete, its index
first, so a crash or kill never leaves a truncated `.tar` behind a valid name. Tar headers are normalised
(mtime 0, uid/gid 0, mode 0644) so the same samples always give byte-identical shards.

`ShardWriter` is the plain library writer (samples in, shards + `manifest.json` + `summary.json` out) used by
the demo data, the benchmarks and the tests. It lives here, with the tool that makes shards, and not in
`pipeline/data/`: the training read path only reads shards, and none of it imports this module.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa

from pipeline.atomic_write import fsync_file, temporary_path, write_atomic
from pipeline.data.manifest import ShardEntry, write_manifest
from pipeline.data.shard_index import index_path, scan_tar, write_index


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def shard_pattern(prefix: str, count: int) -> str:
    """The braceexpand pattern that lists `count` shards."""
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


class TarShard:
    """One shard tar being written to `<name>.tar.tmp`. `seal()` closes it, flushes it to disk and scans its
    index; `commit(index)` writes that index (or one with more columns) under its final name and then renames
    the tar: the rename is the commit, and the index it finds beside it describes it (size, member count,
    fingerprint; see shard_index)."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = temporary_path(final)
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []  # in the order written
        self.member_bytes = 0

    @property
    def offset(self) -> int:
        """Bytes written so far (the end-of-archive blocks and record padding not yet counted)."""
        return self.tar.offset

    def add(self, key: str, members: dict[str, bytes]) -> int:
        """Appends one sample, its members in sorted extension order; returns their bytes."""
        size = 0
        for ext, data in sorted(members.items()):
            info = tarfile.TarInfo(f"{key}.{ext}")  # normalised headers: byte-identical reruns
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            self.tar.addfile(info, io.BytesIO(data))
            size += len(data)
        self.keys.append(key)
        self.member_bytes += size
        return size

    def seal(self) -> pa.Table:
        """Closes the tar and flushes it to disk; returns its index as scanned (key and members columns, with
        the tar's size, member count and fingerprint as metadata)."""
        self.tar.close()
        fsync_file(self.tmp)
        return scan_tar(self.tmp)

    def commit(self, index: pa.Table) -> None:
        """Index first, the tar's rename last: a tar under its final name always has its index."""
        write_index(index, index_path(self.final))
        os.replace(self.tmp, self.final)

    def abandon(self) -> None:
        """Removes what this shard left (also after a failed write: closing the tar may fail again, e.g. on a
        full disk)."""
        try:
            self.tar.close()
        except OSError:
            pass
        finally:
            temporary_path(index_path(self.final)).unlink(missing_ok=True)
            self.tmp.unlink(missing_ok=True)


class ShardWriter:
    def __init__(self, out_dir: str | Path, prefix: str = "shard", samples_per_shard: int = 1000,
                 max_shard_bytes: int | None = None):
        if samples_per_shard <= 0:
            raise ValueError("samples_per_shard must be > 0")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[Path] = []
        self.entries: dict[str, ShardEntry] = {}  # what goes into manifest.json
        self.total_samples = 0
        self.total_bytes = 0
        self._shard: TarShard | None = None
        self._keys_in_shard: set[str] = set()

    def write(self, key: str, members: dict[str, bytes | str]) -> None:
        """Adds one sample; `members` maps extension ('jpg', 'txt', 'cls', ...) to its bytes."""
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty with no '.' in its file name")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        if self._shard is None:
            self._shard = TarShard(self.out_dir / shard_name(self.prefix, len(self.shards)))
            self._keys_in_shard = set()
        if key in self._keys_in_shard:
            raise ValueError(f"duplicate sample key {key!r} in one shard")
        size = self._shard.add(key, {ext: data.encode("utf-8") if isinstance(data, str) else data
                                     for ext, data in members.items()})
        self._keys_in_shard.add(key)
        self.total_samples += 1
        self.total_bytes += size
        full = len(self._shard.keys) >= self.samples_per_shard
        if self.max_shard_bytes is not None and self._shard.member_bytes >= self.max_shard_bytes:
            full = True
        if full:
            self._finish_shard()

    def _finish_shard(self) -> None:
        shard = self._shard
        shard.commit(shard.seal())
        self._shard = None
        self.shards.append(shard.final)
        self.entries[shard.final.name] = ShardEntry(len(shard.keys), shard.final.stat().st_size)

    def close(self) -> dict:
        """Finishes the last (possibly short) shard and writes `manifest.json` and `summary.json`; returns the
        summary."""
        if self._shard is not None:
            self._finish_shard()
        summary = {
            "shards": len(self.shards),
            "samples": self.total_samples,
            "member_bytes": self.total_bytes,
            "bytes_on_disk": sum(p.stat().st_size for p in self.shards),
            "pattern": str(self.out_dir / shard_pattern(self.prefix, len(self.shards))) if self.shards else "",
        }
        write_manifest(self.out_dir, self.entries)
        write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._shard is not None:  # leave no half-written shard behind a final name
            self._shard.abandon()
            self._shard = None
