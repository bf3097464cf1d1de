"""Held-out samples for evaluation: one reader for every evaluation path (zero-shot and retrieval, kNN and probe
features, emergent binding, SimMIM reconstruction).

`iterate_decoded` reads a range of sample ids in order and decodes them in batches with any sample decoder
(pipeline/data/decoders.py), in loader workers (the training loader's DataLoader settings, `make_train_loader`)
or in this process. Batch k holds the decodable samples among ids k*B .. (k+1)*B - 1: a sample that cannot be
read counts as "unreadable", one its decoder rejects under the decoder's reason, in the batch's "bad" counts
(`decode_samples`, the read-decode-skip step the training stream uses too).
Batch k is built by worker k % workers, and the DataLoader takes the workers' batches in turn: batches arrive in
the order of the data.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.decoders import CaptionedImageDecoder, SampleDecoder
from pipeline.data.errors import DataError
from pipeline.data.loader import ShardSet, decode_samples, make_train_loader


class DecodedBatches(IterableDataset):
    """Batches of the samples `ids` (a range of ShardSet sample ids), in order: the decoder's batch (absent when
    every sample of the batch failed) plus {"index": k, "bad": {reason: skipped samples}}."""

    def __init__(self, shards: ShardSet, ids: range, batch_size: int, decoder: SampleDecoder):
        self.shards, self.ids, self.batch_size, self.decoder = shards, ids, batch_size, decoder

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def make_batch(self, k: int) -> dict:
        read = decode_samples(self.shards, self.ids[k * self.batch_size:(k + 1) * self.batch_size], self.decoder)
        if read.error is not None:
            raise DataError(read.error)
        return {**(self.decoder.collate(read.samples) if read.samples else {}), "index": k, "bad": read.bad}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for k in range(worker, len(self), workers):
            yield self.make_batch(k)


def iterate_decoded(shards: ShardSet, decoder: SampleDecoder, batch_size: int, ids: range | None = None,
                    workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """The batches of `ids` (default: every sample of `shards`) in order, decoded by `workers` processes (0: in
    this one); host tensors, for `decoder.to_device`."""
    dataset = DecodedBatches(shards, range(shards.total) if ids is None else ids, batch_size, decoder)
    workers = min(workers, len(dataset))
    loader: DataLoader = make_train_loader(dataset, workers, pin_memory)
    for expected, batch in enumerate(loader):
        if batch["index"] != expected:
            raise RuntimeError(f"eval loader order broken: got batch {batch['index']}, expected {expected}")
        yield batch


def iterate_eval_samples(shards: ShardSet, transform: Callable, batch_size: int,
                         with_label: bool = False) -> Iterator[tuple[torch.Tensor, list[str], list[int]]]:
    """Every captioned sample of `shards` in order, batched: (images normalised on the CPU, captions, labels
    (-1 without `with_label`)). Bad samples are skipped."""
    decoder = CaptionedImageDecoder(transform, with_label)
    for batch in iterate_decoded(shards, decoder, batch_size):
        if "images" in batch:
            batch = decoder.to_device(batch, "cpu", torch.float32)
            yield batch["images"], batch["captions"], batch["labels"]
