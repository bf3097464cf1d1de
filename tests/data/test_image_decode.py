import io
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pipeline.data import image_decode
from pipeline.data.errors import BadSample
from pipeline.data.image_decode import ImageToTensor, decode_image, fuse_to_tensor_normalize

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus texture: something like a photograph, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 23.0), 128 + 90 * np.cos(y / 17.0), (x + y) % 256], -1)
    rgb += np.random.default_rng(0).normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert(mode)


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _model_input(decoder: ImageToTensor, data: bytes) -> torch.Tensor:
    return decoder.model_input(decoder(data), "cpu", torch.float32)


def _grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised images in units of one 8-bit grey level."""
    return (a - b).abs() * torch.tensor(STD).view(3, 1, 1) * 255


def test_reduced_jpeg_decode_never_below_target():
    big = _encode(Image.effect_noise((1024, 768), 40).convert("RGB"), quality=90)
    assert decode_image(big).size == (1024, 768)
    assert decode_image(big, draft_size=224).size == (512, 384)  # 1/2: 1/4 would be below 224
    assert decode_image(big, draft_size=96).size == (128, 96)  # 1/8
    assert decode_image(big, draft_size=400).size == (1024, 768)  # less than 2x larger: untouched
    png = _encode(Image.new("RGB", (1024, 768)), "PNG")
    assert decode_image(png, draft_size=96).size == (1024, 768)  # draft is a JPEG-only path


def test_fused_to_tensor_normalize_equals_torchvision():
    train_tf = open_clip.image_transform(64, is_train=True, mean=MEAN, std=STD)
    fused = fuse_to_tensor_normalize(train_tf)
    assert type(fused.transforms[-1]).__name__ == "ToNormalizedTensor" and len(fused.transforms) == 3
    for mode in ("RGB", "L"):
        img = Image.effect_noise((80, 60), 60).convert(mode)
        torch.manual_seed(0)
        expected = train_tf(img)
        torch.manual_seed(0)
        got = fused(img)
        assert got.shape == expected.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert fuse_to_tensor_normalize(len) is len  # anything else is left alone


EVAL_TRANSFORMS = {
    "open_clip": lambda: open_clip.image_transform(64, is_train=False, mean=MEAN, std=STD),
    "open_clip_squash": lambda: open_clip.image_transform(64, is_train=False, mean=MEAN, std=STD,
                                                          resize_mode="squash"),
    "timm": lambda: T.Compose([T.Resize(73, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                               T.ToTensor(), T.Normalize(MEAN, STD)]),
    "bilinear": lambda: T.Compose([T.Resize((70, 90)), T.CenterCrop((64, 80)), T.ToTensor(),
                                   T.Normalize(MEAN, STD)]),
}
IMAGES = {
    "jpeg": lambda: _encode(_photo(150, 110), quality=95),
    "jpeg_portrait": lambda: _encode(_photo(97, 161), quality=95),
    "jpeg_grey": lambda: _encode(_photo(150, 110, "L"), quality=95),
    "jpeg_cmyk": lambda: _encode(_photo(150, 110, "CMYK"), quality=95),
    "png_rgba": lambda: _encode(_photo(150, 110, "RGBA"), "PNG"),
    "webp": lambda: _encode(_photo(150, 110), "WEBP", lossless=True),
}


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("transform", EVAL_TRANSFORMS)
def test_fast_path_equals_the_pil_transform(transform, image):
    tf, data = EVAL_TRANSFORMS[transform](), IMAGES[image]()
    fast = ImageToTensor(tf, reduced_decode=False)
    assert fast.fast
    expected = tf(Image.open(io.BytesIO(data)).convert("RGB"))  # open_clip_train decodes to RGB first too
    pixels = fast(data)
    assert pixels.dtype == torch.uint8  # normalised on the device, a quarter of the bytes to move there
    got = fast.model_input(pixels[None], "cpu", torch.float32)[0]
    assert got.shape == expected.shape and got.dtype == torch.float32 and got.is_contiguous()
    # torch's uint8 antialiased filters round like PIL's to within one grey level, and rarely differ at all
    diff = _grey_levels(got, expected)
    assert diff.max() <= 1.001 and diff.mean() < 0.25


def test_random_resized_crop_and_flip_equal_pil_on_the_same_box(monkeypatch):
    data = _encode(_photo(200, 150), quality=95)
    box = (13, 21, 101, 137)
    monkeypatch.setattr(image_decode._RandomResizedCrop, "box", lambda self, h, w: box)
    for p_flip in (0.0, 1.0):
        tf = T.Compose([T.RandomResizedCrop(64, interpolation=T.InterpolationMode.BICUBIC),
                        T.RandomHorizontalFlip(p_flip), T.ToTensor(), T.Normalize(MEAN, STD)])
        expected = F.resized_crop(Image.open(io.BytesIO(data)).convert("RGB"), *box, [64, 64],
                                  T.InterpolationMode.BICUBIC)
        expected = F.normalize(F.to_tensor(F.hflip(expected) if p_flip else expected), MEAN, STD)
        got = _model_input(ImageToTensor(tf, reduced_decode=False), data)
        assert _grey_levels(got, expected).max() <= 1.001


def test_crop_boxes_follow_the_scale_and_ratio_and_the_seed():
    rrc = image_decode._RandomResizedCrop((64, 64), (0.3, 0.6), (0.75, 4 / 3), T.InterpolationMode.BICUBIC)
    torch.manual_seed(5)
    boxes = [rrc.box(400, 400) for _ in range(2000)]  # every draw fits: no rejection skews the figures
    torch.manual_seed(5)
    assert boxes[:50] == [rrc.box(400, 400) for _ in range(50)]
    fractions = np.array([h * w / 400**2 for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= t and t + h <= 400 and 0 <= l and l + w <= 400 for t, l, h, w in boxes)
    assert fractions.min() > 0.29 and fractions.max() < 0.61 and abs(fractions.mean() - 0.45) < 0.01
    assert ratios.min() > 0.74 and ratios.max() < 1.34
    assert abs(np.log(ratios).mean()) < 0.01  # log-uniform ratio: as many wide crops as tall ones
    tops, lefts = np.array([b[0] for b in boxes]), np.array([b[1] for b in boxes])
    assert abs(np.mean(tops + np.array([b[2] for b in boxes]) / 2) - 200) < 3  # centres uniform around the middle
    assert abs(np.mean(lefts + np.array([b[3] for b in boxes]) / 2) - 200) < 3
    # nothing fits: the largest centred crop within the ratio range
    squeeze = image_decode._RandomResizedCrop((8, 8), (2.0, 3.0), (0.75, 4 / 3), T.InterpolationMode.BICUBIC)
    assert squeeze.box(100, 300) == (0, 83, 100, 133)


def test_crop_aware_reduced_decode_keeps_the_output_pixels(monkeypatch):
    data = _encode(_photo(1024, 768), quality=95)
    tf = open_clip.image_transform(96, is_train=True, mean=MEAN, std=STD)  # scale (0.9, 1.0)
    factors = []
    decode = image_decode._decode_pixels
    monkeypatch.setattr(image_decode, "_decode_pixels", lambda d, h, f: factors.append(f) or decode(d, h, f))
    draws = []
    box = image_decode._RandomResizedCrop.box

    def box_on_the_grid_of_8(*args):  # then a reduced decode crops exactly what a full decode crops
        draws.append(tuple(8 * (v // 8) for v in box(*args)))
        return draws[-1]

    monkeypatch.setattr(image_decode._RandomResizedCrop, "box", box_on_the_grid_of_8)
    reduced, full = ImageToTensor(tf), ImageToTensor(tf, reduced_decode=False)
    for seed in range(8):
        torch.manual_seed(seed)
        a = _model_input(reduced, data)
        torch.manual_seed(seed)
        b = _model_input(full, data)
        diff = _grey_levels(a, b)
        assert diff.mean() < 1.0 and diff.max() < 12  # DCT scaling is a good antialiasing filter
    reduced_factors = factors[0::2]
    assert 4 in reduced_factors and set(reduced_factors) <= {4, 8}  # 1/8 only for crops >= 768 px both ways
    assert factors[1::2] == [1] * 8
    assert all(h / f >= 96 and w / f >= 96 for (_, _, h, w), f in zip(draws[0::2], reduced_factors))
    # a small crop is not reduced: the factor follows the crop, not the image
    small = T.Compose([T.RandomResizedCrop(96, scale=(0.02, 0.02), interpolation=T.InterpolationMode.BICUBIC),
                       T.ToTensor()])
    factors.clear()
    ImageToTensor(small)(data)
    assert factors == [1]


def test_other_transforms_run_on_pil_exactly():
    tf = T.Compose([T.RandomResizedCrop(48), T.ColorJitter(0.4, 0.4, 0.4), T.ToTensor(), T.Normalize(MEAN, STD)])
    data = _encode(_photo(150, 110), quality=95)
    # reduced decoding on this path: PIL's draft mode, never below the first step's size (48 -> 1/2 here)
    for reduced, image in ((False, Image.open(io.BytesIO(data)).convert("RGB")), (True, decode_image(data, 48))):
        decoder = ImageToTensor(tf, reduced_decode=reduced)
        assert not decoder.fast
        torch.manual_seed(3)
        expected = tf(image)
        torch.manual_seed(3)
        torch.testing.assert_close(_model_input(decoder, data), expected, atol=1e-5, rtol=0)
    assert decode_image(data, 48).size == (75, 55)
    for step in (T.RandomResizedCrop(48, interpolation=T.InterpolationMode.NEAREST), T.RandomErasing()):
        assert not ImageToTensor(T.Compose([T.RandomResizedCrop(48), T.ToTensor(), step])).fast


@pytest.mark.parametrize("fast", [True, False])
def test_bad_and_oversized_images_are_bad_samples(monkeypatch, fast):
    tf = open_clip.image_transform(32, is_train=True, mean=MEAN, std=STD)
    if not fast:
        tf = T.Compose([T.ColorJitter(0.1), *tf.transforms])
    decoder = ImageToTensor(tf)
    assert decoder.fast == fast
    jpeg, png = _encode(_photo(64, 48), quality=90), _encode(_photo(64, 48), "PNG")
    for data in (jpeg[: len(jpeg) // 3], b"\xff\xd8\xff" + b"\0" * 50, b"", b"not an image"):
        with pytest.raises(BadSample, match="^bad_image$"):
            decoder(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 2 - 1)  # PIL refuses past twice the limit
    for data in (jpeg, png):
        with pytest.raises(BadSample, match="^image_too_large$"):
            decoder(data)
    assert math.isfinite(float(_model_input(decoder, _encode(_photo(32, 24), quality=90)).sum()))
