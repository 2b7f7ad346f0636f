"""Vocabulary stage: one corpus-wide gensim ``Dictionary`` from the per-shard token files.

Each token shard is counted in its own Ray task (collection and document frequencies); the
counts are merged on the driver and turned into a ``Dictionary`` whose ids are assigned in a
deterministic order (frequency, then word), so every worker and every rerun sees the same ids.
The Dictionary carries ``cfs`` (collection frequencies, what Word2Vec's vocabulary needs) and
``dfs`` (document frequencies, what ``filter_extremes`` needs)::

    dictionary = build_vocabulary(token_urls, storage_options)
    dictionary.cfs[dictionary.token2id["cat"]]
    write_dictionary(Storage("out"), dictionary)      # vocab/dictionary.json (+ .gensim, .txt for users)
    read_dictionary(Storage("out")).num_docs

The job's dictionary is stored as ``vocab/dictionary.json`` (plain data: what embedjob reads back)
beside gensim's own ``dictionary.gensim`` (a pickle, for users only: loading a pickle can run any
code, so embedjob never loads it) and ``dictionary.txt`` (``save_as_text``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from typing import Any

import pyarrow.compute as pc
from gensim.corpora import Dictionary

from embedjob.layout import DICTIONARY_GENSIM, DICTIONARY_JSON, DICTIONARY_TXT
from embedjob.storage import Storage, StorageError

logger = logging.getLogger(__name__)

DICTIONARY_FORMAT = "embedjob-dictionary-v1"


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


def write_dictionary(out: Storage, d: Dictionary) -> None:
    """Write the job's dictionary under ``<out>/vocab/``: ``dictionary.json`` (token2id, cfs, dfs,
    num_docs, num_pos, num_nnz; what :func:`read_dictionary` reads) and, for users,
    ``dictionary.gensim`` (``Dictionary.save``) and ``dictionary.txt`` (``save_as_text``)."""
    doc = {"format": DICTIONARY_FORMAT, "num_docs": int(d.num_docs), "num_pos": int(d.num_pos),
           "num_nnz": int(d.num_nnz), "token2id": {w: int(i) for w, i in d.token2id.items()},
           "cfs": {str(i): int(c) for i, c in sorted(d.cfs.items())},
           "dfs": {str(i): int(c) for i, c in sorted(d.dfs.items())}}
    with tempfile.TemporaryDirectory(prefix="embedjob-vocab-") as tmp:
        d.save(os.path.join(tmp, "dictionary.gensim"))
        out.upload(os.path.join(tmp, "dictionary.gensim"), DICTIONARY_GENSIM)
        d.save_as_text(os.path.join(tmp, "dictionary.txt"))
        out.upload(os.path.join(tmp, "dictionary.txt"), DICTIONARY_TXT)
    out.write_bytes(DICTIONARY_JSON, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def read_dictionary(out: Storage) -> Dictionary:
    """The gensim ``Dictionary`` of ``<out>/vocab/dictionary.json`` (never the pickled
    ``dictionary.gensim``), with the token ids, cfs, dfs, num_docs, num_pos and num_nnz written.
    Raises :class:`~embedjob.storage.StorageError` naming the file when it is missing or malformed."""
    url = out.url(DICTIONARY_JSON)
    try:
        doc = out.read_json(DICTIONARY_JSON)
        if not isinstance(doc, dict) or doc.get("format") != DICTIONARY_FORMAT:
            raise ValueError(f"format is not {DICTIONARY_FORMAT!r}")
        d = Dictionary()
        d.token2id = {str(w): int(i) for w, i in doc["token2id"].items()}
        d.cfs = {int(i): int(c) for i, c in doc["cfs"].items()}
        d.dfs = {int(i): int(c) for i, c in doc["dfs"].items()}
        d.num_docs, d.num_pos, d.num_nnz = int(doc["num_docs"]), int(doc["num_pos"]), int(doc["num_nnz"])
    except FileNotFoundError:
        raise StorageError(f"no dictionary at {url} (has the vocab stage run?)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StorageError(f"{url} is not an embedjob dictionary ({type(e).__name__}: {e}); rerun the job "
                           "with output.overwrite=true to write it again") from None
    d.id2token = {}
    return d


def run_vocab(out: Storage, token_urls: list[str]) -> dict[str, Any]:
    """Pipeline stage: the corpus-wide Dictionary of the token shards, written to ``vocab/``;
    returns its stats."""
    d = build_vocabulary(token_urls, out.storage_options)
    write_dictionary(out, d)
    return {"words": len(d), "documents": d.num_docs, "tokens": d.num_pos}
