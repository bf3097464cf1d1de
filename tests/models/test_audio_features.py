import math

import numpy as np
import pytest
import torch

from pipeline.models.audio_features import (AUDIOSET_MEAN, AUDIOSET_STD, audio_clips, clip_starts, log_mel_spectrogram,
                                            mel_filterbank, num_frames)


def numpy_fbank(x: np.ndarray, rate: int, n_mels: int, win: int, hop: int, low: float = 20.0) -> np.ndarray:
    """The Kaldi fbank convention written independently: a frame loop, numpy rfft, filters built bin by bin."""
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    n_frames = 1 + (len(x) - win) // hop
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (win - 1)) for i in range(win)])

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(low), mel(rate / 2)
    step = (hi - lo) / (n_mels + 1)
    fb = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for b in range(n_fft // 2):  # the Nyquist bin stays 0
            v = mel(b * rate / n_fft)
            if left < v < right:
                fb[m, b] = (v - left) / (centre - left) if v <= centre else (right - v) / (right - centre)
    out = np.zeros((n_mels, n_frames))
    for f in range(n_frames):
        frame = x[f * hop:f * hop + win].astype(np.float64)
        frame = frame - frame.mean()
        shifted = np.concatenate([[frame[0]], frame[:-1]])
        frame = (frame - 0.97 * shifted) * hann
        power = np.abs(np.fft.rfft(frame, n=n_fft)) ** 2
        out[:, f] = np.log(np.maximum(fb @ power, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("rate,n_mels", [(16000, 128), (8000, 40)])
def test_log_mel_matches_numpy_reference(rate, n_mels):
    rng = np.random.default_rng(0)
    t = np.arange(int(0.5 * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 700 * t) + 0.05 * rng.normal(size=t.shape)
    x[: rate // 20] = 0.0  # digital silence: exercises the epsilon floor
    ours = log_mel_spectrogram(torch.tensor(x), rate, n_mels).numpy()
    ref = numpy_fbank(x, rate, n_mels, int(rate * 0.025), int(rate * 0.010))
    assert ours.shape == ref.shape == (n_mels, num_frames(len(x), rate))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_batched_and_frame_counts():
    x = torch.randn(2, 3, 16000)
    spec = log_mel_spectrogram(x, n_mels=64)
    assert spec.shape == (2, 3, 64, 98) and spec.dtype == torch.float32
    torch.testing.assert_close(spec[1, 2], log_mel_spectrogram(x[1, 2], n_mels=64))
    assert num_frames(32000) == 198 and num_frames(399) == 0
    assert log_mel_spectrogram(torch.zeros(399)).shape == (128, 0)


def test_tone_lands_in_its_mel_band():
    rate = 16000
    fb = mel_filterbank(128, 512, rate)
    for freq in (300.0, 1000.0, 4000.0):
        x = torch.sin(2 * math.pi * freq * torch.arange(rate) / rate)
        peak = log_mel_spectrogram(x).mean(1).argmax().item()
        b = round(freq * 512 / rate)
        assert fb[peak, b - 1:b + 2].max() > 0.3  # the loudest band covers the tone's FFT bins


def test_audio_clips_imagebind_layout():
    rate = 16000
    x = torch.randn(5 * rate) * 0.1
    clips = audio_clips(x, rate, clip_seconds=2.0, clips=3)
    assert clips.shape == (3, 1, 128, 204)
    assert clip_starts(5 * rate, 2 * rate, 3) == [0, 24000, 48000]
    # frames 198..203 are ImageBind's zero padding of the log-mel, normalised
    pad = (0.0 - AUDIOSET_MEAN) / AUDIOSET_STD
    assert torch.allclose(clips[:, :, :, 198:], torch.full_like(clips[:, :, :, 198:], pad))
    seg = x[48000:80000]
    expected = (log_mel_spectrogram(seg - seg.mean())[:, :198] - AUDIOSET_MEAN) / AUDIOSET_STD
    torch.testing.assert_close(clips[2, 0, :, :198], expected)
    short = audio_clips(torch.randn(rate // 2), rate, clip_seconds=2.0, clips=2, n_mels=64, target_frames=100)
    assert short.shape == (2, 1, 64, 100) and torch.equal(short[0], short[1])  # both clips = the whole audio
    torch.manual_seed(0)
    a = audio_clips(x, rate, clips=1, random_start=True)
    torch.manual_seed(0)
    assert torch.equal(a, audio_clips(x, rate, clips=1, random_start=True))
