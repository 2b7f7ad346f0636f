"""Bag of words: the filtered corpus dictionary, ``(word_ids, counts)`` rows of token lists, and
the BoW of the token shards built in Ray tasks (sliced per training worker) or as a shuffled Ray
Dataset."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.errors import TopicsError
from embedjob.stages.topics.config import TopicsConfig
from embedjob.storage import Storage


def filter_dictionary(dictionary, cfg: TopicsConfig):
    """A filtered copy of the corpus dictionary (``filter_extremes`` with the config's settings);
    ids stay in the dictionary's (deterministic) order."""
    d = copy.deepcopy(dictionary)
    d.filter_extremes(no_below=cfg.no_below, no_above=cfg.no_above, keep_n=cfg.keep_n)
    if len(d) == 0:
        raise TopicsError(
            f"topics: no word left after filter_extremes(no_below={cfg.no_below}, no_above={cfg.no_above}, "
            f"keep_n={cfg.keep_n}) over {dictionary.num_docs} documents; lower topics.no_below or raise topics.no_above"
        )
    return d


def vocab_list(dictionary) -> list[str]:
    """Words by id (``vocab[i]`` is the word of id ``i``)."""
    out = [""] * len(dictionary)
    for w, i in dictionary.token2id.items():
        out[i] = w
    return out


BOW_SCHEMA = pa.schema([("word_ids", pa.list_(pa.int32())), ("counts", pa.list_(pa.float32()))])


def bow_arrays(tokens: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> tuple[pa.ListArray, pa.ListArray]:
    """Bag of words of each document of a ``list<string>`` column: ``(word_ids, counts)`` lists,
    word ids sorted, words outside ``vocab`` dropped (a document may end up empty). Vectorised."""
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks() if tokens.num_chunks else pa.array([], pa.list_(pa.string()))
    n = len(tokens)
    v = len(vocab)
    flat = pc.list_flatten(tokens)
    parents = pc.list_parent_indices(tokens).to_numpy().astype(np.int64)
    wid = pc.fill_null(pc.index_in(flat, value_set=vocab), -1).to_numpy().astype(np.int64)
    keep = wid >= 0
    keys, counts = np.unique(parents[keep] * v + wid[keep], return_counts=True)
    doc = keys // max(v, 1)
    offsets = np.searchsorted(doc, np.arange(n + 1)).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array((keys % max(v, 1)).astype(np.int32)))
    cnt = pa.ListArray.from_arrays(pa.array(offsets), pa.array(counts.astype(np.float32)))
    return ids, cnt


def bow_from_token_lists(docs: Sequence[Sequence[str]], vocab: Sequence[str]) -> tuple[pa.ListArray, pa.ListArray]:
    """:func:`bow_arrays` for Python token lists."""
    return bow_arrays(pa.array([list(d) for d in docs], pa.list_(pa.string())), pa.array(list(vocab), pa.string()))


def _bow_shards(batch: dict[str, np.ndarray], vocab: list[str], storage_options: dict[str, Any]) -> pa.Table:
    """Ray Data transform: token shard URLs -> BoW rows of their non-empty documents."""
    vocab_arr = pa.array(vocab, pa.string())
    parts = []
    for url in batch["url"]:
        table = Storage(str(url), storage_options).read_parquet("", columns=["tokens"])
        ids, cnt = bow_arrays(table.column("tokens"), vocab_arr)
        t = pa.Table.from_arrays([ids, cnt], schema=BOW_SCHEMA)
        parts.append(t.filter(pc.greater(pc.list_value_length(t.column("word_ids")), 0)))
    return pa.concat_tables(parts) if parts else BOW_SCHEMA.empty_table()


def corpus_word_counts(dictionary) -> np.ndarray:
    """Corpus frequency of every word of ``dictionary``, by id (what :func:`relevance` and the ETM
    background use as ``p(w)``)."""
    return np.array([dictionary.cfs.get(i, 0) for i in range(len(dictionary))], np.float64)


def worker_slices(n: int, world: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` of each worker's ``1/world`` slice of a shard of ``n`` rows."""
    return [(n * r // world, n * (r + 1) // world) for r in range(world)]


def _bow_task(urls: list[str], vocab: list[str], storage_options: dict[str, Any], world: int) -> list[Any]:
    """Ray task: for each token shard in ``urls``, the row counts of the workers' slices of its BoW
    (non-empty documents), then one BoW table per worker."""
    out: list[Any] = []
    for url in urls:
        table = _bow_shards({"url": [url]}, vocab, storage_options)
        bounds = worker_slices(table.num_rows, world)
        out.append([stop - start for start, stop in bounds])
        out.extend(table.slice(start, stop - start) for start, stop in bounds)
    return out


def submit_bow(token_urls: list[str], vocab: list[str], storage_options: dict[str, Any], world: int, tasks: int):
    """Start building the BoW of every token shard in ``tasks`` Ray tasks (each a stripe of the
    shards; no CPU reserved, so that they run while the Ray Train workers start), each shard cut into
    ``world`` slices: shards are often one source or one topic each, and this way every worker gets
    the same mix of the corpus and fetches only its own rows. Returns, per shard, the ref of its
    slices' row counts and the refs of its ``world`` slices."""
    import ray

    remote = ray.remote(num_cpus=0)(_bow_task)
    vocab_ref = ray.put(vocab)
    counts: list[Any] = [None] * len(token_urls)
    slices: list[Any] = [None] * len(token_urls)
    for t in range(min(tasks, len(token_urls))):
        mine = list(range(t, len(token_urls), tasks))
        refs = remote.options(num_returns=(world + 1) * len(mine)).remote(
            [token_urls[i] for i in mine], vocab_ref, storage_options, world)
        for j, i in enumerate(mine):
            counts[i], slices[i] = refs[(world + 1) * j], refs[(world + 1) * j + 1:(world + 1) * (j + 1)]
    return counts, slices


def bow_dataset(token_urls: list[str], vocab: list[str], storage_options: dict[str, Any], seed: int = 0):
    """Ray Dataset of the BoW rows (``word_ids``, ``counts``) of all non-empty documents, globally
    shuffled and materialised once in the object store so that every epoch streams it without
    re-reading the shards.

    The shuffle matters: shards are often one source or one topic each, and a worker that only sees
    one topic gets batch-norm statistics (and gradients) of that topic alone, which stops DDP workers
    from learning distinct topics."""
    import ray

    ds = ray.data.from_items([{"url": u} for u in token_urls], override_num_blocks=len(token_urls))
    ds = ds.map_batches(_bow_shards, fn_kwargs={"vocab": vocab, "storage_options": storage_options},
                        batch_size=1, batch_format="numpy")
    return ds.random_shuffle(seed=seed).materialize()
