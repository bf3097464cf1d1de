"""The built-in demo dataset: generated pictures of coloured shapes with compositional captions.

Each picture holds one shape (8 colours x 5 kinds = 40 classes) of a random size at a random place on a noisy
grey background, sometimes with a small distractor blob. Captions name colour, shape, size and position in
varied phrasings, so a CLIP model must learn colour words and shape words separately to match them; zero-shot
classification on the held-out split then asks for the 40 "colour shape" classes from prompts it never saw
as captions. Every sample is a function of (seed, split, index): the data set is reproducible bit for bit.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from pipeline.atomic_write import write_atomic
from pipeline.shard.writer import ShardWriter, shard_pattern

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "pink": (245, 120, 190), "cyan": (40, 200, 210),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]
SIZES = {"small": (0.22, 0.32), "medium": (0.36, 0.48), "large": (0.52, 0.66)}  # fraction of the side
POSITIONS = {
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
CAPTIONS = [
    "a {size} {colour} {shape} in the {position}",
    "a {colour} {shape} on a grey background",
    "{position}: one {size} {colour} {shape}",
    "there is a {colour} {shape} in the {position} of the picture",
    "a picture of a {size} {shape} coloured {colour}",
    "the {shape} is {colour} and {size}",
    "{colour} {shape}, {size}, {position}",
]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a {}.", "an image showing a {}."]
SPLIT_IDS = {"train": 0, "val": 1}


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if kind == "cross":
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(kind)


def render_sample(seed: int, split: str, index: int, image_size: int = 64) -> tuple[bytes, str, int]:
    """Returns (jpeg bytes, caption, class id) for one sample."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]

    s = image_size * 2  # draw at 2x and downsample: cheap anti-aliasing
    grey = int(rng.integers(70, 190))
    bg = np.clip(grey + rng.normal(0, 12, (s, s, 1)) + rng.normal(0, 6, (1, 1, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(np.repeat(bg, 3, axis=2) if bg.shape[2] == 1 else bg)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # a small distractor blob of another colour
        dc = np.array(list(COLOURS.values())[rng.integers(len(COLOURS))]) * 0.6 + grey * 0.4
        dx, dy, dr = rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.9) * s, rng.uniform(0.03, 0.06) * s
        draw.ellipse([dx - dr, dy - dr, dx + dr, dy + dr], fill=tuple(int(v) for v in dc))
    lo, hi = SIZES[size]
    r = rng.uniform(lo, hi) * s / 2
    px, py = POSITIONS[position]
    cx = np.clip(px * s + rng.normal(0, 0.04 * s), r, s - r)
    cy = np.clip(py * s + rng.normal(0, 0.04 * s), r, s - r)
    rgb = tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=rgb)
    img = img.resize((image_size, image_size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(colour=colour, shape=shape, size=size, position=position)
    label = list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)
    return buf.getvalue(), caption, label


def write_demo_dataset(out_dir: str | Path, train_samples: int = 20000, val_samples: int = 2000,
                       samples_per_shard: int = 1000, seed: int = 0, image_size: int = 64) -> dict:
    """Writes `out_dir/train/`, `out_dir/val/` (WebDataset shards with indexes) and `out_dir/classes.json`.
    Returns {"train": pattern, "val": pattern, "classes": path}. Reuses a complete earlier write with the
    same settings."""
    settings = {"train_samples": train_samples, "val_samples": val_samples, "samples_per_shard": samples_per_shard,
                "seed": seed, "image_size": image_size}

    def members(split: str, index: int) -> dict:
        jpg, caption, label = render_sample(seed, split, index, image_size)
        return {"jpg": jpg, "txt": caption, "cls": str(label), "json": json.dumps({"split": split, "index": index})}

    return write_demo_splits(out_dir, "demo_dataset.json", settings, samples_per_shard, members)


def write_demo_splits(out_dir: str | Path, manifest_name: str, settings: dict, samples_per_shard: int,
                      members: Callable[[str, int], dict]) -> dict:
    """Writes the train and val splits (`settings["train_samples"]` / `["val_samples"]` samples, each
    `members(split, index)`) as indexed shards plus `classes.json`, and the manifest `manifest_name` last, so
    a complete earlier write with the same settings is reused. Returns {"train", "val", "classes"}."""
    out = Path(out_dir)
    manifest = out / manifest_name
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("settings") == settings:
            return previous["paths"]
    paths = {}
    for split in ("train", "val"):
        with ShardWriter(out / split, prefix=split, samples_per_shard=samples_per_shard) as w:
            for i in range(settings[f"{split}_samples"]):
                w.write(f"{i:09d}", members(split, i))
        paths[split] = str(out / split / shard_pattern(split, len(w.shards)))
    (out / "classes.json").write_text(json.dumps({"classes": class_names(), "templates": TEMPLATES}, indent=2))
    paths["classes"] = str(out / "classes.json")
    write_atomic(manifest, json.dumps({"settings": settings, "paths": paths}, indent=2))  # never half a marker
    return paths
