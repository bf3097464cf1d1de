"""Table inputs of `python -m pipeline shard`: parquet, CSV / TSV and JSONL (plain or `.gz`), one row per record.

Image (and audio, depth, ...) cells are bytes, a Hugging Face datasets image struct, or a path relative to the
table (or to --image-root); a URL fails its row, since `shard` reads local files only.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
from collections import deque
from typing import Iterator

import pyarrow.parquet as pq

from pipeline.shard.rows import NO_CAPTIONS, Columns, FileRef, InputSpec, SourceRow

MAX_CSV_RECORD_BYTES = 1 << 20  # a quoted field may span lines up to this (see _csv_records)


def open_text(path: str):
    # surrogateescape: a caption with bad UTF-8 becomes a failed row (bad_caption), not a failed run
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")


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


def iter_parquet(spec: InputSpec, base_dir: str) -> Iterator[SourceRow]:
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


def iter_csv(spec: InputSpec, base_dir: str) -> Iterator[SourceRow]:
    csv.field_size_limit(64 << 20)  # long captions are fine; the default 128 KiB limit is not a bad row
    with open_text(spec.path) as f:
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


def iter_jsonl(spec: InputSpec, base_dir: str) -> Iterator[SourceRow]:
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
