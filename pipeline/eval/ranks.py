"""How an evaluation is spread over the ranks of a run: each rank takes a contiguous slice of the held-out
samples (and of the zero-shot classes), encodes it, and the ranks exchange features and counts. Contiguous
slices in rank order mean that gathered rows come back in the order of the data, as on one process.

Outside a process group (the `eval` verb on one process) everything here is the identity.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class EvalRanks:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "EvalRanks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def slice(self, n: int) -> range:
        """This rank's part of n items: sizes differ by at most one."""
        return range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def _host_group(self):
        from pipeline.train.distributed import host_group

        return host_group()

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's (n_r, d) rows, concatenated in rank order, on every rank. n_r may differ (and be 0, when
        d may be 0 too: a rank with nothing to contribute need not know d)."""
        if self.world_size == 1:
            return rows
        shapes = torch.zeros(self.world_size, 2, dtype=torch.int64)
        shapes[self.rank] = torch.tensor(rows.shape if rows.numel() else (0, 0))
        dist.all_reduce(shapes, group=self._host_group())  # sizes on the host: no wait on the device's queue
        counts, d = shapes[:, 0].tolist(), int(shapes[:, 1].max())
        padded = torch.zeros(max(counts), d, dtype=torch.float32, device=rows.device)
        if counts[self.rank]:
            padded[:counts[self.rank]] = rows.float()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sums of integer counts over the ranks."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self._host_group())
        return t.tolist()

    def sum_counter(self, counts: Counter) -> Counter:
        if self.world_size == 1:
            return Counter(counts)
        out = [None] * self.world_size
        dist.all_gather_object(out, dict(counts), group=self._host_group())
        return sum((Counter(c) for c in out), Counter())
