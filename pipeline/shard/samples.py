"""Rows -> samples for `python -m pipeline shard`: read, check and transform one input row into the members of
one sample (`Sample`), or say why it cannot be one (`Failure`, with a reason that `summary.json` counts).
Runs in the worker processes; cheap checks come first.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from pipeline.shard.images import ImageFailure, ImageSettings, process_image
from pipeline.shard.rows import FileRef, SourceRow


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
