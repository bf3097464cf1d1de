"""Sample decoders: one sample's members ({ext: bytes}) -> tensors, a list of those -> a batch, a batch -> the
model's device.

A decoder has three steps, each where it is cheapest:

- `sample(raw)` runs in a loader worker, under the loader's per-sample seed: decodes and transforms one sample,
  raising `BadSample(reason)` when it cannot be used (the reader skips it and counts the reason);
- `collate(samples)` runs in the worker too: stacks the samples (and tokenises captions, once per batch);
- `to_device(batch, device, dtype)` runs in the training or evaluation process: moves the batch's tensors to
  the device and finishes what is cheaper there, above all the image normalisation (images travel as uint8,
  a quarter of float32's bytes, `ImageToTensor.model_input`). It never reads a device value back and copies
  without blocking (from pinned memory), so a training step queues its work without waiting for the GPU.

Host fields (sample keys, bad-sample counts, stream positions) pass through `to_device` unchanged.

The readers: the training stream (`pipeline.data.loader.ShardBatches`) and the held-out reader
(`pipeline.data.eval_loader.iterate_decoded`). Only allow-listed members are decoded; nothing is unpickled.
"""
from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, Callable, Protocol

import torch

from pipeline.data.errors import BadSample
from pipeline.data.image_decode import ImageToTensor
from pipeline.data.modalities import MODALITY_MEMBERS, decode_modality

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)
MAX_CAPTION_BYTES = 16384  # data.max_caption_bytes' default; a caption is cut to 77 tokens (~300 bytes) anyway


# ----------------------------------------------------------------------------------------------- members
def decode_caption(raw: dict[str, bytes], max_bytes: int = MAX_CAPTION_BYTES) -> str:
    caption_ext = next((e for e in CAPTION_EXTS if e in raw), None)
    if caption_ext is None:
        raise BadSample("missing_caption")
    if max_bytes and len(raw[caption_ext]) > max_bytes:
        raise BadSample("caption_too_long")  # before tokenising: BPE on megabytes takes seconds per sample
    try:
        caption = raw[caption_ext].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("bad_caption") from None
    if not caption:
        raise BadSample("empty_caption")
    return caption


def decode_label(raw: dict[str, bytes], num_classes: int | None = None) -> int:
    """The `.cls` class id; with `num_classes`, one outside [0, num_classes) is a bad sample (not an index
    error in the loss)."""
    if "cls" not in raw:
        raise BadSample("missing_label")
    if len(raw["cls"]) > 32:
        raise BadSample("bad_label")
    try:
        label = int(raw["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad_label") from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise BadSample("label_out_of_range")
    return label


def image_member(raw: dict[str, bytes]) -> bytes:
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise BadSample("missing_image")
    return raw[ext]


def carries(raw: dict[str, bytes], modality: str) -> bool:
    """Whether a sample ({ext: bytes}) has a member of `modality`."""
    return any(ext in raw for ext in MODALITY_MEMBERS[modality])


# ----------------------------------------------------------------------------------------------- protocol
class SampleDecoder(Protocol):
    """Turns one sample's members into tensors (raising BadSample), a list of those into a batch, and a batch
    into the model's input on the device (normalised, non-blocking, no host reads)."""

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]: ...

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]: ...

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]: ...


def stack_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks tensors and gathers other values into lists, field by field."""
    out = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def move_fields(batch: dict[str, Any], device: torch.device | str, names: tuple[str, ...]) -> dict[str, Any]:
    """`batch` with its tensors `names` copied to `device` (non-blocking: from pinned memory the copy is queued,
    not waited for), dtype kept: token ids, labels, masks and row indices stay integers / bools."""
    return {**batch, **{n: batch[n].to(device, non_blocking=True) for n in names if batch.get(n) is not None}}


# ----------------------------------------------------------------------------------------------- training
class ImageTextDecoder:
    """jpg/png/webp + txt -> {"images": transformed image, "texts": token ids} (tokenised in the workers)."""

    def __init__(self, transform: Callable, tokenizer: Callable, reduced_decode: bool = True,
                 max_caption_bytes: int = MAX_CAPTION_BYTES):
        self.image, self.tokenizer = ImageToTensor(transform, reduced_decode), tokenizer
        self.max_caption_bytes = max_caption_bytes

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]:
        data = image_member(raw)
        caption = decode_caption(raw, self.max_caption_bytes)
        return {"images": self.image(data), "texts": caption}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = stack_collate(samples)
        batch["texts"] = self.tokenizer(batch["texts"])
        return batch

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        return {**move_fields(batch, device, ("texts",)),
                "images": self.image.model_input(batch["images"], device, dtype)}


class ImageLabelDecoder:
    """jpg/png/webp + cls -> {"images", "labels"}; for supervised pretraining and the kNN / probe features."""

    def __init__(self, transform: Callable, reduced_decode: bool = True, num_classes: int | None = None):
        self.image = ImageToTensor(transform, reduced_decode)
        self.num_classes = num_classes  # labels outside [0, num_classes) are bad samples

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]:
        data = image_member(raw)
        label = decode_label(raw, self.num_classes)
        return {"images": self.image(data), "labels": torch.tensor(label)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return stack_collate(samples)

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        return {**move_fields(batch, device, ("labels",)),
                "images": self.image.model_input(batch["images"], device, dtype)}


class MaskedImageDecoder:
    """SimMIM's decoder: image -> {"images": transformed image, "masks": bool (H_tokens, W_tokens)}; no label or
    caption needed. The mask is drawn from torch's global generator, which the loader seeds per (seed, epoch,
    sample) around `sample()`, so masks are reproducible and a resumed run draws the same ones (SimMIM also
    draws its masks in the data pipeline). How a mask is drawn is the objective's (pipeline/objectives/simmim.py)."""

    def __init__(self, transform, grid_hw: tuple[int, int], mask_ratio: float, mask_patch_size: int,
                 model_patch_size: int, reduced_decode: bool = True):
        # imported here: the objective's module pulls in the model zoo (timm), which no other decoder needs
        from pipeline.objectives.simmim import random_patch_mask

        self.image = ImageToTensor(transform, reduced_decode)
        self.mask_args = (tuple(grid_hw), mask_ratio, mask_patch_size, model_patch_size)
        self.draw_mask = partial(random_patch_mask, 1, *self.mask_args)
        self.draw_mask()  # fail on a bad combination now, not in a worker

    def sample(self, raw: dict[str, bytes]) -> dict[str, torch.Tensor]:
        image = self.image(image_member(raw))
        return {"images": image, "masks": self.draw_mask()[0]}

    def collate(self, samples: list[dict]) -> dict:
        return {"images": torch.stack([s["images"] for s in samples]),
                "masks": torch.stack([s["masks"] for s in samples])}

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        return {**move_fields(batch, device, ("masks",)),
                "images": self.image.model_input(batch["images"], device, dtype)}


class ModalityDecoder:
    """ImageBind's decoder: image + each configured modality the sample carries -> {"images", "<modality>":
    input tensor, "converted": conversions}. A sample carrying none of them is skipped (BadSample
    "missing_modality") and counted; a member that fails to decode skips the sample with the decoder's reason
    (e.g. "bad_audio").

    `collate` stacks the images of all samples and, per modality, the inputs of the samples that carry it with
    their rows in the batch ("<modality>_rows", int64); a modality no sample carries has neither key."""

    def __init__(self, image_transform, modality_transforms: dict, decode_options: dict, reduced_decode: bool):
        self.image, self.modality_transforms = ImageToTensor(image_transform, reduced_decode), modality_transforms
        self.decode_options = decode_options

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]:
        present = [m for m in self.modality_transforms if carries(raw, m)]
        if not present:
            raise BadSample("missing_modality")
        out: dict[str, Any] = {"images": self.image(image_member(raw))}
        converted = Counter()
        for m in present:
            decoded = decode_modality(raw, m, **self.decode_options[m])
            converted.update(decoded.conversions)
            out[m] = self.modality_transforms[m](decoded.value)
        out["converted"] = converted
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"images": torch.stack([s["images"] for s in samples]),
                                 "converted": sum((s["converted"] for s in samples), Counter())}
        for m in self.modality_transforms:
            rows = [i for i, s in enumerate(samples) if m in s]
            if rows:
                batch[m] = torch.stack([samples[i][m] for i in rows])
                batch[f"{m}_rows"] = torch.tensor(rows, dtype=torch.int64)
        return batch

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        """Images normalised, each modality's inputs in `dtype`, its rows (indices into the images) as int64."""
        present = [m for m in self.modality_transforms if m in batch]
        out = move_fields(batch, device, tuple(f"{m}_rows" for m in present))
        out.update({m: batch[m].to(device, dtype, non_blocking=True) for m in present})
        out["images"] = self.image.model_input(batch["images"], device, dtype)
        return out


# ----------------------------------------------------------------------------------------------- evaluation
class EvalSampleDecoder:
    """Held-out image (+ caption, + label) -> {"images", "labels" (-1: none), "has_caption", "texts" (token ids
    of the captioned samples, in order; None if no sample of the batch has one)}. A sample without a decodable
    image, or with a `.cls` that is not an integer, is skipped (BadSample); a missing or undecodable caption
    only keeps the sample out of retrieval. Without a tokenizer captions are not read at all."""

    def __init__(self, transform: Callable, tokenizer: Callable | None):
        self.image, self.tokenizer = ImageToTensor(transform), tokenizer

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]:
        pixels = self.image(image_member(raw))
        label = decode_label(raw) if "cls" in raw else -1
        try:
            caption = decode_caption(raw) if self.tokenizer is not None else None
        except BadSample:
            caption = None
        return {"images": pixels, "label": label, "caption": caption}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples if s["caption"] is not None]
        return {"images": torch.stack([s["images"] for s in samples]),
                "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
                "has_caption": torch.tensor([s["caption"] is not None for s in samples]),
                "texts": self.tokenizer(captions) if captions else None}

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        # "labels" and "has_caption" stay on the host: evaluation counts and selects with them there
        return {**move_fields(batch, device, ("texts",)),
                "images": self.image.model_input(batch["images"], device, dtype)}


class CaptionedImageDecoder:
    """Held-out image + caption (+ label) -> {"images", "captions": the caption strings, "labels" (-1 without
    `with_label`)}: for callers that tokenise (or print) the captions themselves. A sample without a caption,
    or without a label when `with_label`, is skipped."""

    def __init__(self, transform: Callable, with_label: bool = False):
        self.image, self.with_label = ImageToTensor(transform), with_label

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]:
        caption = decode_caption(raw)
        label = decode_label(raw) if self.with_label else -1
        return {"images": self.image(image_member(raw)), "captions": caption, "labels": label}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return stack_collate(samples)

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        return {**batch, "images": self.image.model_input(batch["images"], device, dtype)}


class PairedModalityDecoder:
    """Held-out image + one modality (+ caption, + label) for emergent evaluation -> {"images", "inputs" (the
    modality's encoder inputs), "captions" (None where a sample has none: paired sets need no caption),
    "labels" (-1 where a sample has no `.cls`)}. A sample without the modality, or with an undecodable image,
    modality, caption or label, is skipped with its reason."""

    def __init__(self, image_transform: Callable, modality: str, modality_transform: Callable,
                 decode_options: dict | None = None):
        self.image = ImageToTensor(image_transform)
        self.modality, self.modality_transform = modality, modality_transform
        self.decode_options = decode_options or {}

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]:
        pixels = self.image(image_member(raw))
        caption = decode_caption(raw) if "txt" in raw else None
        decoded = decode_modality(raw, self.modality, **self.decode_options)
        label = decode_label(raw) if "cls" in raw else -1
        return {"images": pixels, "inputs": self.modality_transform(decoded.value), "captions": caption,
                "labels": label}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return stack_collate(samples)

    def to_device(self, batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        return {**batch, "images": self.image.model_input(batch["images"], device, dtype),
                "inputs": batch["inputs"].to(device, dtype, non_blocking=True)}
