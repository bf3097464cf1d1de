"""The demo dataset with two more modalities per sample, for ImageBind-style binding.

Every sample of `pipeline.demo_data.shapes` (same picture, caption and class for the same (seed, split,
index)) gets:

- `.wav`: 1 s of 16 kHz mono 16-bit PCM. The pitch follows the colour (8 colours -> fundamentals 250 Hz x
  sqrt(2)^i, 250 ... 2828 Hz, with a second harmonic), the rhythm / envelope follows the shape (circle: a steady
  tone; square: 4 hard on/off pulses; triangle: 3 linear ramps up; star: 5 short pips; cross: 2 long notes),
  the loudness follows the size; plus a random pitch jitter (+-3%), phase, rhythm offset and white noise.
  So the class is audible, and an audio encoder bound to an image tower that knows the classes can be
  classified zero-shot from text prompts.
- `.depth.png`: a 16-bit depth map in millimetres (the project's `decode_depth` default), derived from the
  picture itself: a background plane receding from 2.5 m (bottom) to 3.5 m (top), and every coloured object
  (the shape, and the distractor blob when there is one), found by its colour saturation, raised 0.8 m towards
  the camera (a dome: nearest at its centre), with 5 mm sensor noise and ~1% missing pixels (0). Depth shows
  shape, size and position but not colour, so zero-shot over the 40 "colour shape" classes from depth alone is
  bounded by the shape (one in 8 classes share a shape with the answer).

For one paired dataset per modality, as ImageBind trains (`write_disjoint_demo_datasets`), four more sets of
pictures of the same world, each paired with one modality and no picture shared between sets:

- image + audio (`.wav`), image + depth (`.depth.png`), as above;
- image + thermal (`.thermal.png`, 8-bit grey, 1 = hottest): a heat image of the scene. Every coloured pixel
  is matched to the nearest colour of the palette and takes that paint's temperature (red the coolest of the
  eight, cyan the hottest, evenly spaced in between), over a cool background with a vertical gradient; heat
  diffuses (a box blur) and the sensor adds noise. So temperature tells the colour and the warm silhouette the
  shape, size and position: the class is visible in thermal alone.
- image + IMU (`.imu.npy`, float32 (500, 6) at 100 Hz: 3 accelerometer axes in g, 3 gyroscope axes in rad/s):
  a device carried along the outline of the shape (a circle: a smooth turn; the polygons: a sharp turn at each
  of their 3 / 4 / 10 / 12 corners), one lap per 4 s / 1.25^colour (the colour sets the pace), radius by the size,
  with a random start on the outline, gravity on z, and sensor noise.

`classes.json` is the demo's ({"classes", "templates"}): the text prompts for emergent zero-shot.
"""
from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.demo_data.shapes import (COLOURS, SHAPES, SIZES, SPLIT_IDS, shape_polygon, render_sample,
                                      write_demo_splits)

SAMPLE_RATE = 16_000
AUDIO_SECONDS = 1.0
BASE_FREQ = 250.0


def _envelope(shape: str, t: np.ndarray, offset: float) -> np.ndarray:
    """Amplitude envelope in [0, 1] over t in seconds; `offset` shifts the rhythm (fraction of a period)."""
    if shape == "circle":
        return np.ones_like(t)
    if shape == "square":  # 4 Hz on/off
        return (((t * 4 + offset) % 1.0) < 0.5).astype(np.float64)
    if shape == "triangle":  # 3 ramps up per second
        return (t * 3 + offset) % 1.0
    if shape == "star":  # 5 short pips
        return (((t * 5 + offset) % 1.0) < 0.2).astype(np.float64)
    if shape == "cross":  # 2 long notes with gaps
        return (((t * 2 + offset) % 1.0) < 0.7).astype(np.float64)
    raise ValueError(shape)


def synth_audio(label: int, size: str, rng: np.random.Generator, seconds: float = AUDIO_SECONDS,
                sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 waveform in [-1, 1] for a class id (colour * 5 + shape) and size."""
    colour, shape = divmod(label, len(SHAPES))
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = BASE_FREQ * 2 ** (colour / 2) * (1 + rng.uniform(-0.03, 0.03))
    phase = rng.uniform(0, 2 * np.pi)
    tone = np.sin(2 * np.pi * f0 * t + phase) + 0.3 * np.sin(4 * np.pi * f0 * t + 2 * phase)
    env = _envelope(SHAPES[shape], t, rng.uniform(0, 1))
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms fades: no clicks at the ends
    loud = {"small": 0.25, "medium": 0.4, "large": 0.6}[size] * rng.uniform(0.85, 1.15)
    x = loud * tone * env * ramp / 1.3 + rng.normal(0, 0.02, t.shape)
    return np.clip(x, -1, 1).astype(np.float32)


def wav_bytes(x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM mono WAV through the stdlib `wave` writer."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _box_blur(x: np.ndarray, radius: int) -> np.ndarray:
    k = 2 * radius + 1
    p = np.pad(x, radius, mode="edge")
    c = np.cumsum(np.cumsum(np.pad(p, ((1, 0), (1, 0))), axis=0), axis=1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def depth_from_picture(jpg: bytes, rng: np.random.Generator) -> np.ndarray:
    """uint16 (H, W) depth in mm for a demo picture (see the module docstring)."""
    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(np.float32)
    h, w, _ = rgb.shape
    sat = rgb.max(axis=2) - rgb.min(axis=2)
    mask = (sat > 50).astype(np.float64)  # grey background: saturation < ~30; shapes 90+, the distractor 60+
    ys = np.arange(h, dtype=np.float64)[:, None].repeat(w, axis=1)
    depth = 3500.0 - 1000.0 * ys / (h - 1)  # a floor-like plane, nearer at the bottom
    dome = mask * _box_blur(mask, max(1, h // 16))  # 1 inside an object, falling off towards its border
    depth = depth - 800.0 * dome + rng.normal(0, 5.0, depth.shape)
    depth[rng.random(depth.shape) < 0.01] = 0  # missing measurements
    return np.clip(np.round(depth), 0, 65535).astype(np.uint16)


def depth_png_bytes(depth_mm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(depth_mm.astype(np.uint16)).save(buf, format="PNG")  # mode I;16: a 16-bit grey PNG
    return buf.getvalue()


def render_multimodal_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, bytes | str]:
    """The members of one sample: jpg, txt, cls, json (as the image demo) + wav + depth.png."""
    jpg, caption, label = render_sample(seed, split, index, image_size)
    size = size_of(seed, split, index)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, 1])  # the picture's is [seed, split, index]
    return {"jpg": jpg, "txt": caption, "cls": str(label),
            "json": json.dumps({"split": split, "index": index, "size": size}),
            "wav": wav_bytes(synth_audio(label, size, rng)),
            "depth.png": depth_png_bytes(depth_from_picture(jpg, rng))}


def size_of(seed: int, split: str, index: int) -> str:
    """The size `render_sample` drew (not every caption names it): its first draws are colour, shape, size."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    rng.integers(len(COLOURS))
    rng.integers(len(SHAPES))
    return list(SIZES)[rng.integers(len(SIZES))]


def write_multimodal_demo_dataset(out_dir: str | Path, train_samples: int = 20000, val_samples: int = 2000,
                                  samples_per_shard: int = 1000, seed: int = 0, image_size: int = 64) -> dict:
    """Writes `out_dir/train/`, `out_dir/val/` (WebDataset shards + indexes, members jpg / txt / cls / json / wav /
    depth.png) and `out_dir/classes.json`. Returns {"train": pattern, "val": pattern, "classes": path}. Reuses a
    complete earlier write with the same settings (`multimodal_demo.json`)."""
    settings = {"train_samples": train_samples, "val_samples": val_samples, "samples_per_shard": samples_per_shard,
                "seed": seed, "image_size": image_size, "modalities": ["audio", "depth"], "version": 1}
    return write_demo_splits(out_dir, "multimodal_demo.json", settings, samples_per_shard,
                             lambda split, i: render_multimodal_sample(seed, split, i, image_size))


# ---------------------------------------------------------------------------------- one paired set per modality

DISJOINT_MODALITIES = ("audio", "depth", "thermal", "imu")
PICTURES_PER_SET = 1_000_000  # set j draws the world's pictures j * this + i: no picture is in two sets
IMU_RATE = 100  # Hz
IMU_STEPS = 500


def thermal_from_picture(jpg: bytes, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W) heat image for a demo picture (see the module docstring)."""
    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(np.float32)
    h, w, _ = rgb.shape
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    nearest = ((rgb[:, :, None, :] - palette[None, None]) ** 2).sum(-1).argmin(-1)  # (H, W) colour index
    painted = (rgb.max(axis=2) - rgb.min(axis=2)) > 50  # as `depth_from_picture`: the grey background is not
    heat = 0.35 + 0.08 * nearest  # paint temperatures, 0.35 ... 0.91
    ambient = 0.12 + 0.08 * np.arange(h, dtype=np.float64)[:, None] / (h - 1) + rng.uniform(-0.03, 0.03)
    t = np.where(painted, heat, ambient)
    t = _box_blur(t, 1) + rng.normal(0, 0.015, t.shape)  # diffusion, then sensor noise
    return np.clip(np.round(t * 255), 0, 255).astype(np.uint8)


def thermal_png_bytes(t: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(t, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _outline(shape: str, n: int = 256) -> np.ndarray:
    """(n, 2) points evenly spaced along the unit outline of a shape (closed)."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "square":
        corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64) * 0.85
    else:
        corners = np.array(shape_polygon(shape, 0.0, 0.0, 1.0), dtype=np.float64)
    closed = np.vstack([corners, corners[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    at = np.linspace(0, seg.sum(), n, endpoint=False)
    cum = np.concatenate([[0], np.cumsum(seg)])
    i = np.searchsorted(cum, at, side="right") - 1
    f = ((at - cum[i]) / seg[i])[:, None]
    return closed[i] * (1 - f) + closed[i + 1] * f


def synth_imu(label: int, size: str, rng: np.random.Generator, steps: int = IMU_STEPS) -> np.ndarray:
    """float32 (steps, 6) trace for a class id (colour * 5 + shape) and size (see the module docstring)."""
    colour, shape = divmod(label, len(SHAPES))
    outline = _outline(SHAPES[shape])
    laps_per_s = 0.25 * 1.25 ** colour * (1 + rng.uniform(-0.03, 0.03))
    radius = {"small": 0.3, "medium": 0.5, "large": 0.7}[size] * rng.uniform(0.9, 1.1)  # metres
    t = np.arange(steps) / IMU_RATE
    u = (rng.uniform(0, 1) + laps_per_s * t) % 1.0 * len(outline)
    i0 = np.floor(u).astype(np.int64)
    f = (u - i0)[:, None]
    pos = radius * (outline[i0 % len(outline)] * (1 - f) + outline[(i0 + 1) % len(outline)] * f)  # (T, 2) m
    vel = np.gradient(pos, 1 / IMU_RATE, axis=0)
    acc = _smooth(np.gradient(vel, 1 / IMU_RATE, axis=0), 3) / 9.81  # in g
    heading = np.unwrap(np.arctan2(vel[:, 1], vel[:, 0]))
    yaw_rate = _smooth(np.gradient(heading, 1 / IMU_RATE), 3)
    x = np.zeros((steps, 6))
    x[:, :2], x[:, 2], x[:, 5] = acc, 1.0, yaw_rate
    x += rng.normal(0, [0.02, 0.02, 0.02, 0.01, 0.01, 0.02], x.shape)
    return x.astype(np.float32)


def _smooth(x: np.ndarray, radius: int) -> np.ndarray:
    k = np.ones(2 * radius + 1) / (2 * radius + 1)
    if x.ndim == 1:
        return np.convolve(x, k, mode="same")
    return np.stack([np.convolve(c, k, mode="same") for c in x.T], 1)


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def render_paired_sample(modality: str, seed: int, split: str, index: int, image_size: int = 64) -> dict:
    """One sample of the `modality` set: the picture jpg / txt / cls / json and that modality's member only."""
    world = DISJOINT_MODALITIES.index(modality) * PICTURES_PER_SET + index
    jpg, caption, label = render_sample(seed, split, world, image_size)
    size = size_of(seed, split, world)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], world, 1])
    member = {"audio": lambda: ("wav", wav_bytes(synth_audio(label, size, rng))),
              "depth": lambda: ("depth.png", depth_png_bytes(depth_from_picture(jpg, rng))),
              "thermal": lambda: ("thermal.png", thermal_png_bytes(thermal_from_picture(jpg, rng))),
              "imu": lambda: ("imu.npy", npy_bytes(synth_imu(label, size, rng)))}[modality]()
    return {"jpg": jpg, "txt": caption, "cls": str(label),
            "json": json.dumps({"split": split, "index": index, "world_index": world, "size": size}),
            member[0]: member[1]}


def write_disjoint_demo_datasets(out_dir: str | Path, train_samples: int = 3000, val_samples: int = 250,
                                 samples_per_shard: int = 500, seed: int = 0, image_size: int = 64,
                                 modalities: tuple[str, ...] = DISJOINT_MODALITIES) -> dict:
    """One paired set per modality under `out_dir/<modality>/{train,val}/` (`train_samples` / `val_samples`
    each) and `out_dir/classes.json`. Returns {"train": the sets' patterns joined with '::' (one `data.train`
    source each, in `modalities` order), "val": likewise, "classes", "modalities"}. Each set is reused when
    complete with the same settings."""
    out = Path(out_dir)
    train, val, classes = [], [], ""
    for m in modalities:
        settings = {"train_samples": train_samples, "val_samples": val_samples,
                    "samples_per_shard": samples_per_shard, "seed": seed, "image_size": image_size,
                    "modality": m, "version": 1}
        paths = write_demo_splits(out / m, "paired_demo.json", settings, samples_per_shard,
                                  lambda split, i, m=m: render_paired_sample(m, seed, split, i, image_size))
        train.append(paths["train"])
        val.append(paths["val"])
        classes = Path(paths["classes"]).read_text()  # the same for every set: the demo world's classes
    (out / "classes.json").write_text(classes)
    return {"train": "::".join(train), "val": "::".join(val), "classes": str(out / "classes.json"),
            "modalities": list(modalities)}
