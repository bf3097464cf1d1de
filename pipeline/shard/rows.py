"""What an input row is, for `python -m pipeline shard`: the types every input reader produces and the driver
consumes, and the column conventions they share.

Readers stay light: they hand over image *paths* (`FileRef`) and let the worker processes read and decode them;
only bytes that live inside the input (a parquet binary column, a tar member) travel with the row. A row that
cannot be read at all (a JSONL line that is not JSON, the rest of a truncated tar) is still a row, with `error`
set, so that every input row is accounted for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import UserError

CAPTION_COLUMN_GUESSES = ("caption", "text", "txt", "title")
NO_CAPTIONS = "none"  # --caption-col none: the data has no captions (e.g. labels only)


class InputError(UserError, ValueError):
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
