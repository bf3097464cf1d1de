"""Image file bytes -> the model's input tensor, as open_clip's or timm's transform would make it, but faster.

Those transforms are torchvision `Compose` pipelines over PIL images: decode at full size, random-resized-crop
(or resize + center crop) with PIL's bicubic filter, ToTensor, Normalize. On ~512 px photographs at 224 px the
resize alone costs more than the decode. `ImageToTensor` recognises the geometric steps of such a pipeline and
runs them on uint8 pixels instead:

1. JPEG headers give the size, so the crop box is drawn *before* decoding, and libjpeg-turbo (simplejpeg)
   decodes at 1/2, 1/4 or 1/8 scale (DCT scaling) whenever the crop still has at least the output's pixels
   at that scale. (Only the power-of-two scales have SIMD inverse DCTs; 5/8 or 3/4 decode slower than 1/1.)
2. Crop + resize run on the uint8 HWC array with torch's vectorised antialiased bicubic/bilinear filter,
   which matches PIL's to within 1 grey level (PIL's 8-bit path is scalar and ~4x slower).
3. The result stays uint8: ToTensor + Normalize become one multiply-add into float32 in `model_input`, on
   the device, after the batch crossed from the loader worker (shared memory), was pinned and copied there,
   each at a quarter of the float32 bytes.

A pipeline with any other step (colour jitter, RandAugment, random erasing, ...) runs unchanged on a PIL
image, decoded with PIL's draft mode when the image is at least twice the first step's size.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.data.errors import BadSample

_JPEG_MAGIC = b"\xff\xd8\xff"
_FAST_INTERPOLATIONS = (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR)
_PASS_THROUGH = ("MaybeConvertMode", "_convert_to_rgb", "ToTensor", "MaybeToTensor")
Image.MAX_IMAGE_PIXELS = 12_000 * 12_000  # refuse decompression bombs (PIL itself only warns up to twice this)


# ------------------------------------------------------------------------------------------- PIL decoding
def _check_pixels(width: int, height: int) -> None:
    """Refuses images over MAX_IMAGE_PIXELS from their header, before any pixel is allocated (PIL would
    decode anything up to twice its limit, with a warning)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise BadSample("image_too_large")


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """RGB PIL image. A JPEG at least twice `draft_size` on its shorter side is decoded at 1/2, 1/4 or 1/8
    scale by libjpeg's DCT scaling (PIL's draft mode), never below `draft_size` on the shorter side."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise BadSample("image_too_large") from None
    except Exception:
        raise BadSample("bad_image") from None
    _check_pixels(*img.size)
    try:
        if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
            scale = draft_size / min(img.size)
            img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img.load()
        return img.convert("RGB")
    except Image.DecompressionBombError:
        raise BadSample("image_too_large") from None
    except Exception:
        raise BadSample("bad_image") from None


class ToNormalizedTensor:
    """RGB pixels (PIL image, or uint8 (..., 3, H, W) tensor on any device) -> float32 `(x / 255 - mean) / std`
    in one pass (torchvision's ToTensor then Normalize make two, plus a float intermediate); equal to them
    within float rounding."""

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) / std_t
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """scale and shift on `device`, copied there once: a copy per batch would be a blocking host-to-device
        transfer in every training step."""
        if device.type == "cpu":
            return self.scale, self.shift
        if device not in self._on_device:
            self._on_device[device] = (self.scale.to(device), self.shift.to(device))
        return self._on_device[device]

    def __getstate__(self) -> dict:  # loader workers get the CPU constants only
        return {**self.__dict__, "_on_device": {}}

    def __call__(self, pixels: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(pixels, Image.Image):
            pixels = torch.from_numpy(np.array(pixels.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        # a float copy scaled in place: twice as fast as addcmul on uint8, which takes a slow type-promoting path
        x = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        scale, shift = self._constants(x.device)
        return x.mul_(scale).add_(shift)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def fuse_to_tensor_normalize(transform: Callable) -> Callable:
    """A torchvision Compose ending in [ToTensor, Normalize] (open_clip's and timm's transforms) with those two
    replaced by `ToNormalizedTensor`; any other transform is returned unchanged."""
    from torchvision.transforms import Compose, Normalize

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, Compose) or len(steps) < 2:
        return transform
    to_tensor, normalize = steps[-2], steps[-1]
    if (type(to_tensor).__name__ not in ("ToTensor", "MaybeToTensor") or not isinstance(normalize, Normalize)
            or len(normalize.mean) != 3):
        return transform
    return Compose([*steps[:-2], ToNormalizedTensor(normalize.mean, normalize.std)])


# ------------------------------------------------------------------------------------------- fast path
@dataclass(frozen=True)
class _RandomResizedCrop:
    size: tuple[int, int]  # (height, width)
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: InterpolationMode

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a crop covering U(scale) of the area with log-uniform aspect ratio (Inception
        style), drawn from torch's global generator (the loader seeds it per sample); after 10 misses, the
        largest centred crop whose ratio is within range."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)).item())
                left = int(torch.randint(0, width - w + 1, (1,)).item())
                return top, left, h, w
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class _Resize:
    size: int | tuple[int, int]  # int: the shorter side; (height, width): exactly
    interpolation: InterpolationMode

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.size, int):
            return self.size
        if height <= width:  # torchvision's rule: the long side is truncated, not rounded
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size


@dataclass(frozen=True)
class _CenterCrop:
    size: tuple[int, int]


@dataclass(frozen=True)
class _HorizontalFlip:
    p: float


def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _fast_steps(transform: Callable) -> tuple[list, ToNormalizedTensor] | None:
    """The geometric steps and the final normalisation of a Compose that has nothing else, or None."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        return None
    geometry, normalize, tensor_seen = [], None, False
    for step in steps:
        name = getattr(step, "__name__", type(step).__name__)
        interpolation = getattr(step, "interpolation", None)
        if normalize is not None:
            return None  # anything after Normalize (random erasing) runs on the PIL path
        if name in _PASS_THROUGH:
            tensor_seen = tensor_seen or "Tensor" in name
        elif name in ("RandomResizedCrop", "RandomResizedCropAndInterpolation") and not tensor_seen:
            if interpolation not in _FAST_INTERPOLATIONS or getattr(step, "antialias", True) is False:
                return None  # timm's interpolation="random" is a tuple
            geometry.append(_RandomResizedCrop(_hw(step.size), tuple(step.scale), tuple(step.ratio),
                                               interpolation))
        elif name == "Resize" and not tensor_seen:
            if (interpolation not in _FAST_INTERPOLATIONS or step.max_size is not None
                    or getattr(step, "antialias", True) is False):
                return None
            size = step.size  # an int or a 1-sequence: the shorter side (torchvision's convention)
            if not isinstance(size, int):
                size = size[0] if len(size) == 1 else _hw(size)
            geometry.append(_Resize(size, interpolation))
        elif name == "CenterCrop" and not tensor_seen:
            geometry.append(_CenterCrop(_hw(step.size)))
        elif name == "RandomHorizontalFlip":
            geometry.append(_HorizontalFlip(step.p))
        elif name == "Normalize" and tensor_seen and len(step.mean) == 3:
            normalize = ToNormalizedTensor(step.mean, step.std)
        else:
            return None
    if not tensor_seen:
        return None
    return geometry, normalize or ToNormalizedTensor()


def _draft_factor(height: int, width: int, need_h: float, need_w: float) -> int:
    """The largest of 1, 2, 4, 8 that leaves at least (need_h, need_w) pixels."""
    for factor in (8, 4, 2):
        if height / factor >= need_h and width / factor >= need_w:
            return factor
    return 1


def _jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(height, width, colorspace) of a JPEG whose header libjpeg reads; None for anything else (PIL decides)."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width, colorspace


def _decode_pixels(data: bytes, header: tuple[int, int, str] | None, factor: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB, at 1/`factor` scale for a JPEG with `header` (`_jpeg_header`); anything else at
    full size."""
    if header is not None:
        height, width, colorspace = header
        _check_pixels(width, height)
        if colorspace in ("YCbCr", "Gray"):  # CMYK / YCCK: PIL's conversion, as open_clip would see it
            try:
                # libjpeg picks the smallest M/8 scale whose size is at least min_height x min_width
                return simplejpeg.decode_jpeg(data, "RGB", min_height=math.ceil(height / factor),
                                              min_width=math.ceil(width / factor))
            except ValueError:
                pass  # damage libjpeg is strict about: PIL decides
    return np.array(decode_image(data))


class ImageToTensor:
    """Image file bytes -> (3, H, W) tensor (raising BadSample): uint8 pixels on the fast path, `transform`'s
    float32 output on the PIL path. `model_input` turns a batch of either into exactly what `transform` gives
    (normalised), on the device. `reduced_decode`: decode JPEGs at a reduced scale when that leaves enough
    pixels (`data.jpeg_draft`)."""

    def __init__(self, transform: Callable, reduced_decode: bool = True):
        self.transform, self.reduced_decode = transform, reduced_decode
        fast = _fast_steps(transform)
        self.geometry, self.normalize = fast if fast else (None, None)
        if fast is None:
            self.pil_transform = fuse_to_tensor_normalize(transform)
            first = next((s for s in getattr(transform, "transforms", ()) if hasattr(s, "size")), None)
            size = getattr(first, "size", None)
            self.draft_size = (min(_hw(size)) if size is not None and reduced_decode else None)

    @property
    def fast(self) -> bool:
        return self.geometry is not None

    def model_input(self, images: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """A batch (or one image) from `__call__` as the model's input: normalised, on `device`, in `dtype`."""
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        return images.to(dtype)

    def __call__(self, data: bytes) -> torch.Tensor:
        if not self.fast:
            return self.pil_transform(decode_image(data, self.draft_size))
        try:
            return self._decode_fast(data)
        except BadSample:
            raise
        except Exception:
            raise BadSample("bad_image") from None

    def _decode_fast(self, data: bytes) -> torch.Tensor:
        first = self.geometry[0] if self.geometry else None
        box, factor = None, 1
        header = _jpeg_header(data)  # read once: for the crop and the decode scale, and by the decoder
        if self.reduced_decode and isinstance(first, (_RandomResizedCrop, _Resize)) and header is not None:
            height, width, _ = header
            if isinstance(first, _RandomResizedCrop):
                box = first.box(height, width)
                factor = _draft_factor(box[2], box[3], *first.size)
            else:
                factor = _draft_factor(height, width, *first.output_hw(height, width))
        pixels = _decode_pixels(data, header, factor)
        if box is not None and factor > 1 and pixels.shape[0] < height:
            # pixel i of a 1/f decode covers source pixels [i*f, (i+1)*f): snapping the crop's edges to that grid
            # moves them by less than f/2 source pixels (a crop as random as the one drawn) and keeps it exact
            top, left, h, w = (max(1, round(v / factor)) if i > 1 else round(v / factor) for i, v in enumerate(box))
            box = (top, left, min(h, pixels.shape[0] - top), min(w, pixels.shape[1] - left))
        image = torch.from_numpy(pixels).permute(2, 0, 1)  # a channels-last view: torch's fast uint8 layout
        for step in self.geometry:
            if isinstance(step, _RandomResizedCrop):
                box = box or step.box(*image.shape[-2:])
                image = TF.resized_crop(image, *box, list(step.size), interpolation=step.interpolation,
                                        antialias=True)
                box = None
            elif isinstance(step, _Resize):
                image = TF.resize(image, list(step.output_hw(*image.shape[-2:])), interpolation=step.interpolation,
                                  antialias=True)
            elif isinstance(step, _CenterCrop):
                image = TF.center_crop(image, list(step.size))
            elif torch.rand(1).item() < step.p:
                image = image.flip(-1)
        return image

    def __repr__(self) -> str:
        path = "fast" if self.fast else "PIL"
        return f"ImageToTensor({path}, reduced_decode={self.reduced_decode}, transform={self.transform!r})"
