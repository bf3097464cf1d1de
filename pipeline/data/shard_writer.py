"""Writes samples into WebDataset tars (`prefix-000000.tar`, ...) with a parquet index beside each.

A shard is written under a temporary name and renamed only when complete, its index first, so a crash or
kill never leaves a truncated `.tar` behind a valid name. Tar headers are normalised (mtime 0, uid/gid 0,
mode 0644) so the same samples always give byte-identical shards.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from pipeline.data.manifest import ShardEntry, write_manifest
from pipeline.data.shard_index import index_path, scan_tar, write_index


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def shard_pattern(prefix: str, count: int) -> str:
    """The braceexpand pattern that lists `count` shards."""
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


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
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._bytes_in_shard = 0
        self._keys_in_shard: set[str] = set()

    def _open(self) -> None:
        final = self.out_dir / shard_name(self.prefix, len(self.shards))
        self._tmp = final.with_name(final.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._in_shard = 0
        self._bytes_in_shard = 0
        self._keys_in_shard = set()

    def write(self, key: str, members: dict[str, bytes | str]) -> None:
        """Adds one sample; `members` maps extension ('jpg', 'txt', 'cls', ...) to its bytes."""
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty with no '.' in its file name")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        if self._tar is None:
            self._open()
        if key in self._keys_in_shard:
            raise ValueError(f"duplicate sample key {key!r} in one shard")
        size = 0
        for ext, data in sorted(members.items()):
            if isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            self._tar.addfile(info, io.BytesIO(data))
            size += len(data)
        self._keys_in_shard.add(key)
        self._in_shard += 1
        self._bytes_in_shard += size
        self.total_samples += 1
        self.total_bytes += size
        full = self._in_shard >= self.samples_per_shard
        if self.max_shard_bytes is not None and self._bytes_in_shard >= self.max_shard_bytes:
            full = True
        if full:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self._tmp.with_name(self._tmp.name.removesuffix(".tmp"))
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        write_index(scan_tar(self._tmp), index_path(final))
        os.replace(self._tmp, final)
        self.shards.append(final)
        self.entries[final.name] = ShardEntry(self._in_shard, final.stat().st_size)
        self._tar = None

    def close(self) -> dict:
        """Finishes the last (possibly short) shard and writes `manifest.json` and `summary.json`; returns the
        summary."""
        if self._tar is not None:
            self._finish_shard()
        summary = {
            "shards": len(self.shards),
            "samples": self.total_samples,
            "member_bytes": self.total_bytes,
            "bytes_on_disk": sum(p.stat().st_size for p in self.shards),
            "pattern": str(self.out_dir / shard_pattern(self.prefix, len(self.shards))) if self.shards else "",
        }
        write_manifest(self.out_dir, self.entries)
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out_dir / "summary.json")
        return summary

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind a final name
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
