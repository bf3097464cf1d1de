"""Writing the shards of one split for `python -m pipeline shard`, in row order, with an account of every row.

Each shard's tar goes through the one tar writer core (`writer.TarShard`); beside it the tool keeps, per shard,
a parquet index with more columns (width, height, sha256 of the stored image), the failed rows
(`failures/<prefix>-NNNNNN.parquet`) and a stats JSON (`<prefix>-NNNNNN.stats.json`, which holds `row_end`,
the row id the next shard starts at). These are written before the tar's rename, the commit; a shard is
complete when all four files are there, and a rerun keeps the complete shards and deletes the rest.
"""
from __future__ import annotations

import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic_write import temporary_path, write_atomic
from pipeline.data.shard_index import INDEX_SCHEMA, index_path, with_tar_metadata
from pipeline.shard.options import TAR_END
from pipeline.shard.samples import Failure, Sample
from pipeline.shard.writer import TarShard, shard_name, shard_pattern

FAILURES_SCHEMA = pa.schema([("row", pa.int64()), ("source", pa.string()), ("key", pa.string()),
                             ("reason", pa.string()), ("detail", pa.string())])
# The loader's index columns (key, members) come first, unchanged; ours follow.
SHARD_INDEX_SCHEMA = pa.schema(list(INDEX_SCHEMA) + [("width", pa.int32()), ("height", pa.int32()),
                                                     ("sha256", pa.string())])


def _tar_size(members: dict[str, bytes]) -> int:
    """Bytes the members add to a tar (a header block each, data padded to blocks; long names aside)."""
    return sum(512 + math.ceil(len(d) / 512) * 512 for d in members.values())


def write_json(path: Path, obj: dict) -> None:
    """The tool's JSON files (stats, job, summaries): indented, keys sorted, replaced atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_parquet(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def _printable(text: str) -> str:
    """Text read with surrogateescape (a key or path with bytes that are not UTF-8) as valid UTF-8 for parquet."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stats_path(tar: Path) -> Path:
    return tar.with_name(tar.name.removesuffix(".tar") + ".stats.json")


def failures_path(directory: Path, prefix: str, number: int) -> Path:
    return directory / "failures" / f"{prefix}-{number:06d}.parquet"


class ShardFile:
    """One shard being written (its tar as a `TarShard`), with the rows accounted to it."""

    def __init__(self, directory: Path, prefix: str, number: int, row_begin: int):
        self.tar = TarShard(directory / shard_name(prefix, number))
        self.final = self.tar.final
        self.failures_file = failures_path(directory, prefix, number)
        self.row_begin = row_begin
        self.sizes: list[tuple[int, int, str]] = []
        self.failures: list[dict] = []
        self.counts: Counter = Counter()

    def would_overflow(self, sample: Sample, samples_per_shard: int, max_bytes: int | None) -> bool:
        if len(self.tar.keys) >= samples_per_shard:
            return True
        if max_bytes is None or not self.tar.keys:
            return False  # a sample larger than the cap still gets a shard of its own
        end = self.tar.offset + _tar_size(sample.members) + TAR_END
        return math.ceil(end / tarfile.RECORDSIZE) * tarfile.RECORDSIZE > max_bytes  # tar pads to whole records

    def add(self, key: str, sample: Sample) -> None:
        self.tar.add(key, sample.members)
        self.sizes.append((sample.width, sample.height, sample.sha256))

    def fail(self, row: int, source: str, key: str, failure: Failure) -> None:
        self.failures.append({"row": row, "source": _printable(source), "key": _printable(key),
                              "reason": failure.reason, "detail": _printable(failure.detail[:500])})
        self.counts[failure.reason] += 1

    def finish(self, row_end: int) -> dict:
        """Failures and stats first, then the index and the tar's rename (`TarShard.commit`): a shard with a
        final name is complete."""
        keys = self.tar.keys
        scanned = self.tar.seal()
        if scanned.column("key").to_pylist() != keys:
            raise RuntimeError(f"{self.tar.tmp}: index keys differ from the keys written")  # a bug, not bad data
        w, h, sha = zip(*self.sizes) if self.sizes else ((), (), ())
        index = with_tar_metadata(pa.table({"key": scanned.column("key"), "members": scanned.column("members"),
                                            "width": pa.array(w, pa.int32()), "height": pa.array(h, pa.int32()),
                                            "sha256": pa.array(sha, pa.string())}, schema=SHARD_INDEX_SCHEMA),
                                  scanned)
        self.failures_file.parent.mkdir(exist_ok=True)
        write_parquet(pa.Table.from_pylist(self.failures, schema=FAILURES_SCHEMA), self.failures_file)
        stats = {"shard": self.final.name, "row_begin": self.row_begin, "row_end": row_end,
                 "rows": len(keys) + len(self.failures), "samples": len(keys),
                 "failed": len(self.failures), "failures": dict(sorted(self.counts.items())),
                 "member_bytes": self.tar.member_bytes, "tar_bytes": self.tar.tmp.stat().st_size}
        write_json(stats_path(self.final), stats)
        self.tar.commit(index)
        return stats

    def abandon(self) -> None:
        """Removes what this shard left, the tar's and the sidecars' temporary files."""
        try:
            self.tar.abandon()
        finally:
            for p in (stats_path(self.final), self.failures_file):
                temporary_path(p).unlink(missing_ok=True)


_SHARD_FILE = re.compile(r"(?P<prefix>.+)-(?P<number>\d{6})\.(?:tar|tar\.tmp|index\.parquet|stats\.json)(?:\.tmp)?$")


class SplitWriter:
    """Writes the shards of one split in row order; knows how far a previous run got."""

    def __init__(self, directory: Path, prefix: str, samples_per_shard: int, max_shard_bytes: int | None,
                 seen_images: dict[str, str] | None):
        self.dir, self.prefix = directory, prefix
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.seen_images = seen_images  # sha256 -> key of the sample that has it (--dedup-image), shared by splits
        self.done: list[dict] = []      # stats of complete shards
        self.current: ShardFile | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume_row = self._recover()

    def _complete(self, number: int) -> dict | None:
        tar = self.dir / shard_name(self.prefix, number)
        stats = stats_path(tar)
        failures = failures_path(self.dir, self.prefix, number)
        if not (tar.is_file() and stats.is_file() and index_path(tar).is_file() and failures.is_file()):
            return None
        return json.loads(stats.read_text())

    def _recover(self) -> int:
        """Keeps the complete shards 0..k-1, deletes everything of shard k and later; returns where to go on."""
        while (stats := self._complete(len(self.done))) is not None:
            self.done.append(stats)
        first_gone = len(self.done)
        for directory in (self.dir, self.dir / "failures"):
            if not directory.is_dir():
                continue
            for p in directory.iterdir():
                m = _SHARD_FILE.match(p.name) if directory == self.dir else re.fullmatch(
                    rf"{re.escape(self.prefix)}-(?P<number>\d{{6}})\.parquet(?:\.tmp)?", p.name)
                if m and (directory != self.dir or m.group("prefix") == self.prefix) and (
                        int(m.group("number")) >= first_gone or p.name.endswith(".tmp")):
                    p.unlink()
        if self.seen_images is not None:
            for stats in self.done:
                t = pq.read_table(index_path(self.dir / stats["shard"]), columns=["key", "sha256"]).to_pydict()
                for key, sha in zip(t["key"], t["sha256"]):
                    self.seen_images.setdefault(sha, key)
        return self.done[-1]["row_end"] if self.done else 0

    def add(self, row: int, source: str, key: str, outcome: Sample | Failure) -> None:
        if isinstance(outcome, Sample) and self.seen_images is not None:
            first = self.seen_images.setdefault(outcome.sha256, key)
            if first != key:
                outcome = Failure("duplicate_image", f"same image as {first}")
        if isinstance(outcome, Sample):
            if self.current is not None and self.current.would_overflow(outcome, self.samples_per_shard,
                                                                        self.max_shard_bytes):
                self.done.append(self.current.finish(row_end=row))
                self.current = None
            if self.current is None:
                self.current = ShardFile(self.dir, self.prefix, len(self.done), row)
            self.current.add(key, outcome)
        else:
            if self.current is None:
                self.current = ShardFile(self.dir, self.prefix, len(self.done), row)
            self.current.fail(row, source, key, outcome)

    def finish(self, total_rows: int) -> None:
        if self.current is not None:
            self.done.append(self.current.finish(row_end=total_rows))
            self.current = None

    def abandon(self) -> None:
        if self.current is not None:
            self.current.abandon()
            self.current = None

    def summary(self) -> dict:
        failures = Counter()
        for s in self.done:
            failures.update(s["failures"])
        rows = sum(s["rows"] for s in self.done)
        failed = sum(s["failed"] for s in self.done)
        return {
            "rows": rows, "samples": sum(s["samples"] for s in self.done), "failed": failed,
            "failure_rate": failed / rows if rows else 0.0, "failures": dict(sorted(failures.items())),
            "shards": len(self.done),
            "pattern": str(self.dir / shard_pattern(self.prefix, len(self.done))) if self.done else "",
            "bytes_on_disk": sum(s["tar_bytes"] for s in self.done),
            "index_bytes": sum(index_path(self.dir / s["shard"]).stat().st_size for s in self.done),
            "member_bytes": sum(s["member_bytes"] for s in self.done),
        }

    def failures_table(self) -> pa.Table:
        tables = [pq.read_table(failures_path(self.dir, self.prefix, n), schema=FAILURES_SCHEMA)
                  for n in range(len(self.done))]
        return pa.concat_tables(tables) if tables else FAILURES_SCHEMA.empty_table()
