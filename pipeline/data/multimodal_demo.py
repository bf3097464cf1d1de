"""The demo dataset with two more modalities per sample, for ImageBind-style binding.

Every sample of `pipeline.data.demo_dataset` (same picture, caption and class for the same (seed, split,
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

`classes.json` is the demo's ({"classes", "templates"}): the text prompts for emergent zero-shot.
"""
from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.demo_dataset import COLOURS, SHAPES, SIZES, SPLIT_IDS, render_sample, write_demo_splits

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
