import io
import sys
import pathlib
import struct
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.loader import BadSample
from pipeline.data.modalities import (decode_audio, decode_depth, decode_imu, decode_modality, decode_thermal,
                                      depth_to_disparity, parse_wav, resample)
from pipeline.data.modality_transforms import AudioTransform, DepthTransform, IMUTransform, ThermalTransform


def pcm_wav(x: np.ndarray, rate: int, width: int) -> bytes:
    """x (frames, channels) in [-1, 1) -> PCM WAV written by the stdlib `wave` module."""
    bits = 8 * width
    q = np.round(x * 2 ** (bits - 1)).clip(-2 ** (bits - 1), 2 ** (bits - 1) - 1).astype(np.int64)
    if width == 1:
        data = (q + 128).astype(np.uint8).tobytes()
    elif width == 3:
        u = (q & 0xFFFFFF).astype(np.uint32)
        data = np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], -1).astype(np.uint8).tobytes()
    else:
        data = q.astype("<i2" if width == 2 else "<i4").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)
    return buf.getvalue()


def riff(fmt_code: int, channels: int, rate: int, bits: int, data: bytes, extensible: bool = False) -> bytes:
    """A WAV built by hand (for encodings `wave` cannot write: IEEE float, EXTENSIBLE, A-law)."""
    block = channels * bits // 8
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0)
        fmt += struct.pack("<H", fmt_code) + guid_tail
    else:
        fmt = struct.pack("<HHIIHH", fmt_code, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\x00"
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(n: int, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float64)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_wav_widths(width):
    x = tone(4000, 16000)[:, None]
    out = decode_audio(pcm_wav(x, 16000, width), "wav")
    assert out.value.dtype == np.float32 and out.value.shape == (4000,) and out.conversions == ()
    np.testing.assert_allclose(out.value, x[:, 0], atol=1.01 / 2 ** (8 * width - 1) + 1e-7)


def test_float_and_extensible_wav():
    x = tone(3200, 16000).astype(np.float32)
    out = decode_audio(riff(3, 1, 16000, 32, x.astype("<f4").tobytes()), "wav")
    np.testing.assert_array_equal(out.value, x)
    out = decode_audio(riff(3, 1, 16000, 64, x.astype("<f8").tobytes(), extensible=True), "wav")
    np.testing.assert_array_equal(out.value, x)
    q = np.round(x * 32768).astype("<i2")
    out = decode_audio(riff(1, 1, 16000, 16, q.tobytes(), extensible=True), "wav")
    np.testing.assert_allclose(out.value, q / 32768.0, atol=0)


def test_stereo_is_mixed_to_mono():
    left, right = tone(3200, 16000, 440), tone(3200, 16000, 660, 0.25)
    out = decode_audio(pcm_wav(np.stack([left, right], 1), 16000, 2), "wav")
    assert out.conversions == ("audio_downmix",)
    np.testing.assert_allclose(out.value, (left + right) / 2, atol=2 / 32768)
    frames, rate = parse_wav(pcm_wav(np.stack([left, right], 1), 16000, 2))
    assert frames.shape == (3200, 2) and rate == 16000


def test_resample_44k1_to_16k_against_analytic_and_scipy():
    rate_in, n = 44100, 44100
    t_in = np.arange(n) / rate_in
    freqs, amps = (440.0, 1234.5, 3000.0, 6000.0), (0.3, 0.2, 0.2, 0.1)
    x = sum(a * np.sin(2 * np.pi * f * t_in + f / 1000) for f, a in zip(freqs, amps))
    out = decode_audio(pcm_wav(x[:, None], rate_in, 4), "wav")
    assert out.conversions == ("audio_resample",)
    y = out.value
    assert y.shape == (16000,)
    t_out = np.arange(16000) / 16000
    truth = sum(a * np.sin(2 * np.pi * f * t_out + f / 1000) for f, a in zip(freqs, amps))
    inner = slice(200, -200)  # away from the zero-padded ends
    assert np.abs(y[inner] - truth[inner]).max() < 2e-3
    signal = pytest.importorskip("scipy.signal")
    ref = signal.resample_poly(x, 160, 441)
    assert np.abs(y[inner] - ref[inner]).max() < 2e-3
    # out-of-band content (a 12 kHz tone cannot exist at 16 kHz) is removed, not aliased to 4 kHz
    alias = resample(np.sin(2 * np.pi * 12000 * t_in), rate_in, 16000).numpy()
    assert np.abs(alias[inner]).max() < 5e-3


def test_resample_identity_and_upsampling():
    x = tone(800, 8000, 300)
    np.testing.assert_array_equal(resample(x, 8000, 8000).numpy(), x.astype(np.float32))
    y = resample(x, 8000, 16000).numpy()
    truth = tone(1600, 16000, 300)
    assert y.shape == (1600,) and np.abs(y[100:-100] - truth[100:-100]).max() < 2e-3
    # a ratio with no common factor (16000 phases: the gather path) and an integer one (48k -> 16k)
    for rate in (44099, 48000):
        x = tone(rate // 4, rate, 1000)
        y = resample(x, rate, 16000).numpy()
        assert y.shape == (4000,) and np.abs(y[200:-200] - tone(4000, 16000, 1000)[200:-200]).max() < 2e-3


def test_bad_audio():
    good = pcm_wav(tone(4000, 16000)[:, None], 16000, 2)
    for broken in (good[:-100], good[:30], b"RIFF\x00\x00\x00\x00WAVE", b"not a wav at all", b""):
        with pytest.raises(BadSample) as e:
            decode_audio(broken, "wav")
        assert e.value.reason == "bad_audio"
    nan = np.full(4000, np.nan, dtype="<f4")
    with pytest.raises(BadSample, match="bad_audio"):
        decode_audio(riff(3, 1, 16000, 32, nan.tobytes()), "wav")
    with pytest.raises(BadSample, match="unsupported_audio"):  # A-law
        decode_audio(riff(6, 1, 8000, 8, bytes(800)), "wav")
    with pytest.raises(BadSample, match="unsupported_audio"):
        decode_audio(b"ID3....", "mp3")
    with pytest.raises(BadSample, match="audio_too_short"):  # 50 ms < min_seconds 0.1
        decode_audio(pcm_wav(tone(800, 16000)[:, None], 16000, 2), "wav")


def test_flac_without_soundfile_is_refused_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # as if the optional package were not installed
    with pytest.raises(BadSample, match="unsupported_audio"):
        decode_audio(b"fLaC\x00\x00\x00\x22", "flac")


def test_flac_decodes_with_soundfile():
    soundfile = pytest.importorskip("soundfile", reason="FLAC needs the optional soundfile package")
    x = tone(8000, 16000)
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([x, x], 1), 22050, format="FLAC", subtype="PCM_16")
    out = decode_audio(buf.getvalue(), "flac")
    assert out.conversions == ("audio_downmix", "audio_resample") and out.value.shape == (5805,)
    with pytest.raises(BadSample, match="bad_audio"):
        decode_audio(buf.getvalue()[:200], "flac")


def png16(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_depth_png_and_npy():
    mm = np.array([[0, 1000, 2500], [65535, 1, 300]], dtype=np.uint16)
    out = decode_depth(png16(mm), "depth.png")
    assert out.value.dtype == np.float32 and out.conversions == ()
    np.testing.assert_allclose(out.value, mm / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(decode_depth(png16(mm), "depth.png", depth_scale=256).value, mm / 256.0, rtol=1e-6)
    metres = np.array([[0.0, 1.5], [2.25, 10.0]], dtype=np.float32)
    np.testing.assert_array_equal(decode_depth(npy(metres), "depth.npy").value, metres)
    np.testing.assert_allclose(decode_depth(npy(mm), "depth.npy").value, mm / 1000.0, rtol=1e-6)
    disp = depth_to_disparity(decode_depth(npy(metres), "depth.npy").value, focal_baseline=3.0)
    np.testing.assert_allclose(disp.numpy(), [[0.0, 2.0], [3.0 / 2.25, 0.3]], rtol=1e-6)


def test_bad_depth():
    nan = np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32)
    for bad in (nan, np.array([[1.0, np.inf]]), np.array([[1.0, -2.0]]), np.zeros((3, 3)),
                np.ones((2, 2, 3)), np.array(["a", "b"])):
        with pytest.raises(BadSample) as e:
            decode_depth(npy(bad), "depth.npy")
        assert e.value.reason == "bad_depth"
    out = decode_depth(npy(nan), "depth.npy", nonfinite="missing")
    assert out.conversions == ("depth_nonfinite_to_missing",) and out.value[0, 1] == 0
    rgb = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(rgb, format="PNG")
    for raw in (rgb.getvalue(), png16(np.ones((4, 4)))[:40], b"\x93NUMPY garbage"):
        with pytest.raises(BadSample, match="bad_depth"):
            decode_depth(raw, "depth.png" if raw[:1] != b"\x93" else "depth.npy")


class _Touch:
    """Unpickling this object creates the file at `path` (a stand-in for an arbitrary-code payload)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_pickled_npy_is_refused_and_never_unpickled(tmp_path):
    # the payload is real: unpickling it (allow_pickle=True, what we never do) creates its file
    proof = tmp_path / "proof"
    np.load(io.BytesIO(npy(np.array([_Touch(proof)], dtype=object))), allow_pickle=True)
    assert proof.exists()
    for i, (decode, ext, reason) in enumerate([(decode_depth, "depth.npy", "bad_depth"), (decode_imu, "imu.npy", "bad_imu"),
                                                (decode_thermal, "thermal.npy", "bad_thermal")]):
        marker = tmp_path / f"pwned{i}"
        with pytest.raises(BadSample) as e:
            decode(npy(np.array([_Touch(marker)], dtype=object)), ext)
        assert e.value.reason == reason
        assert not marker.exists()


def test_thermal_and_imu():
    g16 = (np.arange(12).reshape(3, 4) * 5000).astype(np.uint16)
    np.testing.assert_allclose(decode_thermal(png16(g16), "thermal.png").value, g16 / 65535.0, rtol=1e-6)
    rgb = io.BytesIO()
    Image.new("RGB", (5, 4), (30, 60, 90)).save(rgb, format="PNG")
    out = decode_thermal(rgb.getvalue(), "thermal.png")
    assert out.conversions == ("thermal_to_gray",) and np.allclose(out.value, 60 / 255)
    imu = np.random.default_rng(0).normal(size=(100, 6)).astype(np.float32)
    np.testing.assert_array_equal(decode_imu(npy(imu)).value, imu)
    for bad in (imu.T, imu[:4], np.where(imu > 2, np.nan, imu)):
        with pytest.raises(BadSample, match="bad_imu"):
            decode_imu(npy(bad))


def test_decode_modality_picks_members():
    wav = pcm_wav(tone(4000, 16000)[:, None], 16000, 2)
    assert decode_modality({"jpg": b"", "wav": wav}, "audio").value.shape == (4000,)
    with pytest.raises(BadSample, match="missing_depth"):
        decode_modality({"jpg": b"", "wav": wav}, "depth")
    with pytest.raises(ValueError):
        decode_modality({}, "smell")


def test_transforms_shapes_and_determinism():
    depth = np.full((30, 50), 2.0, dtype=np.float32)
    depth[10:20, 20:30] = 1.0
    depth[0, :] = 0  # missing
    x = DepthTransform(size=16, train=False)(depth)
    assert x.shape == (1, 16, 16) and torch.isfinite(x).all()
    v = x[x != 0]
    assert abs(v.mean().item()) < 1e-4 and abs(v.std().item() - 1) < 1e-3
    torch.manual_seed(3)
    a = DepthTransform(size=16, train=True)(depth)
    torch.manual_seed(3)
    assert torch.equal(a, DepthTransform(size=16, train=True)(depth))
    assert ThermalTransform(size=8, train=False)(np.full((10, 12), 0.5, np.float32)).abs().max() < 1e-6
    assert IMUTransform(steps=64, train=False)(np.ones((40, 6), np.float32)).shape == (6, 64)
    assert IMUTransform(steps=32, train=True)(np.ones((40, 6), np.float32)).shape == (6, 32)
    wav = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    assert AudioTransform(clip_seconds=1.0, n_mels=64, target_frames=100, train=True)(wav).shape == (1, 64, 100)
    assert AudioTransform(clip_seconds=0.5, clips=3, n_mels=64, target_frames=50, train=False)(wav).shape == (3, 1, 64, 50)
