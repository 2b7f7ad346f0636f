"""The job's token shards (``<out>/tokens/<shard>.parquet``: ``id``, ``tokens``) as training
input: each worker's slice of every shard, and reading a slice back. Used by the Word2Vec and topic
model stages.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.storage import Storage


def plan_slices(token_urls: list[str], storage_options: dict[str, Any], world: int) -> list[list[tuple[str, int, int]]]:
    """For each worker, ``(url, start_row, stop_row)`` of its ``1/world`` slice of every shard: every
    worker gets the same share of each shard (balanced work, the same mix of the corpus)."""
    plan: list[list[tuple[str, int, int]]] = [[] for _ in range(world)]
    for url in token_urls:
        store = Storage(url, storage_options)
        with store.open("", "rb") as f:
            pf = pq.ParquetFile(f)
            if "tokens" not in pf.schema_arrow.names:
                raise ValueError(
                    f"token shard {url} has no 'tokens' column (columns: {', '.join(pf.schema_arrow.names)}); "
                    "word2vec reads the preprocess stage's <out>/tokens/*.parquet"
                )
            n = pf.metadata.num_rows
        for r in range(world):
            a, b = n * r // world, n * (r + 1) // world
            if b > a:
                plan[r].append((url, a, b))
    return plan


def read_slices(slices: list[tuple[str, int, int]], storage_options: dict[str, Any]) -> list[list[str]]:
    """The token lists of rows ``[start, stop)`` of each shard (reading only the row groups needed)."""
    docs: list[list[str]] = []
    for url, start, stop in slices:
        store = Storage(url, storage_options)
        with store.open("", "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            groups, first, offset = [], None, 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if offset < stop and offset + n > start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            if not groups:
                continue
            table = pf.read_row_groups(groups, columns=["tokens"])
        col = table.column("tokens").slice(start - first, stop - start)
        docs.extend(d for d in col.to_pylist() if d)
        del table, col
        pa.default_memory_pool().release_unused()
    return docs
