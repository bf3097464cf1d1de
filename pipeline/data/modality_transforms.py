"""Transforms from a decoded non-image member (`pipeline.data.modalities`) to an encoder input
(`pipeline.models.imagebind`): audio to log-mel clips, depth to standardised disparity, thermal and IMU to their
encoders' shapes. Random crops and clip starts draw from torch's global generator, which the loader seeds per
sample, so a resumed run draws the same ones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.modalities import DEFAULT_SAMPLE_RATE, MODALITY_MEMBERS, depth_to_disparity


def _resize_crop(x: torch.Tensor, size: int, train: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(H, W) -> (size, size): shorter side to `size` (antialiased bilinear), then a centre crop (eval) or a
    uniformly random crop (train, drawn from torch's global RNG, which the loader seeds per sample). With a
    validity mask, values are resized as a mask-weighted average so invalid pixels (0) do not bleed in; the
    result is 0 where fewer than half of the contributing pixels were valid."""
    h, w = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))

    def rs(t):
        return F.interpolate(t[None, None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0, 0]

    if valid is None:
        y = rs(x)
    else:
        m = rs(valid.float())
        y = torch.where(m > 0.5, rs(x * valid) / m.clamp_min(1e-6), torch.zeros(()))
    if train:
        top = int(torch.randint(0, nh - size + 1, ()).item())
        left = int(torch.randint(0, nw - size + 1, ()).item())
    else:
        top, left = (nh - size) // 2, (nw - size) // 2
    return y[top:top + size, left:left + size]


class AudioTransform:
    """Mono waveform (T,) -> log-mel clips for the audio encoder (`pipeline.models.audio_features`).
    train: one clip at a random start (torch's global RNG) -> (1, n_mels, target_frames);
    eval: `clips` evenly spaced clips -> (clips, 1, n_mels, target_frames) (the encoder averages them)."""

    def __init__(self, sample_rate: int = DEFAULT_SAMPLE_RATE, clip_seconds: float = 2.0, clips: int = 3,
                 n_mels: int = 128, target_frames: int = 204, train: bool = True):
        self.kw = dict(sample_rate=sample_rate, clip_seconds=clip_seconds, n_mels=n_mels, target_frames=target_frames)
        self.clips, self.train = clips, train

    def __call__(self, waveform: np.ndarray) -> torch.Tensor:
        from pipeline.models.audio_features import audio_clips

        if self.train:
            return audio_clips(torch.as_tensor(waveform), clips=1, random_start=True, **self.kw)[0]
        return audio_clips(torch.as_tensor(waveform), clips=self.clips, random_start=False, **self.kw)


class DepthTransform:
    """Metric depth (H, W) -> (1, size, size): disparity (`depth_to_disparity`), resized + cropped with the
    invalid pixels masked out, then standardised per map over its valid pixels (mean 0, std 1; invalid
    pixels 0), so that only the shape of the scene, not its absolute scale, reaches the encoder."""

    def __init__(self, size: int = 224, focal_baseline: float = 1.0, train: bool = True):
        self.size, self.focal_baseline, self.train = size, focal_baseline, train

    def __call__(self, depth: np.ndarray) -> torch.Tensor:
        disp = depth_to_disparity(depth, self.focal_baseline)
        valid = disp > 0
        disp = _resize_crop(disp, self.size, self.train, valid)
        v = disp > 0
        if v.sum() > 1:
            mean, std = disp[v].mean(), disp[v].std()
            disp = torch.where(v, (disp - mean) / (std + 1e-6), torch.zeros(()))
        return disp[None].contiguous()


class ThermalTransform:
    """Thermal (H, W) in [0, 1] -> (1, size, size), resized + cropped, normalised as (x - 0.5) / 0.5."""

    def __init__(self, size: int = 224, train: bool = True):
        self.size, self.train = size, train

    def __call__(self, thermal: np.ndarray) -> torch.Tensor:
        t = _resize_crop(torch.as_tensor(thermal, dtype=torch.float32), self.size, self.train)
        return ((t - 0.5) / 0.5)[None].contiguous()


class IMUTransform:
    """(T, 6) -> (6, steps) as ImageBind's IMU encoder takes it: a window of `steps` rows (random start in
    training, centred in evaluation), zero-padded at the end when shorter; values divided by `scale`."""

    def __init__(self, steps: int = 2000, scale: float = 1.0, train: bool = True):
        self.steps, self.scale, self.train = steps, scale, train

    def __call__(self, imu: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(imu, dtype=torch.float32)
        extra = x.shape[0] - self.steps
        if extra > 0:
            start = int(torch.randint(0, extra + 1, ()).item()) if self.train else extra // 2
            x = x[start:start + self.steps]
        elif extra < 0:
            x = F.pad(x, (0, 0, 0, -extra))
        return (x.T / self.scale).contiguous()


def make_modality_transform(modality: str, encoder_config, train: bool, **options):
    """The transform matching an encoder's `EncoderConfig` (input size / mel bins / frames / IMU steps)."""
    size = encoder_config.input_size
    if modality == "audio":
        return AudioTransform(n_mels=size[0], target_frames=size[1], train=train, **options)
    if modality == "depth":
        assert size[0] == size[1], "depth encoders take square maps"
        return DepthTransform(size=size[0], train=train, **options)
    if modality == "thermal":
        assert size[0] == size[1], "thermal encoders take square maps"
        return ThermalTransform(size=size[0], train=train)
    if modality == "imu":
        return IMUTransform(steps=size[1], train=train, **options)
    raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITY_MEMBERS)}")
