"""Retrieval recall@k, computed in blocks of query rows: the queries x items similarity matrix is never held
whole (100k image-caption pairs would be a 40 GB matrix), only `block_elems` of it at a time.

A query's rank is the number of items scored strictly above its match (so ties count in its favour); it is
retrieved at k when that rank is below k.
"""
from __future__ import annotations

import torch

BLOCK_ELEMS = 1 << 26  # similarities per block: 256 MiB in float32


def recall_hits(queries: torch.Tensor, items: torch.Tensor, match: torch.Tensor, ks: list[int],
                block_elems: int = BLOCK_ELEMS) -> dict[int, int]:
    """{k: how many queries have their match (query i: item match[i]) among the top k items}."""
    hits = {k: 0 for k in ks}
    if queries.shape[0] == 0:
        return hits
    rows = max(1, block_elems // max(1, items.shape[0]))
    match = match.to(queries.device).view(-1, 1)
    for start in range(0, queries.shape[0], rows):
        sim = queries[start:start + rows] @ items.T
        rank = (sim > sim.gather(1, match[start:start + rows])).sum(1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    return hits


def recall_at_k(queries: torch.Tensor, items: torch.Tensor, ks: list[int],
                block_elems: int = BLOCK_ELEMS) -> dict[int, float]:
    """{k: recall@k} where the match of query i is item i."""
    n = queries.shape[0]
    hits = recall_hits(queries, items, torch.arange(n), ks, block_elems)
    return {k: hits[k] / n if n else 0.0 for k in ks}
