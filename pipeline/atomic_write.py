"""Writing a file so that readers see either the old file or the whole new one, never a part.

The content goes to a temporary file beside the target (same directory, so the same file system) and is
renamed over it with `os.replace`, which is atomic on POSIX. Where a crash must not lose the new content
(a checkpoint's `latest`, a shard tar), `fsync=True` flushes the data to disk before the rename; elsewhere
(indexes that can be rebuilt, summaries) the rename alone is enough and cheaper.

The temporary name is `<name><tmp_suffix>`: the default `.tmp` is what recovery code looks for (`shard`
resumes delete `*.tmp`); writers that may race on one target (ranks rebuilding one index, processes writing
one manifest) pass a suffix naming the writer, so no two share a temporary file.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def fsync_file(path: str | Path) -> None:
    """Flushes a written file's data to disk (its pages, whichever descriptor wrote them)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temporary_path(path: str | Path, tmp_suffix: str = ".tmp") -> Path:
    path = Path(path)
    return path.with_name(path.name + tmp_suffix)


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False, tmp_suffix: str = ".tmp") -> Iterator[Path]:
    """Yields the temporary path to write; when the block ends normally the file there replaces `path`. When
    it raises, the temporary file is removed and `path` is untouched."""
    tmp = temporary_path(path, tmp_suffix)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], object], *, fsync: bool = False,
                 tmp_suffix: str = ".tmp") -> Path:
    """Replaces `path` with `content`: text (UTF-8), bytes, or a callable that writes the file at the path it is
    given (e.g. `lambda tmp: pq.write_table(table, tmp)`). Returns `path`."""
    with atomic_path(path, fsync=fsync, tmp_suffix=tmp_suffix) as tmp:
        if callable(content):
            content(tmp)
        elif isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
    return Path(path)
