"""Folder-tree and tar inputs of `python -m pipeline shard`, read alike: files are grouped by key the way
WebDataset groups tar members (`dir/0001.jpg` + `dir/0001.txt` -> key `dir/0001`), and each group's sidecars
(caption, class, JSON metadata, audio, depth, ...) become one row. Symbolic links inside either are skipped (a
link may point anywhere on the machine).
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Iterator

from pipeline.data.shard_index import split_member_name
from pipeline.shard.rows import CAPTION_COLUMN_GUESSES, NO_CAPTIONS, Columns, FileRef, InputSpec, SourceRow

SOURCE_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # the first found is the image
# Other members of a folder group or tar sample are copied through when the last part of their extension is
# one of these (`wav`, `depth.png`, `seg.npy`, ...); anything else (pickles first of all) is dropped.
PASSTHROUGH_EXTS = frozenset({"wav", "flac", "mp3", "ogg", "npy", "png", "jpg", "jpeg", "webp", "txt", "json", "cls"})


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


def iter_folder(spec: InputSpec, exclude: str | None) -> Iterator[SourceRow]:
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


def iter_tar(spec: InputSpec) -> Iterator[SourceRow]:
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
