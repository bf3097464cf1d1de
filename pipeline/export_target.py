"""Where an export goes: a new or empty directory, or a previous export of ours, which is replaced whole.

An export is built in a fresh hidden sibling (`.<name>.<random>.partial`, never an existing path) and renamed
onto `out` when complete, so a crash leaves the previous state. The finished directory holds a marker file
listing what the export wrote; only a directory whose contents are exactly that list is ever replaced (and
then removed only after the new export is in place). Anything else at `out` - a file, a link, a run directory,
someone's data, an export with files added since - is refused, whatever it holds.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

MARKER = ".pipeline-export"


class ExportTargetError(UserError, ValueError):
    """`out` is not somewhere an export may be written; the message is one line for the user."""


def _is_our_export(out: Path) -> bool:
    try:
        entries = json.loads((out / MARKER).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(entries, list) and set(os.listdir(out)) - {MARKER} == set(entries)


def check_export_target(out: str | Path, source: str | Path | None = None) -> None:
    """Raises ExportTargetError unless `out` is absent, an empty directory or a complete export of ours (and,
    given the `source` checkpoint, not a directory that holds it)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportTargetError(f"{out} exists and is not a directory; the export needs a new or empty directory")
    if source is not None and out.exists():
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise ExportTargetError(f"{out} holds the checkpoint being exported ({source}); choose another directory")
    if out.is_dir() and any(out.iterdir()) and not _is_our_export(out):
        raise ExportTargetError(f"{out} is not empty and is not an export this tool wrote (no {MARKER} listing "
                                f"its contents); nothing was replaced: choose a new or empty directory")


@contextmanager
def export_directory(out_dir: str | Path, kind: str):
    """Yields an empty temporary directory to write the export into; on success it becomes `out_dir` (checked
    before and again at the end), on failure it is removed and `out_dir` is untouched."""
    out = Path(out_dir)
    check_export_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.partial"
    tmp.mkdir()
    try:
        yield tmp
        entries = sorted(os.listdir(tmp))
        (tmp / MARKER).write_text(json.dumps({"format": kind, "entries": entries}, indent=2) + "\n")
        check_export_target(out)  # whatever appeared there while the export was written is not ours either
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):  # a previous export of ours: moved aside, removed once replaced
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.old"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:  # absent, or an empty directory (which rename replaces; it fails if a file appeared in it meanwhile)
        os.replace(tmp, out)
