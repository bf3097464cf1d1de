"""Allow-list decoders for the non-image members of a sample (audio, depth, thermal, IMU). The transforms that
turn a decoded member into an encoder input are in `pipeline.data.modality_transforms`.

Every decoder takes the member's bytes and its extension, returns `Decoded(value, conversions)` and raises
`pipeline.data.errors.BadSample(reason)` on bad data. `conversions` names what was changed on the way (a stereo
file mixed down, a sample rate converted, ...) so the loader can count it next to the bad-sample reasons.
Nothing is ever unpickled: `.npy` members are read with `np.load(allow_pickle=False)`, which refuses object
arrays before touching their pickle payload.

Members and decoders (`MODALITY_MEMBERS` lists them; `decode_modality` picks the member of a sample):

| modality | members | value |
| --- | --- | --- |
| audio | `wav`, `flac` | mono float32 (T,) at `sample_rate` (16 kHz), see `decode_audio` |
| depth | `depth.png` (16-bit), `depth.npy` | float32 (H, W) metric depth in metres, 0 = no measurement |
| thermal | `thermal.png`, `thermal.jpg`, `thermal.npy` | float32 (H, W) in [0, 1] (npy: as stored) |
| imu | `imu.npy` | float32 (T, 6): 3 accelerometer + 3 gyroscope axes |

Bad-sample reasons: `missing_<modality>`, `bad_audio`, `unsupported_audio`, `audio_too_short`, `bad_depth`,
`bad_thermal`, `bad_imu`.
Conversion names: `audio_downmix` (several channels -> their mean), `audio_resample` (sample rate changed),
`depth_nonfinite_to_missing` (only with `nonfinite="missing"`), `thermal_to_gray` (a colour image averaged to one
channel).
"""
from __future__ import annotations

import functools
import io
import math
import struct
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.errors import BadSample

AUDIO_EXTS = ("wav", "flac")
DEPTH_EXTS = ("depth.png", "depth.npy")
THERMAL_EXTS = ("thermal.png", "thermal.jpg", "thermal.npy")
IMU_EXTS = ("imu.npy",)
MODALITY_MEMBERS = {"audio": AUDIO_EXTS, "depth": DEPTH_EXTS, "thermal": THERMAL_EXTS, "imu": IMU_EXTS}

DEFAULT_SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 600.0  # refuse members that would decode to more than 10 minutes (memory bombs)
MAX_MAP_PIXELS = 8192 * 8192


class Decoded(NamedTuple):
    value: np.ndarray
    conversions: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------- audio

_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """RIFF/WAVE bytes -> (float32 samples (frames, channels), sample rate), no resampling or mixing.

    Supported: PCM integer 8 (unsigned), 16, 24 and 32 bit, IEEE float 32 and 64 bit, both also inside
    WAVE_FORMAT_EXTENSIBLE. Integers are scaled to [-1, 1) by 2^(bits-1). The header is parsed here rather than
    with the stdlib `wave` module because `wave` refuses IEEE float (and, before Python 3.12, EXTENSIBLE) files
    and silently returns fewer frames for a truncated file; here a data chunk shorter than its header says, a
    partial frame, or a missing fmt/data chunk is `bad_audio`, other encodings (A-law, ADPCM, ...) are
    `unsupported_audio`. A data size of 0xFFFFFFFF (streamed writers) means "to the end of the file".
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise BadSample("unsupported_audio" if data[:4] == b"RF64" else "bad_audio")
    pos, fmt, samples = 12, None, None
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk_id == b"data":
            if size == 0xFFFFFFFF:
                size = len(data) - body
            if body + size > len(data):
                raise BadSample("bad_audio")  # truncated
            samples = data[body:body + size]
            break
        if body + size > len(data):
            raise BadSample("bad_audio")
        if chunk_id == b"fmt ":
            if size < 16:
                raise BadSample("bad_audio")
            fmt = struct.unpack_from("<HHIIHH", data, body)
            if fmt[0] == _WAVE_FORMAT_EXTENSIBLE:
                if size < 40:
                    raise BadSample("bad_audio")
                sub_format = struct.unpack_from("<H", data, body + 24)[0]  # first 2 bytes of the sub-format GUID
                fmt = (sub_format,) + fmt[1:]
        pos = body + size + (size & 1)  # chunks are padded to an even size
    if fmt is None or samples is None:
        raise BadSample("bad_audio")
    code, channels, rate, _, block_align, bits = fmt
    if channels == 0 or not 1000 <= rate <= 768_000 or bits % 8 or block_align != channels * bits // 8:
        raise BadSample("bad_audio")
    width = bits // 8
    if code == _WAVE_FORMAT_PCM and width in (1, 2, 3, 4):
        pass
    elif code == _WAVE_FORMAT_FLOAT and width in (4, 8):
        pass
    else:
        raise BadSample("unsupported_audio")
    if len(samples) == 0 or len(samples) % block_align:
        raise BadSample("bad_audio")
    if len(samples) // block_align > MAX_AUDIO_SECONDS * rate:
        raise BadSample("bad_audio")
    if code == _WAVE_FORMAT_FLOAT:
        x = np.frombuffer(samples, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:
        x = (np.frombuffer(samples, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        b = np.frombuffer(samples, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        x = np.frombuffer(samples, dtype="<i2" if width == 2 else "<i4").astype(np.float64)
        x = (x / float(1 << (bits - 1))).astype(np.float32)
    return x.reshape(-1, channels), rate


def _decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC through `soundfile` (libsndfile, shipped inside its wheel) when it is installed."""
    try:
        import soundfile
    except ImportError:
        raise BadSample("unsupported_audio") from None  # flac needs the optional `soundfile` package
    if data[:4] != b"fLaC":
        raise BadSample("bad_audio")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            if f.frames > MAX_AUDIO_SECONDS * f.samplerate:
                raise BadSample("bad_audio")
            x = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except BadSample:
        raise
    except Exception:
        raise BadSample("bad_audio") from None
    if x.size == 0:
        raise BadSample("bad_audio")
    return x, rate


@functools.lru_cache(maxsize=16)
def _sinc_weights(orig: int, new: int, zero_crossings: int, rolloff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(taps offsets (K,), weights (phases, K) float32) of the resampling filter, one row per output phase."""
    c = rolloff * min(1.0, new / orig)
    half = zero_crossings / c  # half width of the filter in input samples
    taps = torch.arange(-math.ceil(half), math.ceil(half) + 1, dtype=torch.int64)
    frac = (torch.arange(new, dtype=torch.int64) * orig % new).double() / new  # u - floor(u) of each phase
    t = frac[:, None] - taps[None, :].double()
    w = c * torch.sinc(c * t) * torch.where(t.abs() <= half, 0.5 + 0.5 * torch.cos(math.pi * t / half), 0.0)
    return taps, w.float()


def resample(waveform: np.ndarray | torch.Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 16,
             rolloff: float = 0.945, chunk: int = 32768) -> torch.Tensor:
    """Band-limited resampling of the last axis by windowed-sinc interpolation (a polyphase filter).

    Output sample n sits at input position u = n * orig/new; its value is sum_i x[i] h(u - i) with
    h(t) = c sinc(c t) w(t), the cut-off c = rolloff * min(1, new/orig) (as a fraction of the input Nyquist
    rate: anti-aliasing when downsampling) and w a Hann window spanning `zero_crossings` zero crossings of
    the sinc on each side. With the rates reduced by their gcd, u - floor(u) takes only `new` values, so the
    filter is one row of weights per output phase (computed once in float64, cached), applied by gathering
    the input around floor(u). Samples outside the input are zero. Output length ceil(T * new / orig), float32.
    """
    x = torch.as_tensor(waveform)
    if orig_rate == new_rate:
        return x.float()
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    taps, weights = _sinc_weights(orig, new, zero_crossings, float(rolloff))
    lead, t_in = x.shape[:-1], x.shape[-1]
    pad = len(taps)
    xp = F.pad(x.reshape(-1, t_in).float(), (pad, pad + 1))  # input index i is i + pad here
    n_out = math.ceil(t_in * new / orig)
    if new <= 1024:  # few phases: per phase, its outputs' input windows are a strided view (step orig)
        y = xp.new_empty(xp.shape[0], n_out)
        for p in range(min(new, n_out)):
            count = (n_out - 1 - p) // new + 1
            start = p * orig // new + int(taps[0]) + pad
            if new <= 16:  # long runs per phase: a strided convolution, no copy of the windows
                y[:, p::new] = F.conv1d(xp[:, None, start:], weights[p].view(1, 1, -1), stride=orig)[:, 0, :count]
            else:
                y[:, p::new] = xp[:, start:].unfold(-1, len(taps), orig)[:, :count] @ weights[p]
        return y.reshape(*lead, n_out)
    out = []
    for start in range(0, n_out, chunk):
        n = torch.arange(start, min(n_out, start + chunk), dtype=torch.int64)
        base = n * orig // new
        out.append((xp[:, base[:, None] + taps[None, :] + pad] * weights[n % new]).sum(-1))
    return torch.cat(out, dim=-1).reshape(*lead, n_out)


def decode_audio(raw: bytes, ext: str, sample_rate: int = DEFAULT_SAMPLE_RATE, min_seconds: float = 0.1) -> Decoded:
    """A `.wav` / `.flac` member -> mono float32 (T,) at `sample_rate`.

    Several channels are mixed down to their mean (`audio_downmix`); another sample rate is converted with
    `resample` (windowed-sinc, `audio_resample`). Rules: unparseable or truncated -> `bad_audio`; NaN or inf
    samples -> `bad_audio`; a valid encoding we do not decode (A-law, ADPCM, FLAC without `soundfile`, mp3,
    ogg) -> `unsupported_audio`; shorter than `min_seconds` -> `audio_too_short`. Anything at least
    `min_seconds` long is accepted: the spectrogram clip sampler pads short clips (`audio_clips`).
    """
    if ext == "wav":
        x, rate = parse_wav(raw)
    elif ext == "flac":
        x, rate = _decode_flac(raw)
    else:
        raise BadSample("unsupported_audio")
    if not np.isfinite(x).all():
        raise BadSample("bad_audio")
    conversions = []
    if x.shape[1] > 1:
        x = x.mean(axis=1, dtype=np.float64).astype(np.float32)
        conversions.append("audio_downmix")
    else:
        x = x[:, 0]
    if rate != sample_rate:
        x = resample(x, rate, sample_rate).numpy()
        conversions.append("audio_resample")
    if x.shape[0] < min_seconds * sample_rate:
        raise BadSample("audio_too_short")
    return Decoded(np.ascontiguousarray(x, dtype=np.float32), tuple(conversions))


# ---------------------------------------------------------------------------------------------- npy, images

def load_npy(raw: bytes, reason: str) -> np.ndarray:
    """A plain `.npy` array; object arrays (which would need unpickling) and anything else -> BadSample(reason).
    `allow_pickle=False` makes numpy raise on an object dtype before it reads the pickle payload."""
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception:
        raise BadSample(reason) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise BadSample(reason)  # structured / string / complex arrays are not maps
    return arr


def _load_image(raw: bytes, reason: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_MAP_PIXELS:
            raise BadSample(reason)
        img.load()
    except BadSample:
        raise
    except Exception:
        raise BadSample(reason) from None
    return img


# ---------------------------------------------------------------------------------------------------- depth

def decode_depth(raw: bytes, ext: str, depth_scale: float = 1000.0, nonfinite: str = "reject") -> Decoded:
    """A `depth.png` / `depth.npy` member -> float32 (H, W) metric depth in metres; 0 marks pixels with no
    measurement (the common convention of Kinect / NYU / SUN RGB-D style 16-bit maps).

    - `depth.png`: a single-channel 16-bit (or 8-bit) PNG of integer depth; metres = value / `depth_scale`
      (1000: millimetres, the default; KITTI uses 256).
    - `depth.npy`: (H, W) or (H, W, 1); floats are metres as stored, integers are divided by `depth_scale`.
    Negative depth -> `bad_depth`. NaN / inf: `nonfinite="reject"` (default) -> `bad_depth`;
    `nonfinite="missing"` -> set to 0 (no measurement) and counted as `depth_nonfinite_to_missing`.
    A map with no valid pixel -> `bad_depth`.
    """
    conversions = []
    if ext == "depth.png" or ext.endswith(".png"):
        img = _load_image(raw, "bad_depth")
        if img.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
            raise BadSample("bad_depth")  # colour PNGs are not depth maps
        d = np.asarray(img).astype(np.float32) / depth_scale
    elif ext.endswith("npy"):
        arr = load_npy(raw, "bad_depth")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2 or arr.size > MAX_MAP_PIXELS:
            raise BadSample("bad_depth")
        d = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.float32) / depth_scale
    else:
        raise BadSample("bad_depth")
    if d.ndim != 2 or min(d.shape) == 0:
        raise BadSample("bad_depth")
    finite = np.isfinite(d)
    if not finite.all():
        if nonfinite != "missing":
            raise BadSample("bad_depth")
        d = np.where(finite, d, 0.0).astype(np.float32)
        conversions.append("depth_nonfinite_to_missing")
    if (d < 0).any() or not (d > 0).any():
        raise BadSample("bad_depth")
    return Decoded(np.ascontiguousarray(d), tuple(conversions))


def depth_to_disparity(depth: np.ndarray | torch.Tensor, focal_baseline: float = 1.0,
                       min_depth: float = 1e-3) -> torch.Tensor:
    """Disparity = focal_baseline / depth (ImageBind feeds disparity rather than depth: scale-invariant up to
    the camera's focal length x baseline). With `focal_baseline` in pixel x metres it is the stereo disparity in
    pixels; with the default 1.0 it is inverse depth (1/m). Pixels with depth <= `min_depth` (0 = no
    measurement) get disparity 0."""
    d = torch.as_tensor(depth, dtype=torch.float32)
    valid = d > min_depth
    return torch.where(valid, focal_baseline / torch.where(valid, d, torch.ones_like(d)), torch.zeros_like(d))


# ---------------------------------------------------------------------------------------------- thermal, imu

def decode_thermal(raw: bytes, ext: str) -> Decoded:
    """A thermal image -> float32 (H, W): 8-bit in [0, 1] (/255), 16-bit in [0, 1] (/65535); a colour image
    (a false-colour rendering) is averaged to one channel (`thermal_to_gray`). `.npy`: (H, W) as stored
    (e.g. radiometric temperatures). Undecodable, non-finite or empty -> `bad_thermal`."""
    conversions = []
    if ext.endswith("npy"):
        arr = load_npy(raw, "bad_thermal")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2 or arr.size > MAX_MAP_PIXELS:
            raise BadSample("bad_thermal")
        t = arr.astype(np.float32)
    else:
        img = _load_image(raw, "bad_thermal")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            t = np.asarray(img).astype(np.float32) / 65535.0
        elif img.mode == "L":
            t = np.asarray(img).astype(np.float32) / 255.0
        else:
            t = np.asarray(img.convert("RGB")).astype(np.float32).mean(axis=2) / 255.0
            conversions.append("thermal_to_gray")
    if t.ndim != 2 or min(t.shape) == 0 or not np.isfinite(t).all():
        raise BadSample("bad_thermal")
    return Decoded(np.ascontiguousarray(t, dtype=np.float32), tuple(conversions))


def decode_imu(raw: bytes, ext: str = "imu.npy", min_steps: int = 8) -> Decoded:
    """An `imu.npy` member (T, 6) -> float32 (T, 6), stored units kept. Other shapes (including (6, T):
    we do not guess the layout), fewer than `min_steps` rows, or non-finite values -> `bad_imu`."""
    arr = load_npy(raw, "bad_imu")
    if arr.ndim != 2 or arr.shape[1] != 6 or arr.shape[0] < min_steps or arr.shape[0] > 10_000_000:
        raise BadSample("bad_imu")
    x = arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise BadSample("bad_imu")
    return Decoded(np.ascontiguousarray(x), ())


DECODERS = {"audio": decode_audio, "depth": decode_depth, "thermal": decode_thermal, "imu": decode_imu}


def decode_modality(raw: dict[str, bytes], modality: str, **options) -> Decoded:
    """The `modality` member of a sample ({ext: bytes}, as `ShardSet.read` returns) decoded; the first of
    `MODALITY_MEMBERS[modality]` present is used. No member -> `missing_<modality>`. `options` go to the
    decoder (e.g. `sample_rate=16000` for audio, `depth_scale=1000.0` for depth)."""
    if modality not in MODALITY_MEMBERS:
        raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITY_MEMBERS)}")
    ext = next((e for e in MODALITY_MEMBERS[modality] if e in raw), None)
    if ext is None:
        raise BadSample(f"missing_{modality}")
    return DECODERS[modality](raw[ext], ext, **options)
