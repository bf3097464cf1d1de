"""One file per shard directory with every shard's sample count: what the loader reads before step 1.

`manifest.json` beside the shards (and `summary.json`) lists, column by column, each tar's file name, its number
of samples, its size in bytes and the file name of its index. `python -m pipeline shard` and `ShardWriter` write
it; the loader plans the epoch from it alone, so a rank reads one file instead of one index per shard (41,408 on
a shared filesystem). A shard's index is then opened only by the loader worker that reads from it, which checks
the index's row count and the tar's size against the manifest, so a tar replaced after the manifest was written
stops the run with one line instead of giving wrong samples.

Shards the manifest does not list (someone else's tars, a directory without one) are counted from their indexes,
built where missing, and added to the manifest, under an exclusive lock on `.manifest.lock` in the directory:
one process of the job does that work while the others wait for it and then read its result. Where the shard
directory is not writable, the manifest and its lock live in the shard cache
(`$PIPELINE_SHARD_CACHE/manifests/`, or `~/.cache/pipeline/shards/manifests/`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

from pipeline.atomic_write import write_atomic
from pipeline.data.errors import DataError
from pipeline.data.shard_index import index_path, load_or_build_index

MANIFEST_NAME = "manifest.json"
FORMAT = "pipeline-shard-manifest"
VERSION = 1


class ShardEntry(NamedTuple):  # a tuple: 41k of them are made in milliseconds (a frozen dataclass takes ~1 s)
    samples: int
    bytes: int  # size of the tar when it was counted; -1: not known


def manifest_path(directory: str | Path) -> Path:
    return Path(directory) / MANIFEST_NAME


def write_manifest(directory: str | Path, entries: dict[str, ShardEntry], path: Path | None = None) -> Path:
    """Writes the manifest of `entries` (tar file name -> entry) atomically; returns its path."""
    path = manifest_path(directory) if path is None else path
    names = sorted(entries)
    doc = {"format": FORMAT, "version": VERSION, "shards": names, "samples": [entries[n].samples for n in names],
           "bytes": [entries[n].bytes for n in names],
           "indexes": [index_path(Path(directory) / n).name for n in names]}
    # processes may write one manifest at once (ranks after a rebuild): each has its own temporary file
    return write_atomic(path, json.dumps(doc, separators=(",", ":")), tmp_suffix=f".{os.getpid()}.tmp")


def read_manifest(path: Path) -> dict[str, ShardEntry]:
    """The entries of the manifest at `path` ({} when there is none); a manifest that is not ours is an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
        names, samples, sizes = doc["shards"], doc["samples"], doc["bytes"]
        if not len(names) == len(samples) == len(sizes):
            raise ValueError("columns of different lengths")
        return {n: ShardEntry(int(c), int(b)) for n, c, b in zip(names, samples, sizes)}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a readable shard manifest ({e}); delete it to have it rebuilt") from None


def count_shard(tar_path: str | Path) -> ShardEntry:
    """A shard's entry from its index (built, and saved where possible, when missing). A `pipe:` shard whose
    index alone is in the cache so far (its tar is fetched when read) is counted from that index."""
    if not os.path.exists(tar_path) and index_path(tar_path).is_file():
        return ShardEntry(pq.ParquetFile(index_path(tar_path)).metadata.num_rows, -1)
    samples = load_or_build_index(tar_path).num_rows
    return ShardEntry(samples, os.stat(tar_path).st_size)


def _cache_location(directory: Path) -> Path:
    root = os.environ.get("PIPELINE_SHARD_CACHE") or str(Path.home() / ".cache/pipeline/shards")
    digest = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:16]
    return Path(root) / "manifests" / f"{digest}-{MANIFEST_NAME}"


def _open_lock(lock: Path) -> int | None:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


def _directory_entries(directory: Path, names: list[str]) -> dict[str, ShardEntry]:
    """Entries for `names` (tars in `directory`): the manifest's, the missing ones counted once under a lock."""
    entries = read_manifest(manifest_path(directory))
    if all(n in entries for n in names):
        return entries
    where = manifest_path(directory)
    fd = _open_lock(directory / f".{MANIFEST_NAME}.lock")
    if fd is None:  # read-only shard directory: the manifest goes into the shard cache
        where = _cache_location(directory)
        entries.update(read_manifest(where))
        if all(n in entries for n in names):
            return entries
        fd = _open_lock(where.with_name(f".{where.name}.lock"))
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor is closed
            entries.update(read_manifest(where))  # the lock's previous holder may have counted them
        missing = [n for n in names if n not in entries]
        if missing:
            entries.update({n: count_shard(directory / n) for n in missing})
            if fd is not None:
                try:
                    write_manifest(directory, entries, where)
                except OSError:
                    pass  # counted in memory; the next run counts again
        return entries
    finally:
        if fd is not None:
            os.close(fd)


def shard_entries(paths: list[str]) -> list[ShardEntry]:
    """One entry per path (tars, in any directories), from the manifests of their directories."""
    split = [os.path.split(str(p)) for p in paths]  # plain strings: 41k Path objects cost seconds
    by_dir: dict[str, list[str]] = {}
    for directory, name in split:
        by_dir.setdefault(directory, []).append(name)
    found = {d: _directory_entries(Path(d or "."), names) for d, names in by_dir.items()}
    return [found[d][name] for d, name in split]
