"""`python -m pipeline shard`: raw collections -> indexed WebDataset shards, in parallel, resumably, with an exact
account of every input row.

How a run goes:

1. Plan (main process, in input order): every input row gets a row id (its position across all inputs) and a
   key (its own, sanitised, or the row id). The first row with a key wins; later ones fail as duplicate_key,
   whatever became of the first. With --val-fraction a row goes to train or val by a hash of its key.
2. Process (N worker processes): read, check and transform each row into the members of one sample, or a
   failure with its reason. Rows travel in chunks; results come back in input order.
3. Write (main process, in row order): each split has one writer that appends samples to the open shard and
   closes it once it holds `samples_per_shard` samples (or would pass the byte cap) and the next sample
   arrives. Failed rows are recorded in the shard that is open when they come, so every input row belongs
   to exactly one shard's stats, and shard contents are a pure function of (inputs, settings): the same
   command gives the same shards for any number of workers.

A shard is written as `.tar.tmp`; closing it writes its parquet index, its failures and its stats JSON (which
holds `row_end`, the row id the next shard starts at), then renames the tar: the rename is the commit. A rerun
of the same command keeps the complete shards, deletes anything after them, and continues each split from its
last `row_end`; keys are planned again from row 0 so duplicates are judged as before, and with --dedup-image
the image hashes of the kept shards are read back from their indexes.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import tarfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.data.image_processing import ImageFailure, ImageSettings, describe_error, process_image
from pipeline.data.manifest import ShardEntry, write_manifest
from pipeline.data.shard_index import INDEX_SCHEMA, index_path, scan_tar, with_tar_metadata, write_index
from pipeline.data.shard_writer import shard_name, shard_pattern
from pipeline.data.sources import (Columns, FileRef, InputError, InputSpec, SourceRow, check_input, input_fingerprint,
                                   iter_rows, parquet_rows, resolve_inputs)

JOB_FILE = "shard_job.json"
FAILURES_SCHEMA = pa.schema([("row", pa.int64()), ("source", pa.string()), ("key", pa.string()),
                             ("reason", pa.string()), ("detail", pa.string())])
# The loader's index columns (key, members) come first, unchanged; ours follow.
SHARD_INDEX_SCHEMA = pa.schema(list(INDEX_SCHEMA) + [("width", pa.int32()), ("height", pa.int32()),
                                                     ("sha256", pa.string())])
CHUNK_ROWS = 16               # rows per task sent to a worker
CHUNK_BYTES = 8 << 20         # ... or fewer, when rows carry image bytes
TAR_END = 1024                # the two zero blocks that end a tar


@dataclass
class ShardOptions:
    inputs: list[str]
    output: str
    input_format: str = "auto"
    columns: Columns = field(default_factory=Columns)
    image_root: str | None = None
    samples_per_shard: int = 10_000
    max_shard_bytes: int | None = None
    prefix: str | None = None
    workers: int = 1
    image: ImageSettings = field(default_factory=ImageSettings)
    max_caption_bytes: int = 16384  # longer captions fail as caption_too_long (the loader's default limit too)
    dedup_image: bool = False
    val_fraction: float = 0.0
    max_failure_rate: float = 0.5
    overwrite: bool = False
    progress: bool = False

    def validate(self) -> None:
        if self.samples_per_shard <= 0:
            raise InputError(f"--samples-per-shard must be > 0, not {self.samples_per_shard}")
        if self.max_shard_bytes is not None and self.max_shard_bytes <= TAR_END:
            raise InputError(f"--max-shard-bytes must be > {TAR_END}, not {self.max_shard_bytes}")
        if self.max_caption_bytes <= 0:
            raise InputError(f"--max-caption-bytes must be > 0, not {self.max_caption_bytes}")
        if self.workers < 0:
            raise InputError(f"--workers must be >= 0, not {self.workers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise InputError(f"--max-failure-rate must be in [0, 1], not {self.max_failure_rate}")
        if self.prefix is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise InputError(f"--prefix must be letters, digits, '_' or '-', not {self.prefix!r}")

    def splits(self) -> list[str]:
        """"" is the single split written straight into the output directory."""
        return ["train", "val"] if self.val_fraction > 0 else [""]

    def split_prefix(self, split: str) -> str:
        if not split:
            return self.prefix or "shard"
        return f"{self.prefix}-{split}" if self.prefix else split

    def job_settings(self) -> dict:
        """Everything that shapes the output (not workers, progress or the failure threshold)."""
        return {"columns": asdict(self.columns), "image_root": self.image_root, "input_format": self.input_format,
                "samples_per_shard": self.samples_per_shard, "max_shard_bytes": self.max_shard_bytes,
                "prefix": self.prefix, "image": asdict(self.image), "max_caption_bytes": self.max_caption_bytes,
                "dedup_image": self.dedup_image,
                "val_fraction": self.val_fraction}


def parse_size(text: str, option: str = "--max-shard-bytes") -> int:
    """'512MB', '1.5GiB', '1e9', '200k' -> bytes (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise InputError(f"{option}: not a size: {text!r} (e.g. 1GB, 500MB, 1e9)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


# ------------------------------------------------------------------------------------- rows -> samples

@dataclass
class Sample:
    members: dict[str, bytes]
    width: int
    height: int
    sha256: str  # of the stored image bytes


@dataclass
class Failure:
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class SampleSettings:
    image: ImageSettings
    captions: bool = True  # False: --caption-col none
    max_caption_bytes: int = 16384


def sanitize_key(raw: str) -> str | None:
    """A key WebDataset groups correctly: no '.' in its last path part (it would split the extension), no
    empty / '.' / '..' parts, valid UTF-8, no control characters (a NUL cannot be in a tar member name). None
    when nothing usable is left."""
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        return None
    parts = [p.strip() for p in raw.replace("\\", "/").split("/")]
    parts = [p for p in parts if p not in ("", ".", "..")]
    if not parts:
        return None
    parts[-1] = parts[-1].replace(".", "_")
    key = "/".join(parts)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return key


def _read(value: bytes | FileRef) -> bytes:
    if isinstance(value, FileRef):
        with open(value.path, "rb") as f:
            return f.read()
    return value


def _npy_ok(data: bytes) -> bool:
    """A .npy whose header parses and whose dtype needs no pickle (we never unpickle, and neither may readers)."""
    try:
        np.load(io.BytesIO(data), allow_pickle=False)  # object arrays raise instead of unpickling
        return True
    except Exception:
        return False


def _media_member(data: bytes, kind: str) -> tuple[str, bytes] | Failure:
    if kind == "audio":
        if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            return "wav", data
        if data[:4] == b"fLaC":
            return "flac", data
        return Failure("bad_audio", "not WAV or FLAC")
    if kind == "imu":
        if data[:6] == b"\x93NUMPY" and _npy_ok(data):
            return "imu.npy", data
        return Failure("bad_imu", "not a plain .npy array")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return f"{kind}.png", data
    if data[:6] == b"\x93NUMPY" and _npy_ok(data):
        return f"{kind}.npy", data
    if kind == "thermal" and data[:3] == b"\xff\xd8\xff":
        return "thermal.jpg", data
    return Failure(f"bad_{kind}", "not PNG or a plain .npy array" + (" or JPEG" if kind == "thermal" else ""))


def _read_caption_file(ref: FileRef, max_bytes: int) -> bytes:
    with open(ref.path, "rb") as f:
        return f.read(max_bytes + 1)  # one byte past the limit is enough to refuse it


def _caption(value: str | bytes | None, max_bytes: int = 16384) -> str | Failure:
    if value is None:
        return Failure("missing_caption")
    size = len(value) if isinstance(value, bytes) else len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return Failure("caption_too_long", f"over {max_bytes} bytes (--max-caption-bytes)")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return Failure("bad_caption", f"not UTF-8: {e}")
    else:
        try:
            value.encode("utf-8")  # text read with surrogateescape keeps invalid bytes as lone surrogates
        except UnicodeEncodeError as e:
            return Failure("bad_caption", f"not UTF-8: {e}")
    value = value.strip()
    return value if value else Failure("empty_caption")


def _label(value: object) -> int | Failure:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return Failure("bad_label", f"not an integer: {str(value)[:50]!r}")


def build_sample(key: str, row: SourceRow, s: SampleSettings) -> Sample | Failure:
    """The members of one sample, or why the row cannot be one. Cheap checks first."""
    if row.error:
        return Failure(*row.error)
    members: dict[str, bytes] = {}
    if s.captions:
        try:
            caption = _caption(_read_caption_file(row.caption, s.max_caption_bytes)
                               if isinstance(row.caption, FileRef) else row.caption, s.max_caption_bytes)
        except OSError as e:
            return Failure("missing_file", f"{row.caption.path}: {e.strerror or e}")
        if isinstance(caption, Failure):
            return caption
        members["txt"] = caption.encode("utf-8")
    if row.label is not None:
        label = _label(row.label)
        if isinstance(label, Failure):
            return label
        members["cls"] = str(label).encode()
    if row.image is None:
        return Failure("missing_image")
    try:
        data = _read(row.image)
    except OSError as e:
        return Failure("missing_file", f"{row.image.path}: {e.strerror or e}")
    try:
        image = process_image(data, s.image)
    except ImageFailure as e:
        return Failure(e.reason, e.detail)
    members[image.ext] = image.data
    for kind in ("audio", "depth", "thermal", "imu"):
        value = getattr(row, kind)
        if value is None:
            continue
        try:
            got = _media_member(_read(value), kind)
        except OSError as e:
            return Failure("missing_file", f"{kind}: {value.path}: {e.strerror or e}")
        if isinstance(got, Failure):
            return got
        members[got[0]] = got[1]
    for ext, value in sorted(row.passthrough.items()):
        if ext in members:
            continue  # e.g. a second image of the same format as the stored one
        try:
            data = _read(value)
        except OSError as e:
            return Failure("missing_file", f"{ext}: {value.path}: {e.strerror or e}")
        if ext.endswith("npy") and not _npy_ok(data):
            return Failure("bad_member", f".{ext} is not a plain .npy array")
        members[ext] = data
    meta = dict(row.extra)
    meta.update(key=key, width=image.width, height=image.height,
                original_width=image.original_width, original_height=image.original_height)
    # backslashreplace: a metadata cell with bytes that are not UTF-8 becomes a \udcXX escape, still valid JSON
    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8",
                                                                                               "backslashreplace")
    return Sample(members, image.width, image.height, hashlib.sha256(image.data).hexdigest())


_WORKER_SETTINGS: SampleSettings | None = None


def _exit_with_parent(parent: int) -> None:
    """A worker whose main process was killed (kill -9 leaves no time to stop it) would wait for work forever:
    every worker holds the task queue's write end too, so it never sees end-of-file. Watch the parent instead."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _init_worker(settings: SampleSettings, parent: int) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _process_items(items: list, settings: SampleSettings) -> list[Sample | Failure]:
    out = []
    for item in items:
        if isinstance(item, Failure):  # decided while planning (duplicate key, unreadable row)
            out.append(item)
            continue
        key, row = item
        try:
            out.append(build_sample(key, row, settings))
        except Exception as e:  # bad input never stops the run; the reason says it was unexpected
            out.append(Failure("processing_error", describe_error(e)))
    return out


def _process_chunk(items: list) -> list[Sample | Failure]:
    return _process_items(items, _WORKER_SETTINGS)


# ---------------------------------------------------------------------------------------------- writing

def _tar_size(members: dict[str, bytes]) -> int:
    """Bytes the members add to a tar (a header block each, data padded to blocks; long names aside)."""
    return sum(512 + math.ceil(len(d) / 512) * 512 for d in members.values())


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _printable(text: str) -> str:
    """Text read with surrogateescape (a key or path with bytes that are not UTF-8) as valid UTF-8 for parquet."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stats_path(tar: Path) -> Path:
    return tar.with_name(tar.name.removesuffix(".tar") + ".stats.json")


class ShardFile:
    """One shard being written to `<name>.tar.tmp`, with the rows accounted to it."""

    def __init__(self, directory: Path, prefix: str, number: int, row_begin: int):
        self.final = directory / shard_name(prefix, number)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.failures_file = directory / "failures" / f"{prefix}-{number:06d}.parquet"
        self.row_begin = row_begin
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []
        self.sizes: list[tuple[int, int, str]] = []
        self.failures: list[dict] = []
        self.counts: Counter = Counter()
        self.member_bytes = 0

    def would_overflow(self, sample: Sample, samples_per_shard: int, max_bytes: int | None) -> bool:
        if len(self.keys) >= samples_per_shard:
            return True
        if max_bytes is None or not self.keys:
            return False  # a sample larger than the cap still gets a shard of its own
        end = self.tar.offset + _tar_size(sample.members) + TAR_END
        return math.ceil(end / tarfile.RECORDSIZE) * tarfile.RECORDSIZE > max_bytes  # tar pads to whole records

    def add(self, key: str, sample: Sample) -> None:
        for ext, data in sorted(sample.members.items()):
            info = tarfile.TarInfo(f"{key}.{ext}")  # normalised headers: byte-identical reruns
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            self.tar.addfile(info, io.BytesIO(data))
            self.member_bytes += len(data)
        self.keys.append(key)
        self.sizes.append((sample.width, sample.height, sample.sha256))

    def fail(self, row: int, source: str, key: str, failure: Failure) -> None:
        self.failures.append({"row": row, "source": _printable(source), "key": _printable(key),
                              "reason": failure.reason, "detail": _printable(failure.detail[:500])})
        self.counts[failure.reason] += 1

    def finish(self, row_end: int) -> dict:
        """Index, failures and stats first, the tar's rename last: a shard with a final name is complete."""
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        index = scan_tar(self.tmp)
        if index.column("key").to_pylist() != self.keys:
            raise RuntimeError(f"{self.tmp}: index keys differ from the keys written")  # a bug, not bad data
        w, h, sha = zip(*self.sizes) if self.sizes else ((), (), ())
        index = with_tar_metadata(pa.table({"key": index.column("key"), "members": index.column("members"),
                                            "width": pa.array(w, pa.int32()), "height": pa.array(h, pa.int32()),
                                            "sha256": pa.array(sha, pa.string())}, schema=SHARD_INDEX_SCHEMA), index)
        write_index(index, index_path(self.final))
        self.failures_file.parent.mkdir(exist_ok=True)
        _write_parquet(pa.Table.from_pylist(self.failures, schema=FAILURES_SCHEMA), self.failures_file)
        stats = {"shard": self.final.name, "row_begin": self.row_begin, "row_end": row_end,
                 "rows": len(self.keys) + len(self.failures), "samples": len(self.keys),
                 "failed": len(self.failures), "failures": dict(sorted(self.counts.items())),
                 "member_bytes": self.member_bytes, "tar_bytes": self.tmp.stat().st_size}
        _write_json(stats_path(self.final), stats)
        os.replace(self.tmp, self.final)
        return stats

    def abandon(self) -> None:
        """Removes what this shard left (also after a failed write: closing the tar may fail again, e.g. on a
        full disk)."""
        try:
            self.tar.close()
        except OSError:
            pass
        finally:
            for p in (self.tmp, index_path(self.final), stats_path(self.final), self.failures_file):
                p.with_name(p.name + ".tmp").unlink(missing_ok=True)
            self.tmp.unlink(missing_ok=True)


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
        failures = self.dir / "failures" / f"{self.prefix}-{number:06d}.parquet"
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
        tables = [pq.read_table(self.dir / "failures" / f"{self.prefix}-{n:06d}.parquet", schema=FAILURES_SCHEMA)
                  for n in range(len(self.done))]
        return pa.concat_tables(tables) if tables else FAILURES_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------------- the job

def _split_of(key: str, val_fraction: float) -> str:
    """train / val by a hash of the key that no Python version or seed changes."""
    if val_fraction <= 0:
        return ""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return "val" if h < val_fraction * 2 ** 64 else "train"


def _prepare_output(opts: ShardOptions, specs: list[InputSpec]) -> Path:
    """Creates the output directory, or checks that the one there holds this same job (then it resumes)."""
    out = Path(opts.output)
    job = {"inputs": input_fingerprint(specs), "settings": opts.job_settings()}
    job = json.loads(json.dumps(job))  # as it reads back from disk (tuples -> lists)
    resolved = out.resolve()
    for s in specs:
        if Path(s.path).resolve() == resolved or resolved in Path(s.path).resolve().parents:
            raise InputError(f"--output {out} contains the input {s.path}; choose another directory")
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        old_path = out / JOB_FILE
        if not old_path.is_file():
            raise InputError(f"--output {out} is not empty and was not written by `shard`; choose a new directory")
        old = json.loads(old_path.read_text())
        if opts.overwrite:
            shutil.rmtree(out)
        elif old != job:
            differs = [f"settings.{k}" for k in job["settings"] if old.get("settings", {}).get(k) != job["settings"][k]]
            if old.get("inputs") != job["inputs"]:
                differs.append("inputs (paths, sizes or modification times)")
            raise InputError(f"--output {out} holds shards of a different shard command (differs in: "
                             f"{', '.join(differs) or 'version'}); rerun the same command to resume, "
                             f"or pass --overwrite to start again")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / JOB_FILE, job)
    return out


def _plan(specs: list[InputSpec], opts: ShardOptions, resume: dict[str, int],
          counter: list[int]) -> Iterator[tuple[list[tuple[int, str, str, str]], list]]:
    """Chunks of (metadata, items) in row order: metadata (row, source, key, split) stays here, items go to a
    worker. Rows that a previous run already put into complete shards are planned (for their keys) but skipped."""
    seen_keys: set[str] = set()
    meta: list[tuple[int, str, str, str]] = []
    items: list = []
    nbytes = 0
    row_id = -1
    for row_id, row in enumerate(iter_rows(specs, opts.image_root, exclude=opts.output)):
        key = f"{row_id:09d}" if row.key is None else sanitize_key(row.key)
        item: object
        if row.error:
            item = Failure(*row.error)
        elif key is None:
            item = Failure("bad_key", f"unusable key {row.key!r}")
        elif key in seen_keys:
            item = Failure("duplicate_key", f"key {key!r} seen in an earlier row")
        else:
            item = (key, row)
        if key is not None:
            seen_keys.add(key)  # the first row with a key wins, whatever becomes of it
        split = _split_of(key or "", opts.val_fraction)
        if row_id < resume[split]:
            continue
        meta.append((row_id, row.source, key if key is not None else str(row.key), split))
        items.append(item)
        if isinstance(item, tuple) and isinstance(row.image, bytes):
            nbytes += len(row.image)
        if len(items) >= CHUNK_ROWS or nbytes >= CHUNK_BYTES:
            yield meta, items
            meta, items, nbytes = [], [], 0
    if items:
        yield meta, items
    counter[0] = row_id + 1


def _results(chunks: Iterator, settings: SampleSettings, workers: int) -> Iterator[tuple[list, list]]:
    """(metadata, outcomes) per chunk, in input order, with at most a few chunks per worker in flight."""
    if workers == 0:
        for meta, items in chunks:
            yield meta, _process_items(items, settings)
        return
    # spawn: workers import only what they need (no torch), and no lock held by a thread here is inherited
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(settings, os.getpid()))
    pending: deque = deque()
    try:
        for meta, items in chunks:
            pending.append((meta, pool.submit(_process_chunk, items)))
            if len(pending) >= 4 * workers:
                meta0, fut = pending.popleft()
                yield meta0, fut.result()
        while pending:
            meta0, fut = pending.popleft()
            yield meta0, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_shard(opts: ShardOptions) -> dict:
    """Runs (or resumes) the sharding job; returns the summary also written to `output/summary.json`."""
    opts.validate()
    specs = resolve_inputs(opts.inputs, opts.input_format)
    for spec in specs:
        check_input(spec, opts.columns)
    out = _prepare_output(opts, specs)
    seen_images: dict[str, str] | None = {} if opts.dedup_image else None
    writers = {split: SplitWriter(out / split if split else out, opts.split_prefix(split), opts.samples_per_shard,
                                  opts.max_shard_bytes, seen_images) for split in opts.splits()}
    resume = {split: w.resume_row for split, w in writers.items()}
    settings = SampleSettings(opts.image, captions=opts.columns.caption != "none",
                              max_caption_bytes=opts.max_caption_bytes)

    started = time.monotonic()
    total_rows = [0]
    processed, failed = 0, 0
    bar = tqdm(total=parquet_rows(specs), unit=" samples", disable=not opts.progress, dynamic_ncols=True,
               desc="shard", smoothing=0.05)
    try:
        for meta, outcomes in _results(_plan(specs, opts, resume, total_rows), settings, opts.workers):
            for (row, source, key, split), outcome in zip(meta, outcomes):
                writers[split].add(row, source, key, outcome)
                failed += isinstance(outcome, Failure)
            processed += len(meta)
            bar.update(len(meta))
            bar.set_postfix(failed=failed, refresh=False)
        for w in writers.values():
            w.finish(total_rows[0])
    except BaseException:
        for w in writers.values():
            w.abandon()
        raise
    finally:
        bar.close()
    elapsed = time.monotonic() - started
    return _finalize(out, opts, writers, total_rows[0], processed, elapsed)


def _finalize(out: Path, opts: ShardOptions, writers: dict[str, SplitWriter], total_rows: int, processed: int,
              elapsed: float) -> dict:
    splits = {split: w.summary() for split, w in writers.items()}
    accounted = sum(s["rows"] for s in splits.values())
    if accounted != total_rows:  # every input row is in exactly one shard's stats; anything else is a bug
        raise RuntimeError(f"shard stats account for {accounted} rows, the inputs have {total_rows}")
    failures = Counter()
    for s in splits.values():
        failures.update(s["failures"])
    failed = sum(s["failed"] for s in splits.values())
    summary = {
        "output": str(out), "rows": total_rows, "samples": sum(s["samples"] for s in splits.values()),
        "failed": failed, "failure_rate": failed / total_rows if total_rows else 0.0,
        "failures": dict(sorted(failures.items())),
        "shards": sum(s["shards"] for s in splits.values()),
        "bytes_on_disk": sum(s["bytes_on_disk"] for s in splits.values()),
        "index_bytes": sum(s["index_bytes"] for s in splits.values()),
        "member_bytes": sum(s["member_bytes"] for s in splits.values()),
        "this_run": {"rows_processed": processed, "seconds": round(elapsed, 3),
                     "rows_per_s": round(processed / elapsed, 1) if elapsed > 0 else 0.0},
        "settings": opts.job_settings(),
    }
    tables = []
    if "" in splits:
        summary["pattern"] = splits[""]["pattern"]
        tables.append(writers[""].failures_table())
    else:
        summary["splits"] = splits
        summary["patterns"] = {split: s["pattern"] for split, s in splits.items()}
        for split, w in writers.items():
            _write_json(w.dir / "summary.json", dict(splits[split], output=str(w.dir)))
            t = w.failures_table()
            tables.append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
    for w in writers.values():  # the loader plans an epoch from this one file, not from every shard's index
        write_manifest(w.dir, {s["shard"]: ShardEntry(s["samples"], s["tar_bytes"]) for s in w.done})
    table = pa.concat_tables(tables)
    _write_parquet(table.sort_by("row") if table.num_rows else table, out / "failures.parquet")
    _write_json(out / "summary.json", summary)
    return summary


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def format_summary(summary: dict) -> str:
    """The table printed at the end of a run."""
    splits = summary.get("splits") or {"all": summary}
    rows = [("split", "shards", "rows", "samples", "failed", "size on disk")]
    for name, s in splits.items():
        rows.append((name, str(s["shards"]), str(s["rows"]), str(s["samples"]), str(s["failed"]),
                     _size(s["bytes_on_disk"])))
    if "splits" in summary:
        rows.append(("total", str(summary["shards"]), str(summary["rows"]), str(summary["samples"]),
                     str(summary["failed"]), _size(summary["bytes_on_disk"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if summary["failures"]:
        lines.append("failures by reason:")
        lines += [f"  {reason:<20} {n:>10}" for reason, n in sorted(summary["failures"].items(), key=lambda kv: -kv[1])]
    run = summary["this_run"]
    lines.append(f"this run: {run['rows_processed']} rows in {run['seconds']:.1f} s ({run['rows_per_s']:.1f} rows/s)")
    patterns = summary.get("patterns") or {"": summary.get("pattern", "")}
    for split, pattern in patterns.items():
        lines.append(f"shards{' (' + split + ')' if split else ''}: {pattern or '(none)'}")
    return "\n".join(lines)
