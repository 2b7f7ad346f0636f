"""`embedjob bench windows`: whole documents (encode.long_documents=windows) against truncation,
on labelled long-document sources of the shared corpus.

For each source (kernel docs by folder, KJV chapters by book, Austen chapters by novel,
Shakespeare by play: the ``label`` column), a seeded sample of documents is encoded twice with the
same model and settings — cut at ``max_length``, every token in overlapping windows, and windows
snapped to sentence boundaries (``encode.snap_to_sentences``) — and each mode's leave-one-out kNN
accuracy of the label (cosine, majority of the ``k`` nearest) is reported with the tokens it
encoded and its seconds, and for windows the share of window boundaries inside a document that fall
on a sentence boundary (where a chunk's text starts or ends with a whole sentence).
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
from embedjob.stages.encode import EncodeConfig, TextEncoder
from embedjob.stages.encode.windows import plan_for, sentence_starts
from embedjob.storage import list_shards

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

    t = pa.concat_tables(pq.read_table(u, columns=["text", "source", "label"]) for u in list_shards(corpus))
    t = t.filter(pc.equal(t.column("source"), source))
    t = t.filter(pc.is_valid(t.column("label")))
    idx = np.random.default_rng(seed).permutation(t.num_rows)[:limit]
    return t.column("text").take(pa.array(idx)).to_pylist(), np.asarray(t.column("label").take(pa.array(idx)).to_pylist())


MODES = ("truncate", "windows", "snapped")


def sentence_boundary_share(enc, texts: list[str]) -> float:
    """Share of the window boundaries inside documents (a window's start after the first, its end
    before the last) that fall on a sentence boundary, as the encoder cuts ``texts``."""
    end_ids = enc.tokenizer.sentence_end_ids
    ids = [np.asarray(x) for x in enc.tokenizer.encode(texts).ids]
    plan = plan_for(enc.settings, ids, end_ids)
    hits = total = 0
    for d in np.flatnonzero(plan.windows > 1).tolist():
        b = set(sentence_starts(ids[d], end_ids).tolist())
        w = np.flatnonzero(plan.doc == d)
        edges = plan.start[w[1:]].tolist() + plan.end[w[:-1]].tolist()
        hits += sum(p in b for p in edges)
        total += len(edges)
    return hits / max(total, 1)


def compare(texts: list[str], labels: np.ndarray, model: str, backend: str, k: int) -> dict[str, Any]:
    res: dict[str, Any] = {"documents": len(texts), "labels": len(set(labels.tolist()))}
    seconds: dict[str, float] = {}  # unrounded: a tiny sample encodes in under 0.05 s
    for mode in MODES:
        enc = TextEncoder.from_config(EncodeConfig(model=model, long_documents="truncate" if mode == "truncate" else "windows",
                                                   snap_to_sentences=mode == "snapped", backend=backend))
        t = time.perf_counter()
        got = enc.encode_texts(texts)
        seconds[mode] = time.perf_counter() - t
        res[f"{mode}_seconds"] = round(seconds[mode], 1)
        res[f"{mode}_tokens_encoded"] = int(got.encoded_tokens.sum())
        res[f"{mode}_knn_accuracy"] = knn_accuracy(got.vectors, labels, k)
        res["document_tokens"] = int(got.n_tokens.sum())
        if mode != "truncate":
            res[f"{mode}_sentence_boundaries"] = sentence_boundary_share(enc, texts)
    res["windows_seconds_per_token_vs_truncate"] = (
        (seconds["windows"] / res["windows_tokens_encoded"]) / (seconds["truncate"] / res["truncate_tokens_encoded"]))
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
    print(f"{'source':12s} {'docs':>5s} {'labels':>6s} {'doc tokens':>10s} | {'truncate':>8s} {'windows':>8s} "
          f"{'snapped':>8s} | {'tokens enc. trunc/win/snap':>30s} | {'s trunc/win/snap':>17s} | "
          f"s/token win vs trunc | sentence boundaries win/snap")
    for name, r in results.items():
        print(f"{name:12s} {r['documents']:5d} {r['labels']:6d} {r['document_tokens']:10d} | "
              f"{r['truncate_knn_accuracy']:8.3f} {r['windows_knn_accuracy']:8.3f} {r['snapped_knn_accuracy']:8.3f} | "
              f"{r['truncate_tokens_encoded']:>10d}/{r['windows_tokens_encoded']}/{r['snapped_tokens_encoded']:<8d} | "
              f"{r['truncate_seconds']:>5.1f}/{r['windows_seconds']}/{r['snapped_seconds']:<6.1f} | "
              f"{r['windows_seconds_per_token_vs_truncate']:20.2f} | "
              f"{r['windows_sentence_boundaries']:.2f}/{r['snapped_sentence_boundaries']:.2f}")
    return 0
