"""Vocabulary stage: one corpus-wide gensim ``Dictionary`` from the per-shard token files.

Each token shard is counted in its own Ray task (collection and document frequencies); the
counts are merged on the driver and turned into a ``Dictionary`` whose ids are assigned in a
deterministic order (frequency, then word), so every worker and every rerun sees the same ids.
The Dictionary carries ``cfs`` (collection frequencies, what Word2Vec's vocabulary needs) and
``dfs`` (document frequencies, what ``filter_extremes`` needs)::

    dictionary = build_vocabulary(token_urls, storage_options)
    dictionary.cfs[dictionary.token2id["cat"]]
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pyarrow.compute as pc
from gensim.corpora import Dictionary

from embedjob.storage import Storage

logger = logging.getLogger(__name__)


def count_shard(url: str, storage_options: dict[str, Any]) -> tuple[Counter, Counter, int, int]:
    """(collection counts, document counts, documents, tokens) of one token shard."""
    table = Storage(url, storage_options).read_parquet("", columns=["tokens"])
    tokens = table.column("tokens")
    flat = pc.list_flatten(tokens)
    cfs = Counter(dict(zip(*_value_counts(flat))))
    dfs: Counter = Counter()
    for doc in tokens.to_pylist():
        if doc:
            dfs.update(set(doc))
    return cfs, dfs, table.num_rows, len(flat)


def _value_counts(arr) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(arr)
    if len(vc) == 0:
        return [], []
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def dictionary_from_counts(cfs: Counter, dfs: Counter, num_docs: int, num_pos: int) -> Dictionary:
    """A gensim Dictionary with deterministic ids (most frequent first, ties by word)."""
    d = Dictionary()
    words = sorted(cfs, key=lambda w: (-cfs[w], w))
    d.token2id = {w: i for i, w in enumerate(words)}
    d.cfs = {i: int(cfs[w]) for i, w in enumerate(words)}
    d.dfs = {i: int(dfs.get(w, 0)) for i, w in enumerate(words)}
    d.num_docs = int(num_docs)
    d.num_pos = int(num_pos)
    d.num_nnz = int(sum(dfs.values()))
    d.id2token = {}
    return d


def build_vocabulary(token_urls: list[str], storage_options: dict[str, Any] | None = None) -> Dictionary:
    """Count every token shard in parallel Ray tasks (inline when Ray is not running) and merge."""
    storage_options = storage_options or {}
    import ray

    if ray.is_initialized() and len(token_urls) > 1:
        task = ray.remote(num_cpus=1)(count_shard)
        parts = ray.get([task.remote(u, storage_options) for u in token_urls])
    else:
        parts = [count_shard(u, storage_options) for u in token_urls]
    cfs: Counter = Counter()
    dfs: Counter = Counter()
    docs = pos = 0
    for c, d, n, p in parts:
        cfs.update(c)
        dfs.update(d)
        docs += n
        pos += p
    logger.info("vocabulary: %d words over %d documents, %d tokens", len(cfs), docs, pos)
    return dictionary_from_counts(cfs, dfs, docs, pos)
