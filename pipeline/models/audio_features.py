"""Log-mel filterbank features and clip sampling for the audio encoder, in plain torch (no torchaudio).

The convention is Kaldi's `compute-fbank-feats` as ImageBind uses it (through torchaudio's Kaldi compliance
`fbank` with `htk_compat=True, use_energy=False, window_type="hanning", dither=0.0, num_mel_bins=128,
frame_length=25, frame_shift=10` at 16 kHz), written out here from the definitions:

1. frames of `win_ms` (25 ms = 400 samples) every `hop_ms` (10 ms = 160 samples); only whole frames
   ("snip edges"): F = 1 + (T - 400) // 160 frames, none if T < 400;
2. per frame: subtract the frame's mean (DC offset), pre-emphasis x[i] - 0.97 x[i-1] (x[-1] := x[0]), a
   symmetric Hann window 0.5 - 0.5 cos(2 pi n / (N - 1)), zero-padding to the next power of two (512);
3. power spectrum |rfft|^2;
4. a mel filterbank of `n_mels` triangles equally spaced on the mel scale mel(f) = 1127 ln(1 + f / 700) between
   `low_freq` (20 Hz) and `high_freq` (0 = Nyquist); each triangle rises and falls linearly *in mel* over its
   two neighbours' centres, with peak 1 (no area normalisation); the Nyquist bin gets weight 0;
5. natural log of max(energy, float32 epsilon).

Result: (n_mels, F). ImageBind then pads (with 0) or crops to 204 frames for a 2 s clip and normalises with the
AudioSet statistics mean -4.268, std 9.138: `audio_clips` does exactly this.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUDIOSET_MEAN, AUDIOSET_STD = -4.268, 9.138
FLOAT_EPS = torch.finfo(torch.float32).eps


def mel_scale(freq: torch.Tensor | float) -> torch.Tensor:
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, low_freq: float = 20.0,
                   high_freq: float = 0.0) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float64 Kaldi-style triangular filters; `high_freq` <= 0 counts from Nyquist."""
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"mel band [{low_freq}, {high}] Hz does not fit below Nyquist {nyquist} Hz")
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high)
    delta = (mel_high - mel_low) / (n_mels + 1)
    left = mel_low + delta * torch.arange(n_mels, dtype=torch.float64)[:, None]
    center, right = left + delta, left + 2 * delta
    bins = mel_scale(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)[None, :]
    up, down = (bins - left) / (center - left), (right - bins) / (right - center)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(fb, (0, 1))  # the Nyquist bin


def log_mel_spectrogram(waveform: torch.Tensor, sample_rate: int = 16_000, n_mels: int = 128, win_ms: float = 25.0,
                        hop_ms: float = 10.0, preemphasis: float = 0.97, low_freq: float = 20.0,
                        high_freq: float = 0.0, remove_dc_offset: bool = True) -> torch.Tensor:
    """(..., T) waveform -> (..., n_mels, F) log-mel energies, float32 (computed in float64). Convention: see the
    module docstring."""
    x = torch.as_tensor(waveform).to(torch.float64)
    win, hop = int(sample_rate * win_ms / 1000), int(sample_rate * hop_ms / 1000)
    n_fft = 1 << (win - 1).bit_length()
    lead = x.shape[:-1]
    if x.shape[-1] < win:
        return torch.empty(*lead, n_mels, 0)
    frames = x.unfold(-1, win, hop)  # (..., F, win)
    if remove_dc_offset:
        frames = frames - frames.mean(-1, keepdim=True)
    if preemphasis:
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * prev
    n = torch.arange(win, dtype=torch.float64)
    frames = frames * (0.5 - 0.5 * torch.cos(2 * math.pi * n / (win - 1)))
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # (..., F, n_fft//2+1)
    mel = power @ mel_filterbank(n_mels, n_fft, sample_rate, low_freq, high_freq).T
    return torch.log(mel.clamp(min=FLOAT_EPS)).transpose(-1, -2).float()


def num_frames(num_samples: int, sample_rate: int = 16_000, win_ms: float = 25.0, hop_ms: float = 10.0) -> int:
    win, hop = int(sample_rate * win_ms / 1000), int(sample_rate * hop_ms / 1000)
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


def pad_or_crop_frames(spec: torch.Tensor, target_frames: int, value: float = 0.0) -> torch.Tensor:
    """(..., n_mels, F) -> (..., n_mels, target_frames): zeros appended at the end, or the first frames kept."""
    f = spec.shape[-1]
    if f < target_frames:
        return F.pad(spec, (0, target_frames - f), value=value)
    return spec[..., :target_frames]


def clip_starts(num_samples: int, clip_samples: int, clips: int) -> list[int]:
    """Start samples of `clips` evenly spaced clips: the first at 0, the last ending at the end of the audio
    (all at 0 when the audio is no longer than one clip)."""
    room = max(0, num_samples - clip_samples)
    if clips == 1:
        return [room // 2]
    return [round(i * room / (clips - 1)) for i in range(clips)]


def audio_clips(waveform: torch.Tensor, sample_rate: int = 16_000, clip_seconds: float = 2.0, clips: int = 3,
                n_mels: int = 128, target_frames: int = 204, random_start: bool = False,
                mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD) -> torch.Tensor:
    """Mono (T,) -> (clips, 1, n_mels, target_frames), ImageBind's audio input.

    Each clip is `clip_seconds` of audio (less when the audio is shorter: nothing is padded in the waveform),
    its mean subtracted, turned into log-mel frames, padded with 0 / cropped to `target_frames` (2 s -> 198
    frames -> 204 with ImageBind's padding) and normalised as (x - mean) / std. Clips are evenly spaced
    (`clip_starts`); with `random_start` (training) and `clips=1`, the start is uniform over the possible
    starts, drawn from torch's global RNG (the loader seeds it per sample)."""
    x = torch.as_tensor(waveform, dtype=torch.float32).reshape(-1)
    clip_len = int(round(clip_seconds * sample_rate))
    if random_start:
        if clips != 1:
            raise ValueError("random_start samples a single clip")
        starts = [int(torch.randint(0, max(0, x.shape[0] - clip_len) + 1, ()).item())]
    else:
        starts = clip_starts(x.shape[0], clip_len, clips)
    out = []
    for s in starts:
        seg = x[s:s + clip_len]
        spec = log_mel_spectrogram(seg - seg.mean(), sample_rate, n_mels)
        out.append((pad_or_crop_frames(spec, target_frames) - mean) / std)
    return torch.stack(out)[:, None]
