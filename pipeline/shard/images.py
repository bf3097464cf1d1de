"""Image checks and transforms for `python -m pipeline shard`: decode test, decompression-bomb refusal, EXIF
orientation, resize (keep ratio / longest side / center crop / pad) and re-encoding to JPEG, WebP or PNG.

An image that needs no change is stored as the bytes it came with (after a decode test unless `validate` is
off), so re-sharding is a copy. Everything here is a pure function of (bytes, settings): the same input gives
the same output bytes, which is what makes sharding deterministic and resumable.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("none", "keep_ratio", "keep_ratio_largest", "center_crop", "pad")
ENCODE_FORMATS = ("keep", "jpg", "webp", "png")
STORED_FORMATS = ("jpg", "png", "webp")  # what our loader (and every WebDataset decoder) reads
DEFAULT_MAX_PIXELS = 12_000 * 12_000  # the loader's own decompression-bomb limit
_ORIENTATION_TAG = 0x0112
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def describe_error(e: Exception) -> str:
    """The error as failure detail, without object addresses (the failures list must be deterministic)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can read"
    return re.sub(r" at 0x[0-9a-f]+", "", f"{type(e).__name__}: {e}")


class ImageFailure(Exception):
    """The image cannot go into a shard; `reason` is the failure-count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageSettings:
    size: int | None = None        # target side in pixels for the resize modes
    resize_mode: str = "none"      # one of RESIZE_MODES
    upscale: bool = True           # False: images smaller than the target keep their size
    encode_format: str = "keep"    # one of ENCODE_FORMATS; "keep" re-encodes only when it must, in the source format
    quality: int = 95              # JPEG / WebP quality when re-encoding
    validate: bool = True          # decode every image (catches truncated files and bad PNG checksums)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode format must be one of {', '.join(ENCODE_FORMATS)}, not {self.encode_format!r}")
        if self.resize_mode != "none" and (self.size is None or self.size <= 0):
            raise ValueError(f"resize mode {self.resize_mode!r} needs a positive image size")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, not {self.quality}")
        if self.max_pixels <= 0:
            raise ValueError(f"max pixels must be > 0, not {self.max_pixels}")


@dataclass
class StoredImage:
    data: bytes
    ext: str            # member extension: jpg / png / webp
    width: int          # of the stored image
    height: int
    original_width: int  # as decoded, before orientation and resize
    original_height: int


def sniff_format(data: bytes) -> str | None:
    """The image format from its magic bytes (not from a file name, which may lie)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's own bomb check uses a process-wide limit (and only warns below twice that); apply ours for the
    duration of one decode, then put the caller's back (the loader sets its own at import)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _scale(width: int, height: int, s: ImageSettings) -> float:
    """The factor that brings (width, height), in display orientation, to the target of the resize mode."""
    if s.resize_mode in ("keep_ratio", "center_crop"):
        scale = s.size / min(width, height)
    else:  # keep_ratio_largest, pad: the longest side becomes `size`
        scale = s.size / max(width, height)
    return scale if s.upscale else min(scale, 1.0)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent areas composited onto white (converting RGBA straight to RGB would show whatever
    colour the transparent pixels happen to hold)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _rescale(img: Image.Image, s: ImageSettings) -> Image.Image:
    w, h = img.size
    scale = _scale(w, h, s)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new == (w, h):
        return img
    # PIL's resize filters are antialiased; bicubic is nearly as sharp as Lanczos going down and ~30% cheaper
    return img.resize(new, Image.Resampling.BICUBIC if scale < 1 else Image.Resampling.LANCZOS)


def _frame(img: Image.Image, s: ImageSettings) -> Image.Image:
    """The square of center_crop and pad (no-op for the other modes)."""
    if s.resize_mode == "center_crop":
        side = min(s.size, *img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif s.resize_mode == "pad":
        canvas = Image.new("RGB", (s.size, s.size), (0, 0, 0))
        canvas.paste(img, ((s.size - img.width) // 2, (s.size - img.height) // 2))
        img = canvas
    return img


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "jpg":
        img.save(out, "JPEG", quality=quality)
    elif fmt == "webp":
        img.save(out, "WEBP", quality=quality)
    else:
        img.save(out, "PNG", compress_level=6)
    return out.getvalue()


def process_image(data: bytes, s: ImageSettings) -> StoredImage:
    """The image as it goes into the shard, or ImageFailure with the reason it cannot."""
    if not data:
        raise ImageFailure("empty_file")
    source_format = sniff_format(data)
    with _pixel_limit(s.max_pixels):
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
            width, height = img.size
            orientation = img.getexif().get(_ORIENTATION_TAG, 1) if source_format in ("jpg", "png", "webp", "tiff") else 1
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageFailure("image_too_large", "over the pixel limit") from None
        except Exception as e:
            raise ImageFailure("bad_image", describe_error(e)) from None
        if width * height > s.max_pixels:
            raise ImageFailure("image_too_large", f"{width}x{height} > {s.max_pixels} pixels")
        if width <= 0 or height <= 0:
            raise ImageFailure("bad_image", f"size {width}x{height}")

        resize = s.resize_mode != "none"
        if resize:  # a no-op resize (already at the target) still re-encodes: simpler, and rare
            display = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            resize = _scale(*display, s) != 1.0 or s.resize_mode in ("center_crop", "pad")
        target_format = (source_format if s.encode_format == "keep" else s.encode_format)
        if target_format not in STORED_FORMATS:
            target_format = "jpg"  # gif / bmp / tiff sources: the loader only decodes jpg, png, webp
        reencode = resize or orientation != 1 or target_format != source_format
        if not reencode and not s.validate:
            return StoredImage(data, source_format, width, height, width, height)

        try:
            if source_format == "png":
                # PIL skips the checksums of the pixel data (IDAT) when decoding; verify() reads them all
                Image.open(io.BytesIO(data)).verify()
            if resize and source_format == "jpg":
                # decode at 1/2, 1/4 or 1/8 scale when that still leaves enough pixels: the big win for photos
                scale = _scale(width, height, s)
                img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageFailure("image_too_large", "over the pixel limit") from None
        except Exception as e:
            raise ImageFailure("bad_image", describe_error(e)) from None
    if not reencode:
        return StoredImage(data, source_format, width, height, width, height)

    try:
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        if resize:
            if img.mode not in ("L", "RGB", "RGBA", "LA"):  # palette / bilevel images only resize by nearest
                img = _to_rgb(img)
            img = _rescale(img, s)  # before the RGB conversion: a grayscale photo has a third of the pixels
        img = _to_rgb(img)
        if resize:
            img = _frame(img, s)
        encoded = _encode(img, target_format, s.quality)
    except Exception as e:  # an odd mode or a broken EXIF block: the image is unusable, the run goes on
        raise ImageFailure("bad_image", describe_error(e)) from None
    return StoredImage(encoded, target_format, img.width, img.height, width, height)
