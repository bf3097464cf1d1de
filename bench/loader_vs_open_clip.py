"""Loader throughput on real photographs: our ImageTextBatches vs open_clip_train's get_wds_dataset.

Run from the repository root (about 8 minutes on 2 quiet CPU cores once the shards and environment exist;
writing the shards takes about 2 minutes once):

    .venv/bin/python bench/loader_vs_open_clip.py            # writes bench/results/loader_vs_open_clip.md
    .venv/bin/python bench/loader_vs_open_clip.py --quick    # smoke check, ~2 minutes, report under runs/

What it does, in one run:
  1. writes (or reuses) JPEG shards in runs/bench_loader/ with our ShardWriter (so they carry our index):
     scikit-image's colour photographs (astronaut, coffee, chelsea, rocket, the stereo motorcycle pair, the
     Hubble deep field, immunohistochemistry, retina), each sample a random crop with a random flip, resized
     to 480-544 px on the long side, JPEG quality 90, caption "a photo of <name>"; 5000 samples, 500 per shard;
  2. creates (or reuses) open_clip_train's virtual environment (bench/train_vs_open_clip.py's
     `ensure_open_clip_venv`: our torch / torchvision / open_clip / Pillow versions plus webdataset 0.2.x);
  3. for 1 and 2 loader workers, alternately (ours, theirs, then theirs, ours, ...), runs each loader in its
     own process over the same shards with the same transform (open_clip.image_transform(224, is_train=True)
     with ViT-B-16's mean / std: RandomResizedCrop(224, scale 0.9-1), to tensor, normalize), the same
     tokenizer (open_clip.get_tokenizer('ViT-B-16')), batch 64, OMP_NUM_THREADS=1; the consumer only counts;
  4. times a fixed number of batches after a warm-up (wall clock, from the arrival of the last warm-up batch
     to that of the last timed one) and the CPU time of the loader's whole process tree over the same window,
     and reports medians: images/s, images/s per worker, images per CPU-second, and the ratios ours / theirs.

Ours: `ShardSet(expand_shards(pattern))`, `ImageTextBatches(shards, LoaderSpec(64, seed=0), transform,
tokenizer, reduced_decode=True)` (crop-aware reduced-scale JPEG decoding, as training does with
data.jpeg_draft=true; `--no-jpeg-draft` turns it off), `make_train_loader(dataset, workers, pin_memory=False)`. Theirs: `open_clip_train.data.
get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)` with the arguments open_clip_train's own
command line would give (train_data = the same brace pattern, train_num_samples = the batches needed,
dataset_resampled False, world_size 1, seed 0), run in open_clip_train's environment.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
OURS, THEIRS = "ours (ImageTextBatches)", "open_clip_train get_wds_dataset"
MODEL = "ViT-B-16"
IMAGE_SIZE = 224
PHOTOS = [  # (scikit-image function[:index], caption)
    ("astronaut", "a photo of an astronaut"), ("coffee", "a photo of a cup of coffee"),
    ("chelsea", "a photo of a cat"), ("rocket", "a photo of a rocket on a launch pad"),
    ("stereo_motorcycle:0", "a photo of a motorcycle"), ("stereo_motorcycle:1", "a photo of a motorcycle"),
    ("hubble_deep_field", "a photo of galaxies"), ("immunohistochemistry", "a photo of stained tissue"),
    ("retina", "a photo of a retina"),
]
LONG_SIDE = (480, 544)
QUALITY = 90
SHARD_PREFIX = "photos"


# ---------------------------------------------------------------------------------------------- child side
# Everything below up to the parent section runs in either environment (ours or open_clip_train's): stdlib at
# module level, the rest imported inside the functions.

def _tree_cpu_s(root: int) -> tuple[float, float]:
    """(CPU seconds of process `root`, of all its live descendants) from /proc."""
    tck = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tck
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    todo, below = list(children.get(root, [])), 0.0
    while todo:
        pid = todo.pop()
        below += cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return cpu.get(root, 0.0), below


def _machine_busy_s() -> float:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def shared_transform_and_tokenizer():
    """The transform and tokenizer both sides use, built the same way in both environments."""
    import open_clip

    cfg = open_clip.get_model_config(MODEL)
    pp = cfg.get("preprocess_cfg", {})
    transform = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=True,
                                          mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                                          std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)))
    return transform, open_clip.get_tokenizer(MODEL)


def ours_loader(a, transform, tokenizer):
    import torch

    from pipeline.data.loader import ImageTextBatches, LoaderSpec, ShardSet, expand_shards, make_train_loader

    shards = ShardSet(expand_shards(a.pattern))
    dataset = ImageTextBatches(shards, LoaderSpec(batch_size=a.batch_size, rank=0, world_size=1, seed=0),
                               transform, tokenizer, reduced_decode=a.jpeg_draft)
    # our batches hold uint8 pixels, normalised by the trainer on its device; here the consumer does it on the
    # CPU, inside the timed window and the CPU count, so both sides deliver the same float32 tensor
    return make_train_loader(dataset, a.workers, pin_memory=False), (
        lambda batch: dataset.decoder.image.model_input(batch["images"], "cpu", torch.float32))


def theirs_loader(a, transform, tokenizer):
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(  # what open_clip_train's parser gives for these flags, plus what main() sets
        train_data=a.pattern, val_data=None, train_num_samples=a.needed_batches * a.batch_size,
        val_num_samples=None, dataset_type="webdataset", dataset_resampled=False,
        train_data_upsampling_factors=None, batch_size=a.batch_size, workers=a.workers, seed=0,
        world_size=1, rank=0, local_rank=0, distributed=False)
    data = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    data.set_epoch(0)
    return data.dataloader, lambda batch: batch[0]


def bad_samples(batch) -> int:
    return int(sum(batch["bad"].values())) if isinstance(batch, dict) else 0


def child_main(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    transform, tokenizer = shared_transform_and_tokenizer()
    loader, model_input = (ours_loader if a.system == "ours" else theirs_loader)(a, transform, tokenizer)
    me = os.getpid()
    t_start = time.perf_counter()
    images = bad = got = 0
    t0 = c0 = m0 = None
    shape = None
    for batch in loader:
        got += 1
        pixels = model_input(batch)
        n, b = pixels.shape[0], bad_samples(batch)
        if got == a.warmup:  # the window opens when the last warm-up batch has arrived
            t0, (own, below), m0 = time.perf_counter(), _tree_cpu_s(me), _machine_busy_s()
            c0 = (own, below)
            first_s = t0 - t_start
        elif got > a.warmup:
            images += n
            bad += b
            shape = shape or [*pixels.shape, str(pixels.dtype)]
        if got == a.warmup + a.batches:  # measured here: leaving the loop stops the workers
            t1, (own1, below1), m1 = time.perf_counter(), _tree_cpu_s(me), _machine_busy_s()
            break
    if got < a.warmup + a.batches:
        raise SystemExit(f"{a.system}: the loader ended after {got} batches, {a.warmup + a.batches} needed")
    wall = t1 - t0
    main_cpu, worker_cpu = own1 - c0[0], below1 - c0[1]
    machine = m1 - m0
    other = max(0.0, (machine - main_cpu - worker_cpu) / (wall * (os.cpu_count() or 1)))
    print("RESULT " + json.dumps({
        "system": a.system, "workers": a.workers, "images": images, "bad": bad, "wall_s": wall,
        "main_cpu_s": main_cpu, "worker_cpu_s": worker_cpu, "other_cpu": other, "startup_s": first_s,
        "batch_shape": shape, "transform": repr(transform), "tokenizer": type(tokenizer).__name__,
    }), flush=True)
    del loader  # stop the workers before the interpreter exits


def child_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--child", dest="system", choices=["ours", "theirs"], required=True)
    p.add_argument("--pattern", required=True)
    for name in ("workers", "batch-size", "warmup", "batches", "needed-batches"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--jpeg-draft", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- parent side

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 1000 samples, 2 + 6 batches, 1 run each (report under runs/ unless --out)")
    p.add_argument("--samples", type=int, default=None, help="samples in the shards (default 5000; quick 1000)")
    p.add_argument("--per-shard", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--workers", default="1,2", help="loader worker counts, comma-separated (default 1,2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=None,
                   help="batches before the timed window (default 4 per worker, at least 4; quick 2 per worker)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per run (default 50; quick 6)")
    p.add_argument("--repeats", type=int, default=None, help="runs per system and worker count (default 3; quick 1)")
    p.add_argument("--data-dir", type=Path, default=REPO / "runs" / "bench_loader")
    p.add_argument("--venv", type=Path,
                   default=Path(os.environ.get("OPEN_CLIP_TRAIN_VENV", REPO / "runs" / "venv-open_clip_train")),
                   help="open_clip_train's virtual environment, created if missing")
    p.add_argument("--out", type=Path, default=None,
                   help="Markdown report (default bench/results/loader_vs_open_clip.md; with --quick "
                        "runs/bench_loader/loader_vs_open_clip-quick.md); '' to skip")
    p.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false",
                   help="ours without reduced-scale JPEG decoding (default: with it, as training does with "
                        "data.jpeg_draft=true)")
    p.add_argument("--wait-idle", type=int, default=0,
                   help="before each run, wait up to this many seconds for other processes to use less than "
                        "10%% of the CPU (default 0: do not wait)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per run (default 900)")
    a = p.parse_args(argv)
    q = a.quick
    a.samples = a.samples or (1000 if q else 5000)
    a.batches = a.batches or (6 if q else 50)
    a.repeats = a.repeats or (1 if q else 3)
    try:
        a.worker_counts = [int(w) for w in a.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers must be comma-separated integers, got {a.workers!r}")
    if not a.worker_counts or min(a.worker_counts) < 1:
        p.error("--workers: each count must be >= 1")
    if a.out is None:
        a.out = a.data_dir / "loader_vs_open_clip-quick.md" if q else BENCH / "results" / "loader_vs_open_clip.md"
    if (a.warmup is not None and a.warmup < 1) or a.batches < 1 or a.repeats < 1 or a.batch_size < 1:
        p.error("--warmup, --batches, --repeats and --batch-size must be >= 1")
    sizes = [min(a.per_shard, a.samples - s) for s in range(0, a.samples, a.per_shard)]
    for w in a.worker_counts:
        need = -(-(warmup_for(a, w) + a.batches) // w)  # batches per worker
        # open_clip_train gives each worker whole shards (shard i to worker i % w) and does not wrap around
        per_worker = min((sum(sizes[k::w]) // a.batch_size for k in range(w)), default=0) if len(sizes) >= w else 0
        if need > per_worker:
            p.error(f"{w} workers: {need} batches of {a.batch_size} per worker, but {a.samples} samples in "
                    f"{len(sizes)} shards give open_clip_train's workers {per_worker} each; raise --samples or "
                    "lower --batches / --warmup")
    return a


def warmup_for(a: argparse.Namespace, workers: int) -> int:
    return a.warmup if a.warmup is not None else (2 * workers if a.quick else max(4, 4 * workers))


def load_photo(name: str):
    import numpy as np
    import skimage.data
    from PIL import Image

    fn, _, part = name.partition(":")
    arr = getattr(skimage.data, fn)()
    if isinstance(arr, tuple):
        arr = arr[int(part or 0)]
    arr = np.asarray(arr)
    return Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB")


def make_shards(a: argparse.Namespace) -> tuple[str, dict]:
    """Writes (or reuses) the photo shards; returns (brace pattern, summary)."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.shard.writer import ShardWriter, shard_pattern

    out = a.data_dir / f"photos-{a.samples}-{a.per_shard}"
    done = out / "done.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        return summary["pattern"], summary
    print(f"writing {a.samples} photo samples to {out} ...", flush=True)
    start = time.perf_counter()
    photos = [(load_photo(n), c) for n, c in PHOTOS]
    rng = np.random.default_rng(0)
    sizes, short_sides = [], []
    with ShardWriter(out, prefix=SHARD_PREFIX, samples_per_shard=a.per_shard) as w:
        for i in range(a.samples):
            img, caption = photos[i % len(photos)]
            wd, ht = img.size
            area = rng.uniform(0.35, 1.0) * wd * ht
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = min(wd, int(round((area * ratio) ** 0.5))), min(ht, int(round((area / ratio) ** 0.5)))
            left, top = int(rng.integers(0, wd - cw + 1)), int(rng.integers(0, ht - ch + 1))
            crop = img.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            long_side = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
            scale = long_side / max(cw, ch)
            crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=QUALITY)
            sizes.append(buf.tell())
            short_sides.append(min(crop.size))
            w.write(f"{i:08d}", {"jpg": buf.getvalue(), "txt": caption})
    n_shards = len(w.shards)
    summary = {"pattern": str(out / f"{shard_pattern(SHARD_PREFIX, n_shards).rsplit('/', 1)[-1]}"),
               "samples": a.samples, "shards": n_shards, "jpeg_bytes_mean": int(np.mean(sizes)),
               "jpeg_mb": round(sum(sizes) / 2**20, 1), "seconds": round(time.perf_counter() - start, 1),
               "short_side_min": int(min(short_sides)), "short_side_median": int(np.median(short_sides)),
               "short_side_ge_2x": round(float(np.mean(np.array(short_sides) >= 2 * IMAGE_SIZE)), 3)}
    done.write_text(json.dumps(summary, indent=2))
    return summary["pattern"], summary


def run_child(a, system: str, python: Path, pattern: str, workers: int, env: dict) -> dict:
    warmup = warmup_for(a, workers)
    needed = warmup + a.batches
    needed = -(-needed // workers) * workers  # whole rounds of workers, so open_clip_train's epoch is exact
    cmd = [str(python), str(Path(__file__).resolve()), "--child", "ours" if system == OURS else "theirs",
           "--pattern", pattern, "--workers", str(workers), "--batch-size", str(a.batch_size),
           "--warmup", str(warmup), "--batches", str(a.batches), "--needed-batches", str(needed)]
    if system == OURS:
        cmd += ["--jpeg-draft", str(int(a.jpeg_draft))]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{system} with {workers} worker(s) took longer than {a.timeout}s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise BenchError(f"{system} with {workers} worker(s) failed (exit {proc.returncode}): "
                         f"{tail[-1] if tail else 'no output'}")
    r = json.loads(lines[-1][len("RESULT "):])
    r.update(label=system, process_s=time.perf_counter() - start, warmup=warmup, command=cmd)
    if r["bad"]:
        raise BenchError(f"{system}: {r['bad']} samples failed to decode; the shards in {pattern} are damaged")
    return r


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict], worker_counts: list[int]) -> list[dict]:
    rows = []
    for w in worker_counts:
        row = {"workers": w}
        for key, system in (("ours", OURS), ("theirs", THEIRS)):
            rs = [r for r in runs if r["label"] == system and r["workers"] == w]
            row[key] = {
                "ips": median([r["images"] / r["wall_s"] for r in rs]),
                "ipcpu": median([r["images"] / (r["main_cpu_s"] + r["worker_cpu_s"]) for r in rs]),
                "ipwcpu": median([r["images"] / max(r["worker_cpu_s"], 1e-9) for r in rs]),
                "runs": [r["images"] / r["wall_s"] for r in rs],
            }
        row["ratio"] = row["ours"]["ips"] / row["theirs"]["ips"]
        row["ratio_cpu"] = row["ours"]["ipcpu"] / row["theirs"]["ipcpu"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["workers", "system", "images/s", "images/s per worker", "ratio ours/theirs (wall)",
              "images per CPU-s (all processes)", "CPU-ms per image", "ratio ours/theirs (CPU)"]
    out = []
    for row in rows:
        w = row["workers"]
        for key, system in (("ours", OURS), ("theirs", THEIRS)):
            s = row[key]
            out.append([str(w), system, f"{s['ips']:.1f}", f"{s['ips'] / w:.1f}",
                        f"{row['ratio']:.2f}" if key == "ours" else "1.00", f"{s['ipcpu']:.1f}",
                        f"{1000 / s['ipcpu']:.1f}", f"{row['ratio_cpu']:.2f}" if key == "ours" else "1.00"])
    return header, out


def write_report(a, argv, runs, rows, info, versions, data, transform_repr, total_s) -> None:
    tvo = _tvo()
    header, body = table(rows)
    detail = [[r["label"], str(r["workers"]), str(r["repeat"]), str(r["images"]), f"{r['wall_s']:.1f}",
               f"{r['images'] / r['wall_s']:.1f}", f"{r['main_cpu_s']:.1f}", f"{r['worker_cpu_s']:.1f}",
               f"{100 * r['other_cpu']:.0f}%", f"{r['startup_s']:.1f}"] for r in runs]
    script = " ".join([".venv/bin/python", "bench/loader_vs_open_clip.py", *argv])
    ours_cmd = tvo.display_command(next(r["command"] for r in runs if r["label"] == OURS))
    theirs_cmd = tvo.display_command(next(r["command"] for r in runs if r["label"] == THEIRS))
    busy = [r for r in runs if r["other_cpu"] > 0.1]
    warn = (f"**Warning:** other processes used more than 10% of the CPU during {len(busy)} of {len(runs)} runs "
            "(column \"other CPU\"); the wall-clock figures of those runs are low and noisy, the CPU-second "
            "figures much less so.\n\n" if busy else "")
    quick = ("**Quick (smoke) mode: too few batches for a measurement; do not quote these numbers.**\n\n"
             if a.quick else "")
    headline = "; ".join(f"{row['workers']} worker(s): **{row['ratio']:.2f}x** images/s per worker "
                         f"({row['ratio_cpu']:.2f}x images per CPU-second)" for row in rows)
    draft_line = (f"on (what training does with `data.jpeg_draft=true`, the default): the crop is drawn from the "
                  f"JPEG header and the image decoded at 1/2, 1/4 or 1/8 scale when the crop keeps at least "
                  f"{IMAGE_SIZE} px both ways at that scale (shorter sides here {data.get('short_side_min', '?')}-"
                  f"{LONG_SIDE[1]} px, median {data.get('short_side_median', '?')}). open_clip_train decodes "
                  f"every image at full size"
                  if a.jpeg_draft else "off (`--no-jpeg-draft`): full-size decoding, like open_clip_train")
    text = f"""# Loader throughput on real photographs: ours vs open_clip_train's get_wds_dataset (CPU)

{quick}Rerun from the repository root ({total_s / 60:.1f} minutes this time, shards and environment included):

    {script}

## Result

Ours / open_clip_train: {headline}.

{tvo.format_markdown(header, body)}

{warn}Medians over {a.repeats} run(s) per system and worker count, each timing {a.batches} batches of {a.batch_size} after a warm-up (per-worker figure = images/s / workers). "images per CPU-s": images over the CPU time of the loader's whole process tree (main process + workers) in the same window; it depends much less on other load on the machine than the wall clock. The issue's goal is a ratio of at least 2 in images/s per worker.

## Machine and software

- Device: {info['cpu']}, {info['cores']} cores, no GPU
- Date: {info['date']}
- Git commit: {info['commit']}
- Python {info['python']}; ours: torch {tvo.our_version('torch')}, open_clip_torch {tvo.our_version('open_clip_torch')}, Pillow {tvo.our_version('pillow')}, webdataset {tvo.our_version('webdataset')} (not used by our loader)
- open_clip_train environment (`{tvo.relative(str(a.venv))}`): torch {versions['torch']}, torchvision {versions['torchvision']}, open_clip_torch {versions['open_clip_torch']}, webdataset {versions['webdataset']}; Pillow and numpy at our versions

## Settings (both systems)

- Shards: `{tvo.relative(data['pattern'])}`: {data['samples']} samples in {data['shards']} shards written by `pipeline.shard.writer.ShardWriter` (with our index), JPEG quality {QUALITY}, long side {LONG_SIDE[0]}-{LONG_SIDE[1]} px (mean JPEG {data['jpeg_bytes_mean'] / 1000:.0f} kB, {data['jpeg_mb']} MB in all), random crops and flips of scikit-image's colour photographs ({", ".join(n for n, _ in PHOTOS)}), captions like "a photo of a cat"
- Transform (the same construction in both environments, checked equal by its repr): `open_clip.image_transform({IMAGE_SIZE}, is_train=True, mean/std of {MODEL})`:

  ```
{chr(10).join("  " + ln for ln in transform_repr.splitlines())}
  ```
- Our loader's reduced-scale JPEG decoding: {draft_line}
- Tokenizer `open_clip.get_tokenizer('{MODEL}')` (context 77); batch {a.batch_size}; OMP_NUM_THREADS=1; DataLoader workers {", ".join(map(str, a.worker_counts))}; the consumer only counts images (no training step, no pinning)
- Warm-up batches: {", ".join(f"{w} worker(s): {warmup_for(a, w)}" for w in a.worker_counts)}; timed batches: {a.batches}
- Order of the runs: {", ".join(f"{'ours' if r['label'] == OURS else 'theirs'} w{r['workers']} #{r['repeat']}" for r in runs)}

Commands of one run each (from the repository root):

    {ours_cmd}

    {theirs_cmd}

## Per run

{tvo.format_markdown(["system", "workers", "run", "images timed", "wall s", "images/s", "main CPU s", "worker CPU s", "other CPU", "first batch after s"], detail)}

"other CPU": share of the machine's CPU used by processes outside the run during its timed window. "first batch after s": from building the loader to the last warm-up batch (start-up, shuffle-buffer fill).

## Differences between the two loaders (caveats)

- Ours reads each sample by offset through the per-shard index (order shuffled over the whole epoch in blocks of 4096, per-sample seeded augmentation, tokenization once per batch, DataLoader prefetch 4 per worker). open_clip_train streams the tars with webdataset 0.2.x (each worker takes whole shards, 2000-shard shuffle buffer, 5000-sample shuffle buffer filled to 1000 before its first sample, tokenization per sample, collation in the worker, DataLoader prefetch 2).
- open_clip_train decodes with Pillow (webdataset's `pilrgb`) and runs the torchvision transform on PIL images. Ours gives the same transform object to `pipeline.data.image_decode.ImageToTensor`, which recognises its steps and runs them on uint8 pixels: libjpeg-turbo decode (simplejpeg), the crop, torch's antialiased bicubic resize (within one grey level of Pillow's, tested), then one multiply-add for ToTensor + Normalize. The random crops are drawn by our own sampler with the same scale and ratio ranges. Reduced-scale decoding is part of what is measured.
- With 2 workers on a 2-core machine the workers share the cores with the main process, so per-worker images/s fall; the CPU-second column shows the cost per image independent of that.
"""
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)


class BenchError(Exception):
    """Stops the benchmark; the message is printed as one line."""


def _tvo():
    """bench/train_vs_open_clip.py as a module (environment set-up, machine info, formatting)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import train_vs_open_clip

    return train_vs_open_clip


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    tvo = _tvo()
    start = time.perf_counter()
    a.data_dir.mkdir(parents=True, exist_ok=True)
    pattern, data = make_shards(a)
    try:
        oc_python, versions = tvo.ensure_open_clip_venv(a.venv.resolve(), a.data_dir)
    except tvo.BenchError as e:
        raise BenchError(str(e)) from None
    env = tvo.child_env(1)
    env["PYTHONUNBUFFERED"] = "1"
    plan = []
    for repeat in range(1, a.repeats + 1):
        for w in a.worker_counts:
            pair = [OURS, THEIRS] if (repeat + a.worker_counts.index(w)) % 2 else [THEIRS, OURS]
            plan += [(s, w, repeat) for s in pair]
    runs = []
    for i, (system, w, repeat) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {system}, {w} worker(s), run {repeat} ...", end=" ", flush=True)
        tvo.wait_for_quiet_machine(a.wait_idle)
        r = run_child(a, system, Path(sys.executable) if system == OURS else oc_python, pattern, w, env)
        r["repeat"] = repeat
        runs.append(r)
        print(f"{r['images'] / r['wall_s']:.1f} images/s ({r['images'] / r['wall_s'] / w:.1f} per worker), "
              f"{1000 * (r['main_cpu_s'] + r['worker_cpu_s']) / r['images']:.1f} CPU-ms/image, "
              f"other processes {100 * r['other_cpu']:.0f}% CPU", flush=True)
    reprs = {r["transform"] for r in runs}
    if len(reprs) != 1:
        raise BenchError("the two environments built different transforms: " + " vs ".join(sorted(reprs)))
    shapes = {tuple(r["batch_shape"]) for r in runs}
    if len(shapes) != 1:
        raise BenchError(f"the loaders gave different batch shapes: {sorted(shapes)}")
    rows = summarize(runs, a.worker_counts)
    header, body = table(rows)
    print()
    print(tvo.format_plain(header, body))
    if any(r["other_cpu"] > 0.1 for r in runs):
        print("warning: other processes used more than 10% of the CPU during some runs; wall-clock figures are "
              "low and noisy (the CPU-second figures much less so)")
    if str(a.out) not in ("", "."):
        write_report(a, argv, runs, rows, tvo.machine_info(), versions, data, reprs.pop(),
                     time.perf_counter() - start)
        print(f"\nreport written to {a.out}")
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main(child_args(sys.argv[1:]))
        sys.exit(0)
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
