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

A shard is written as `.tar.tmp` (`writer.TarShard`); closing it writes its failures, its stats JSON (which
holds `row_end`, the row id the next shard starts at) and its parquet index, then renames the tar: the rename
is the commit (`splits.py`). A rerun of the same command keeps the complete shards, deletes anything after
them, and continues each split from its last `row_end`; keys are planned again from row 0 so duplicates are
judged as before, and with --dedup-image the image hashes of the kept shards are read back from their indexes.

The rows come from `sources.py`, become samples in `samples.py` on the processes of `workers.py`, and are
written by `splits.py`; this module plans, drives and sums up.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from tqdm import tqdm

from pipeline.data.manifest import ShardEntry, write_manifest
from pipeline.shard.options import ShardOptions
from pipeline.shard.rows import InputError, InputSpec
from pipeline.shard.samples import Failure, SampleSettings, sanitize_key
from pipeline.shard.sources import check_input, input_fingerprint, iter_rows, parquet_rows, resolve_inputs
from pipeline.shard.splits import SplitWriter, write_json, write_parquet
from pipeline.shard.workers import process_in_order

JOB_FILE = "shard_job.json"
CHUNK_ROWS = 16               # rows per task sent to a worker
CHUNK_BYTES = 8 << 20         # ... or fewer, when rows carry image bytes


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
    write_json(out / JOB_FILE, job)
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
        for meta, outcomes in process_in_order(_plan(specs, opts, resume, total_rows), settings, opts.workers):
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
            write_json(w.dir / "summary.json", dict(splits[split], output=str(w.dir)))
            t = w.failures_table()
            tables.append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
    for w in writers.values():  # the loader plans an epoch from this one file, not from every shard's index
        write_manifest(w.dir, {s["shard"]: ShardEntry(s["samples"], s["tar_bytes"]) for s in w.done})
    table = pa.concat_tables(tables)
    write_parquet(table.sort_by("row") if table.num_rows else table, out / "failures.parquet")
    write_json(out / "summary.json", summary)
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
