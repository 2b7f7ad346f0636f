"""`embedjob bench windows`: whole documents (encode.long_documents=windows) against truncation,
on labelled long-document sources of the shared corpus.

For each source (kernel docs by folder, KJV chapters by book, Austen chapters by novel,
Shakespeare by play: the ``label`` column), a seeded sample of documents is encoded twice with the
same model and settings — every token in overlapping windows, and cut at ``max_length`` — and each
mode's leave-one-out kNN accuracy of the label (cosine, majority of the ``k`` nearest) is reported
with the tokens it encoded and its seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np

from embedjob.bench.corpus import DEFAULT_CORPUS

logger = logging.getLogger(__name__)

SOURCES = {"kernel": "linux_kernel_docs", "kjv": "kjv_chapters", "austen": "austen_chapters",
           "shakespeare": "shakespeare_chunks"}


def knn_accuracy(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out accuracy of the majority label of each document's ``k`` nearest (cosine)."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1)[:, :k]
    right = 0
    for i, nn in enumerate(nearest):
        vals, counts = np.unique(labels[nn], return_counts=True)
        right += vals[np.argmax(counts)] == labels[i]
    return right / len(labels)


def sample_source(corpus: str, source: str, limit: int, seed: int) -> tuple[list[str], np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from embedjob.storage import list_shards

    t = pa.concat_tables(pq.read_table(u, columns=["text", "source", "label"]) for u in list_shards(corpus))
    t = t.filter(pc.equal(t.column("source"), source))
    t = t.filter(pc.is_valid(t.column("label")))
    idx = np.random.default_rng(seed).permutation(t.num_rows)[:limit]
    return t.column("text").take(pa.array(idx)).to_pylist(), np.asarray(t.column("label").take(pa.array(idx)).to_pylist())


def compare(texts: list[str], labels: np.ndarray, model: str, backend: str, k: int) -> dict[str, Any]:
    from embedjob.stages.encode import EncodeConfig, TextEncoder

    res: dict[str, Any] = {"documents": len(texts), "labels": len(set(labels.tolist()))}
    for mode in ("truncate", "windows"):
        enc = TextEncoder.from_config(EncodeConfig(model=model, long_documents=mode, backend=backend))
        t = time.perf_counter()
        got = enc.encode_texts(texts)
        res[f"{mode}_seconds"] = round(time.perf_counter() - t, 1)
        res[f"{mode}_tokens_encoded"] = int(got.encoded_tokens.sum())
        res[f"{mode}_knn_accuracy"] = knn_accuracy(got.vectors, labels, k)
        res["document_tokens"] = int(got.n_tokens.sum())
    res["windows_seconds_per_token_vs_truncate"] = (
        (res["windows_seconds"] / res["windows_tokens_encoded"]) / (res["truncate_seconds"] / res["truncate_tokens_encoded"]))
    return res


def run(args: argparse.Namespace) -> int:
    """``embedjob bench windows`` (flags in :mod:`embedjob.cli`)."""
    corpus = args.corpus or os.path.abspath(DEFAULT_CORPUS)
    results = {}
    for name in args.sources.split(","):
        texts, labels = sample_source(corpus, SOURCES[name], args.limit, args.seed)
        logger.info("bench windows: %s, %d documents", name, len(texts))
        results[name] = compare(texts, labels, args.model, args.backend, args.k)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"leave-one-out {args.k}-NN accuracy of the label (cosine), model {args.model}, backend {args.backend}")
    print(f"{'source':12s} {'docs':>5s} {'labels':>6s} {'doc tokens':>10s} | {'truncate':>8s} {'windows':>8s} | "
          f"{'tokens enc. trunc/win':>22s} | {'s trunc/win':>12s} | s/token win vs trunc")
    for name, r in results.items():
        print(f"{name:12s} {r['documents']:5d} {r['labels']:6d} {r['document_tokens']:10d} | "
              f"{r['truncate_knn_accuracy']:8.3f} {r['windows_knn_accuracy']:8.3f} | "
              f"{r['truncate_tokens_encoded']:>10d}/{r['windows_tokens_encoded']:<11d} | "
              f"{r['truncate_seconds']:>5.1f}/{r['windows_seconds']:<6.1f} | "
              f"{r['windows_seconds_per_token_vs_truncate']:.2f}")
    return 0
