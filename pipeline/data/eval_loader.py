"""Held-out samples for evaluation: a range of sample ids read in order, decoded in batches by loader workers
(the training loader's DataLoader settings, `make_train_loader`), for image-text and image-label data alike.

A sample needs an image; its caption (`.txt`) and label (`.cls`) are used where present, so label-only shards
(ImageNet-style jpg + cls) and caption-only shards both evaluate. Batch k of the range is built by worker
k % workers, and the DataLoader takes the workers' batches in turn: batches arrive in the order of the data.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.errors import BadSample
from pipeline.data.image_decode import ImageToTensor
from pipeline.data.loader import ShardSet, decode_caption, decode_label, image_member, make_train_loader


class EvalSampleDecoder:
    """image (+ caption, + label) -> {"images", "labels" (-1: none), "has_caption", "texts" (token ids of the
    captioned samples, in order; None if no sample of the batch has one)}. A sample without a decodable image,
    or with a `.cls` that is not an integer, is skipped (BadSample); a missing or undecodable caption only keeps
    the sample out of retrieval."""

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


class EvalBatches(IterableDataset):
    """Batches of the samples `ids` (a range of ShardSet sample ids), in order: the decoder's batch (absent when
    every sample of the batch failed) plus {"index": k, "bad": Counter of skipped samples by reason}."""

    def __init__(self, shards: ShardSet, ids: range, batch_size: int, decoder: EvalSampleDecoder):
        self.shards, self.ids, self.batch_size, self.decoder = shards, ids, batch_size, decoder

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def make_batch(self, k: int) -> dict:
        samples, bad = [], Counter()
        for sid in self.ids[k * self.batch_size:(k + 1) * self.batch_size]:
            try:
                _, raw = self.shards.read(sid)
            except (OSError, EOFError):
                bad["unreadable"] += 1
                continue
            try:
                samples.append(self.decoder.sample(raw))
            except BadSample as e:
                bad[e.reason] += 1
        return {**(self.decoder.collate(samples) if samples else {}), "index": k, "bad": bad}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for k in range(worker, len(self), workers):
            yield self.make_batch(k)


def eval_batches(shards: ShardSet, ids: range, batch_size: int, decoder: EvalSampleDecoder, workers: int,
                 pin_memory: bool = False) -> Iterator[dict]:
    """The batches of `ids` in order, decoded by `workers` processes (0: in this one)."""
    dataset = EvalBatches(shards, ids, batch_size, decoder)
    workers = min(workers, len(dataset))
    loader: DataLoader = make_train_loader(dataset, workers, pin_memory)
    for expected, batch in enumerate(loader):
        if batch["index"] != expected:
            raise RuntimeError(f"eval loader order broken: got batch {batch['index']}, expected {expected}")
        yield batch
