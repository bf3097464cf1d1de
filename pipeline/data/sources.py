"""Input readers for `python -m pipeline shard`: each input becomes a stream of `SourceRow`s in a fixed order.

Formats: parquet, CSV / TSV and JSONL tables (plain or `.gz`), a folder tree of images with sidecar files, and
WebDataset tars (ours, img2dataset's, anyone's). Folder trees and tars are read the same way: files are grouped
by key the way WebDataset groups tar members (`dir/0001.jpg` + `dir/0001.txt` -> key `dir/0001`); symbolic
links inside either are skipped (a link may point anywhere on the machine).

Readers stay light: they hand over image *paths* (`FileRef`) and let the worker processes read and decode them;
only bytes that live inside the input (a parquet binary column, a tar member) travel with the row. A row that
cannot be read at all (a JSONL line that is not JSON, the rest of a truncated tar) is still a row, with `error`
set, so that every input row is accounted for.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import json
import os
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from braceexpand import braceexpand

from pipeline.data.shard_index import split_member_name

FORMATS = ("parquet", "csv", "tsv", "jsonl", "folder", "tar")
SOURCE_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # the first found is the image
# Other members of a folder group or tar sample are copied through when the last part of their extension is
# one of these (`wav`, `depth.png`, `seg.npy`, ...); anything else (pickles first of all) is dropped.
PASSTHROUGH_EXTS = frozenset({"wav", "flac", "mp3", "ogg", "npy", "png", "jpg", "jpeg", "webp", "txt", "json", "cls"})
IMAGE_COLUMN_GUESSES = ("image", "image_path", "img", "path", "filepath", "file_name", "filename", "jpg", "png", "webp")
CAPTION_COLUMN_GUESSES = ("caption", "text", "txt", "title")
NO_CAPTIONS = "none"  # --caption-col none: the data has no captions (e.g. labels only)
MAX_CSV_RECORD_BYTES = 1 << 20  # a quoted field may span lines up to this (see _csv_records)


class InputError(ValueError):
    """A problem with the inputs or options, found before any work; the message is shown as one line."""


@dataclass(frozen=True)
class FileRef:
    """A local file the worker reads (an image path from a table, an audio file beside an image)."""
    path: str


@dataclass
class SourceRow:
    source: str                                   # where the row came from: "table.csv:17", "a.tar:000123"
    key: str | None = None                        # None: numbered by input row
    image: bytes | FileRef | None = None
    caption: str | bytes | FileRef | None = None  # bytes (and files) are decoded and checked by the worker
    label: object = None                          # -> .cls; None: no label
    audio: bytes | FileRef | None = None          # -> .wav / .flac
    depth: bytes | FileRef | None = None          # -> .depth.png / .depth.npy
    thermal: bytes | FileRef | None = None        # -> .thermal.png / .thermal.jpg / .thermal.npy
    imu: bytes | FileRef | None = None            # -> .imu.npy
    extra: dict = field(default_factory=dict)     # -> .json, with the image size
    passthrough: dict[str, bytes | FileRef] = field(default_factory=dict)  # other members, by extension
    error: tuple[str, str] | None = None          # (reason, detail) when the row itself could not be read


@dataclass
class Columns:
    """Column names as given on the command line; None means "guess" (image, caption) or "absent"."""
    image: str | None = None
    caption: str | None = None
    key: str | None = None
    label: str | None = None
    audio: str | None = None
    depth: str | None = None
    keep: list[str] | None = None  # extra columns copied into .json; None: every column not used otherwise
    thermal: str | None = None
    imu: str | None = None

    def used(self) -> set[str]:
        return {c for c in (self.image, self.caption, self.key, self.label, self.audio, self.depth, self.thermal,
                            self.imu) if c}


@dataclass
class InputSpec:
    path: str
    format: str
    columns: Columns | None = None  # resolved for tables by `check_input`


# ---------------------------------------------------------------------------------------------- discovery

def detect_format(path: str) -> str | None:
    if os.path.isdir(path):
        return "folder"
    name = path.lower().removesuffix(".gz")
    for suffix, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".tsv", "tsv"),
                        (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".tar", "tar"),
                        (".tgz", "tar")):
        if name.endswith(suffix):
            return fmt
    return None


def resolve_inputs(patterns: list[str], fmt: str = "auto") -> list[InputSpec]:
    """Expands braces and globs, in the order given (each glob sorted), and decides each input's format."""
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"--format must be auto or one of {', '.join(FORMATS)}, not {fmt!r}")
    specs: list[InputSpec] = []
    for pattern in patterns:
        for p in braceexpand(pattern):
            matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
            if not matches or not all(os.path.exists(m) for m in matches):
                raise InputError(f"--input: not found: {p}")
            for m in matches:
                if fmt == "auto":
                    f = detect_format(m)
                    if f is None:
                        raise InputError(f"--input: cannot tell the format of {m} from its name; pass --format "
                                         f"({', '.join(FORMATS)})")
                elif (fmt == "folder") != os.path.isdir(m):
                    raise InputError(f"--input: {m} is {'a directory' if os.path.isdir(m) else 'a file'}, "
                                     f"not readable as --format {fmt}")
                else:
                    f = fmt
                specs.append(InputSpec(m, f))
    if not specs:
        raise InputError("--input: no inputs given")
    return specs


def _open_text(path: str):
    # surrogateescape: a caption with bad UTF-8 becomes a failed row (bad_caption), not a failed run
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")


def _table_columns(spec: InputSpec) -> list[str]:
    try:
        if spec.format == "parquet":
            return pq.read_schema(spec.path).names
        if spec.format in ("csv", "tsv"):
            with _open_text(spec.path) as f:
                return next(csv.reader(f, delimiter="," if spec.format == "csv" else "\t"), [])
        with gzip.open(spec.path, "rb") if spec.path.endswith(".gz") else open(spec.path, "rb") as f:
            for line in f:  # JSONL has no schema: the first record's fields stand for all
                if line.strip():
                    record = json.loads(line.decode("utf-8", "surrogateescape"))
                    return list(record) if isinstance(record, dict) else []
            return []
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"--input: cannot read {spec.path} as {spec.format}: {e}") from None


def _pick(given: str | None, guesses: tuple[str, ...], names: list[str], option: str, path: str) -> str:
    if given is not None:
        if given not in names:
            raise InputError(f"{option} {given!r} is not a column of {path} (columns: {', '.join(names) or 'none'})")
        return given
    found = next((g for g in guesses if g in names), None)
    if found is None:
        raise InputError(f"cannot find the {option.removeprefix('--').removesuffix('-col')} column of {path} "
                         f"(columns: {', '.join(names) or 'none'}); pass {option}")
    return found


def check_input(spec: InputSpec, columns: Columns) -> None:
    """Validates a table's column names before any work and stores the resolved ones in `spec.columns`."""
    if spec.format in ("folder", "tar"):
        spec.columns = columns
        return
    names = _table_columns(spec)
    image = _pick(columns.image, IMAGE_COLUMN_GUESSES, names, "--image-col", spec.path)
    caption = (columns.caption if columns.caption == NO_CAPTIONS
               else _pick(columns.caption, CAPTION_COLUMN_GUESSES, names, "--caption-col", spec.path))
    for option, col in (("--key-col", columns.key), ("--label-col", columns.label), ("--audio-col", columns.audio),
                        ("--depth-col", columns.depth), ("--thermal-col", columns.thermal),
                        ("--imu-col", columns.imu)):
        if col is not None:
            _pick(col, (), names, option, spec.path)
    for col in columns.keep or []:
        _pick(col, (), names, "--keep-cols", spec.path)
    spec.columns = dataclasses.replace(columns, image=image, caption=caption)


# ------------------------------------------------------------------------------------------------ tables

def _media(value: object, base_dir: str) -> bytes | FileRef | None | str:
    """A table cell holding an image / audio / depth map: bytes, a local path, or a Hugging Face datasets
    image struct ({"bytes": ..., "path": ...}). A URL is returned as a str, which the caller rejects."""
    if isinstance(value, dict):  # datasets' Image feature stored in parquet
        value = value.get("bytes") or value.get("path")
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    value = str(value).strip()
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value:
        return value
    return FileRef(value if os.path.isabs(value) else os.path.join(base_dir, value))


def _jsonable(value: object) -> object:
    """Table cells as JSON values; bytes are left out by the caller, NaN becomes null, the rest as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, (bytes, bytearray))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _row_from_record(record: dict, cols: Columns, base_dir: str, source: str) -> SourceRow:
    row = SourceRow(source=source)
    image = _media(record.get(cols.image), base_dir)
    if isinstance(image, str):
        row.error = ("unsupported_url", f"{image} (download with img2dataset first; shard reads local files)")
        return row
    row.image = image
    if cols.caption != NO_CAPTIONS:
        row.caption = record.get(cols.caption)
        if row.caption is not None and not isinstance(row.caption, (str, bytes)):
            row.caption = str(row.caption)
    if cols.key:
        key = record.get(cols.key)
        row.key = "" if key is None else str(key)  # "" -> bad_key
    if cols.label:
        row.label = record.get(cols.label, "")
        if row.label is None:
            row.label = ""  # a label column with a hole: bad_label, not "no label"
    for name, attr in ((cols.audio, "audio"), (cols.depth, "depth"), (cols.thermal, "thermal"), (cols.imu, "imu")):
        if name:
            media = _media(record.get(name), base_dir)
            if isinstance(media, str):
                row.error = ("unsupported_url", media)
                return row
            setattr(row, attr, media)
    keep = cols.keep if cols.keep is not None else [c for c in record if c not in cols.used()]
    row.extra = {c: _jsonable(record.get(c)) for c in keep if not isinstance(record.get(c), (bytes, bytearray))}
    return row


def _iter_parquet(spec: InputSpec, base_dir: str) -> Iterator[SourceRow]:
    cols = spec.columns
    n = 0
    try:
        pf = pq.ParquetFile(spec.path)
        wanted = None if cols.keep is None else sorted(cols.used() | set(cols.keep))
        for batch in pf.iter_batches(batch_size=256, columns=wanted):
            for record in batch.to_pylist():
                yield _row_from_record(record, cols, base_dir, f"{spec.path}#{n}")
                n += 1
    except (OSError, ValueError) as e:  # a corrupt file: one failed row stands for the unreadable rest
        yield SourceRow(source=f"{spec.path}#{n}", error=("bad_row", f"unreadable from row {n}: {e}"))


def _csv_records(lines: Iterator[str], delimiter: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """(first line number, fields, "") per CSV record, or (line number, None, why) for a line whose quoting is
    broken. A quoted field may span lines (RFC 4180), but only within MAX_CSV_RECORD_BYTES and only if its
    closing quote is followed by a delimiter or the line's end (csv's strict mode); otherwise the record's
    first line is a bad row and reading goes on at the next line. So one stray quote costs its own row, not
    every row after it (a lenient reader takes everything up to the next quote into one caption)."""
    numbered = enumerate(lines, 1)
    pushed_back: deque[tuple[int, str]] = deque()

    def next_line() -> tuple[int, str] | None:
        return pushed_back.popleft() if pushed_back else next(numbered, None)

    while (first := next_line()) is not None:
        taken = [first]

        def feed() -> Iterator[str]:  # the reader pulls lines only while its record is open
            yield first[1]
            size = len(first[1])
            while size <= MAX_CSV_RECORD_BYTES and (line := next_line()) is not None:
                taken.append(line)
                size += len(line[1])
                yield line[1]

        try:
            fields = next(csv.reader(feed(), delimiter=delimiter, strict=True))
        except csv.Error as e:
            pushed_back.extendleft(reversed(taken[1:]))
            why = ("a quoted field opened on this line does not close within "
                   f"{MAX_CSV_RECORD_BYTES >> 20} MiB or before the end of the file"
                   if "unexpected end of data" in str(e) else f"a quoted field does not close properly ({e})")
            yield first[0], None, f"{why}; the line is skipped, reading goes on at the next"
            continue
        yield first[0], fields, ""


def _iter_csv(spec: InputSpec, base_dir: str) -> Iterator[SourceRow]:
    csv.field_size_limit(64 << 20)  # long captions are fine; the default 128 KiB limit is not a bad row
    with _open_text(spec.path) as f:
        header: list[str] | None = None
        for lineno, fields, why in _csv_records(f, "," if spec.format == "csv" else "\t"):
            source = f"{spec.path}:{lineno}"
            if fields is None:
                yield SourceRow(source=source, error=("bad_row", why))
            elif not fields:
                continue  # a blank line
            elif header is None:
                header = fields
            else:  # missing cells are None, cells beyond the header are dropped (csv.DictReader's rules)
                record = dict(zip(header, fields + [None] * (len(header) - len(fields))))
                yield _row_from_record(record, spec.columns, base_dir, source)


def _iter_jsonl(spec: InputSpec, base_dir: str) -> Iterator[SourceRow]:
    with gzip.open(spec.path, "rb") if spec.path.endswith(".gz") else open(spec.path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            source = f"{spec.path}:{lineno}"
            try:
                record = json.loads(line.decode("utf-8", "surrogateescape"))
            except ValueError as e:
                yield SourceRow(source=source, error=("bad_row", f"not JSON: {e}"))
                continue
            if not isinstance(record, dict):
                yield SourceRow(source=source, error=("bad_row", "not a JSON object"))
                continue
            yield _row_from_record(record, spec.columns, base_dir, source)


# ------------------------------------------------------------------------------------ folder trees and tars

def _row_from_group(key: str, members: dict[str, bytes | FileRef], cols: Columns, source: str) -> SourceRow | None:
    """One WebDataset-style group (members by extension) -> a row; None for groups with neither an image nor
    a caption (img2dataset's `00000_stats.json`, a stray README)."""
    image_ext = next((e for e in SOURCE_IMAGE_EXTS if e in members), None)
    if image_ext is None and "txt" not in members:
        return None
    row = SourceRow(source=source, key=key)
    row.image = members.pop(image_ext) if image_ext else None
    row.caption = members.pop("txt", None)
    if "cls" in members:
        label = members.pop("cls")
        row.label = _read_small(label).decode("utf-8", "replace") if isinstance(label, FileRef) else label.decode("utf-8", "replace")
    if "json" in members:
        raw = members.pop("json")
        try:
            meta = json.loads(_read_small(raw) if isinstance(raw, FileRef) else raw)
        except (OSError, ValueError) as e:
            row.error = ("bad_metadata", f"{key}.json: {e}")
            return row
        row.extra = meta if isinstance(meta, dict) else {"metadata": meta}
        if row.caption is None and cols.caption != NO_CAPTIONS:  # a caption inside the sidecar JSON
            name = cols.caption or next((g for g in CAPTION_COLUMN_GUESSES if g in row.extra), None)
            if name is not None and isinstance(row.extra.get(name), str):
                row.caption = row.extra[name]
    if cols.caption == NO_CAPTIONS:
        row.caption = None
    row.passthrough = {e: v for e, v in members.items() if e.rsplit(".", 1)[-1] in PASSTHROUGH_EXTS}
    return row


def _read_small(ref: FileRef) -> bytes:
    with open(ref.path, "rb") as f:
        return f.read()


def _iter_folder(spec: InputSpec, exclude: str | None) -> Iterator[SourceRow]:
    root = spec.path
    for dirpath, dirnames, filenames in os.walk(root):
        # sorted, and the shard output itself left out if it lives inside the tree
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or os.path.realpath(os.path.join(dirpath, d)) != exclude))
        groups: dict[str, dict[str, FileRef]] = {}
        for name in sorted(filenames):
            parts = split_member_name(name)
            if parts is None or name.startswith(".") or os.path.islink(os.path.join(dirpath, name)):
                continue  # links are skipped, as in tar inputs: `leak.txt -> /etc/...` must not become a caption
            stem, ext = parts
            groups.setdefault(stem, {})[ext.lower()] = FileRef(os.path.join(dirpath, name))
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for stem in sorted(groups):
            key = stem if rel == "." else f"{rel}/{stem}"
            try:
                row = _row_from_group(key, groups[stem], spec.columns, os.path.join(dirpath, stem))
            except OSError as e:  # a sidecar vanished or is unreadable
                row = SourceRow(source=os.path.join(dirpath, stem), key=key, error=("missing_file", str(e)))
            if row is not None:
                yield row


def _iter_tar(spec: InputSpec) -> Iterator[SourceRow]:
    key, members = None, {}
    last = ""
    try:
        with tarfile.open(spec.path, "r|*") as tf:  # streaming: works on gzip too, never seeks
            for m in tf:
                if not m.isfile():
                    continue
                parts = split_member_name(m.name)
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        row = _row_from_group(key, members, spec.columns, f"{spec.path}:{key}")
                        if row is not None:
                            yield row
                    key, members = parts[0], {}
                last = m.name
                members[parts[1].lower()] = tf.extractfile(m).read()
        if key is not None:
            row = _row_from_group(key, members, spec.columns, f"{spec.path}:{key}")
            if row is not None:
                yield row
    except (tarfile.TarError, OSError, EOFError) as e:
        # a truncated or corrupt tar: the sample being read (if any) counts as one failed row, the rest is lost
        yield SourceRow(source=f"{spec.path}:{key or ''}", key=key,
                        error=("bad_row", f"unreadable tar after member {last or '(none)'}: {e}"))


def iter_rows(specs: list[InputSpec], image_root: str | None = None, exclude: str | None = None) -> Iterator[SourceRow]:
    """Every row of every input, in input order. `image_root` resolves relative image paths of tables (default:
    the table's own directory); `exclude` is a directory that folder walks skip (the shard output)."""
    exclude = os.path.realpath(exclude) if exclude else None
    for spec in specs:
        base_dir = image_root or os.path.dirname(os.path.abspath(spec.path))
        if spec.format == "parquet":
            rows = _iter_parquet(spec, base_dir)
        elif spec.format in ("csv", "tsv"):
            rows = _iter_csv(spec, base_dir)
        elif spec.format == "jsonl":
            rows = _iter_jsonl(spec, base_dir)
        elif spec.format == "folder":
            rows = _iter_folder(spec, exclude)
        else:
            rows = _iter_tar(spec)
        last = spec.path
        try:
            for row in rows:
                last = row.source
                yield row
        except (OSError, EOFError, zlib.error) as e:  # a truncated .gz, a file gone mid-read
            yield SourceRow(source=f"{spec.path}", error=("bad_row", f"unreadable after {last}: {e}"))


def parquet_rows(specs: list[InputSpec]) -> int | None:
    """The total row count when every input is parquet (from the footers); None otherwise (for the progress bar)."""
    if not specs or any(s.format != "parquet" for s in specs):
        return None
    return sum(pq.ParquetFile(s.path).metadata.num_rows for s in specs)


def input_fingerprint(specs: list[InputSpec]) -> list[dict]:
    """What the inputs were, to refuse resuming a run whose inputs changed under it."""
    out = []
    for s in specs:
        st = os.stat(s.path)
        entry = {"path": str(Path(s.path).resolve()), "format": s.format}
        if not os.path.isdir(s.path):
            entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        out.append(entry)
    return out
