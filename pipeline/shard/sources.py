"""Input discovery for `python -m pipeline shard`: which inputs there are, what format each is, whether a table
has the columns asked for, and every row of every input in a fixed order.

Formats: parquet, CSV / TSV and JSONL tables (plain or `.gz`; `tables.py`), a folder tree of images with
sidecar files, and WebDataset tars (ours, img2dataset's, anyone's; `groups.py`). Rows are `SourceRow`s
(`rows.py`).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from braceexpand import braceexpand

from pipeline.shard.groups import iter_folder, iter_tar
from pipeline.shard.rows import CAPTION_COLUMN_GUESSES, NO_CAPTIONS, Columns, InputError, InputSpec, SourceRow
from pipeline.shard.tables import iter_csv, iter_jsonl, iter_parquet, open_text

FORMATS = ("parquet", "csv", "tsv", "jsonl", "folder", "tar")
IMAGE_COLUMN_GUESSES = ("image", "image_path", "img", "path", "filepath", "file_name", "filename", "jpg", "png", "webp")


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

def _table_columns(spec: InputSpec) -> list[str]:
    try:
        if spec.format == "parquet":
            return pq.read_schema(spec.path).names
        if spec.format in ("csv", "tsv"):
            with open_text(spec.path) as f:
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


def iter_rows(specs: list[InputSpec], image_root: str | None = None, exclude: str | None = None) -> Iterator[SourceRow]:
    """Every row of every input, in input order. `image_root` resolves relative image paths of tables (default:
    the table's own directory); `exclude` is a directory that folder walks skip (the shard output)."""
    exclude = os.path.realpath(exclude) if exclude else None
    for spec in specs:
        base_dir = image_root or os.path.dirname(os.path.abspath(spec.path))
        if spec.format == "parquet":
            rows = iter_parquet(spec, base_dir)
        elif spec.format in ("csv", "tsv"):
            rows = iter_csv(spec, base_dir)
        elif spec.format == "jsonl":
            rows = iter_jsonl(spec, base_dir)
        elif spec.format == "folder":
            rows = iter_folder(spec, exclude)
        else:
            rows = iter_tar(spec)
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
