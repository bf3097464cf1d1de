"""From brace-expanded shard paths to training batches, exactly and resumably.

The order of an epoch is a pure function of (seed, epoch, shard sizes): shards are shuffled, then samples are
shuffled within blocks of `shuffle_block`, and the sequence is cut into equal contiguous slices per rank (the
remainder that does not fill a global batch is dropped, so every rank has the same number of batches and
DDP never hangs on uneven shards). Batch `g` of a rank (counted across epochs) is built by loader worker
`g % workers`, so the stream is the same for any worker count, and resuming means starting at batch `g`.
Augmentation randomness is seeded per (seed, epoch, sample), so resumed batches are bit-identical.

Only allow-listed extensions are decoded; nothing from a shard is ever unpickled.
"""
from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.shard_index import ShardMembers, load_or_build_index

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)
Image.MAX_IMAGE_PIXELS = 12_000 * 12_000  # refuse decompression bombs


class DataError(ValueError):
    """A problem with the data the user pointed at; the message is meant to be shown as is."""


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def expand_shards(spec: str, key: str = "data") -> list[str]:
    """'a/{000..009}.tar::b/x.tar' -> list of local paths; fails naming `key` if any is missing."""
    if not spec:
        raise DataError(f"{key} is empty; give a shard pattern such as 'data/train-{{000000..000009}}.tar'")
    paths = []
    for part in spec.split("::"):
        for p in braceexpand(part.strip()):
            paths.append(p.removeprefix("file:"))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{key}: {len(missing)} of {len(paths)} shards not found (first: {missing[0]})")
    return paths


class ShardSet:
    """The shards of a dataset and their sample counts, from the indexes (built where missing)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.counts = np.array([load_or_build_index(p).num_rows for p in paths], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.total = int(self.counts.sum())
        self._members: dict[int, ShardMembers] = {}
        self._fds: dict[int, int] = {}

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, sample_id, side="right") - 1)
        return shard, int(sample_id - self.starts[shard])

    def read(self, sample_id: int) -> tuple[str, dict[str, bytes]]:
        """Returns (key, {ext: bytes}) of one sample. Shard descriptors stay open."""
        shard, row = self.locate(sample_id)
        if shard not in self._members:
            self._members[shard] = ShardMembers.load(self.paths[shard])
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= 16:  # bound open files; a rank's slice touches few shards at a time
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        members = self._members[shard]
        return members.keys[row], members.read(row, fd)

    def __getstate__(self):  # descriptors do not travel to spawned worker processes
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state


def epoch_order(counts: np.ndarray, seed: int, epoch: int, shuffle_block: int) -> np.ndarray:
    """Global sample ids in the order of one epoch."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.concatenate([np.arange(starts[s], starts[s] + counts[s]) for s in rng.permutation(len(counts))])
    block = max(1, shuffle_block)
    for b in range(0, len(order), block):
        rng.shuffle(order[b:b + block])
    return order


def rank_batches(order: np.ndarray, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """(batches, batch_size) sample ids of one rank: a contiguous slice, remainder dropped."""
    per_rank = len(order) // (world_size * batch_size) * batch_size
    return order[rank * per_rank:(rank + 1) * per_rank].reshape(-1, batch_size)


def decode_image_caption(raw: dict[str, bytes]) -> tuple[Image.Image, str]:
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if image_ext is None:
        raise BadSample("missing_image")
    caption_ext = next((e for e in CAPTION_EXTS if e in raw), None)
    if caption_ext is None:
        raise BadSample("missing_caption")
    try:
        img = Image.open(io.BytesIO(raw[image_ext]))
        img.load()
        img = img.convert("RGB")
    except Image.DecompressionBombError:
        raise BadSample("image_too_large") from None
    except Exception:
        raise BadSample("bad_image") from None
    try:
        caption = raw[caption_ext].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("bad_caption") from None
    if not caption:
        raise BadSample("empty_caption")
    return img, caption


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, sample_id]).generate_state(1)[0])


@dataclass
class LoaderSpec:
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_block: int = 4096


class ImageTextBatches(IterableDataset):
    """Endless stream of this rank's batches, starting at batch `start_batch` (counted across epochs).

    Each item: {"images": (B,3,H,W), "texts": (B,L), "keys": [...], "batch": g, "epoch": e, "bad": Counter}.
    Samples that fail to decode are left out of their batch and counted by reason in "bad".
    """

    def __init__(self, shards: ShardSet, spec: LoaderSpec, transform: Callable, tokenizer: Callable,
                 start_batch: int = 0):
        self.shards, self.spec = shards, spec
        self.transform, self.tokenizer = transform, tokenizer
        self.start_batch = start_batch
        self.batches_per_epoch = shards.total // (spec.world_size * spec.batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"the training data has {shards.total} samples, fewer than one global batch "
                            f"({spec.world_size} ranks x {spec.batch_size})")
        self._plan_epoch, self._plan = -1, None

    def batch_ids(self, g: int) -> tuple[int, np.ndarray]:
        epoch, j = divmod(g, self.batches_per_epoch)
        if epoch != self._plan_epoch:
            order = epoch_order(self.shards.counts, self.spec.seed, epoch, self.spec.shuffle_block)
            self._plan = rank_batches(order, self.spec.rank, self.spec.world_size, self.spec.batch_size)
            self._plan_epoch = epoch
        return epoch, self._plan[j]

    def make_batch(self, g: int) -> dict:
        epoch, ids = self.batch_ids(g)
        images, captions, keys, bad = [], [], [], Counter()
        for sid in ids.tolist():
            try:
                key, raw = self.shards.read(sid)
            except (OSError, EOFError):
                bad["unreadable"] += 1
                continue
            try:
                img, caption = decode_image_caption(raw)
            except BadSample as e:
                bad[e.reason] += 1
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.spec.seed, epoch, sid))
                images.append(self.transform(img))
            captions.append(caption)
            keys.append(key)
        return {
            "images": torch.stack(images) if images else torch.empty(0),
            "texts": self.tokenizer(captions) if captions else torch.empty(0, dtype=torch.long),
            "keys": keys, "batch": g, "epoch": epoch, "bad": bad,
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        g = self.start_batch + worker
        while True:
            yield self.make_batch(g)
            g += workers


def make_train_loader(dataset: ImageTextBatches, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


def iterate_eval_samples(shards: ShardSet, transform: Callable, batch_size: int,
                         with_label: bool = False) -> Iterator[tuple[torch.Tensor, list[str], list[int]]]:
    """Every readable sample of `shards` in order, batched: (images, captions, labels). Bad samples are skipped."""
    images, captions, labels = [], [], []
    for sid in range(shards.total):
        try:
            _, raw = shards.read(sid)
            img, caption = decode_image_caption(raw)
            label = int(raw["cls"].decode()) if with_label else -1
        except (OSError, EOFError, BadSample, KeyError, ValueError):
            continue
        images.append(transform(img))
        captions.append(caption)
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), captions, labels
            images, captions, labels = [], [], []
    if images:
        yield torch.stack(images), captions, labels
