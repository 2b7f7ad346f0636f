"""`embedjob bench dedup`: the dedup stage's recall, precision, seconds and peak memory against the
number of documents, on a corpus's vectors.

For each size N (``--sizes``, default 20000, 87000 and the whole corpus) the first N vectors are
written as ``vectors/<shard>.parquet`` files of ``--shard-rows`` rows to a scratch output, and the
stage itself (:func:`~embedjob.stages.dedup.stage.run_dedup`, on a local Ray of ``--cpus`` CPUs)
runs in each ``--modes`` (``auto`` by default: exact up to ``dedup.exact_max``, partitioned above).
The truth is brute force on ``--queries`` documents sampled uniformly: every pair of a sampled
document with any document at cosine >= the threshold. Recall = the share of those pairs that the
stage found; precision = the share of the stage's pairs of sampled documents that are true.
Peak memory: the driver's peak RSS during the stage, and the largest peak RSS of a task's worker.

Vectors: ``--vectors OUTPUT_URL`` (a finished job's), else the corpus encoded once with a cheap
setting and cached under ``--cache`` (``--encode minilm``: MiniLM truncated to ``--max-length``
tokens; ``token-mean``: the mean of MiniLM's input word-piece embeddings, seconds for the whole
corpus). ``--limit`` caps the documents (the smoke test runs on a tiny corpus).

    embedjob bench dedup --encode token-mean --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import threading
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from embedjob.bench.corpus import DEFAULT_CORPUS
from embedjob.bench.dedup_vectors import corpus_vectors, job_vectors, token_mean_vectors
from embedjob.config import apply_override
from embedjob.layout import DEDUP_PAIRS, VECTORS
from embedjob.stages.dedup.config import DedupConfig
from embedjob.stages.dedup.pairs import EPS, unit_rows
from embedjob.stages.dedup.stage import run_dedup
from embedjob.storage import Storage
from embedjob.vector_codec import encode

logger = logging.getLogger(__name__)


class RssPeak:
    """The driver's resident memory, sampled every 50 ms while it runs (its peak over a span)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):  # not Linux: the process's peak so far
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            self._stop.wait(0.05)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def write_shards(folder: str, x: np.ndarray, ids: list[str], shard_rows: int) -> list[str]:
    """``vectors/part-NNNNN.parquet`` files as the job writes them; returns their URLs."""
    out = Storage(folder)
    urls = []
    for s, start in enumerate(range(0, len(x), shard_rows)):
        sl = slice(start, start + shard_rows)
        arr, _ = encode(x[sl], "float32")
        rel = f"{VECTORS}/part-{s:05d}.parquet"
        out.write_parquet(rel, pa.table({"id": pa.array(ids[sl], pa.string()), "vector": arr,
                                         "n_tokens": pa.array(np.full(len(arr), 8, np.int32))}))
        urls.append(out.url(rel))
    return urls


def true_pairs(x: np.ndarray, queries: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Brute force: every (min, max) position pair of a query row with any row at cosine >= threshold."""
    found: set[tuple[int, int]] = set()
    for i in range(0, len(queries), 512):
        q = queries[i:i + 512]
        sims = x[q] @ x.T
        r, c = np.nonzero(sims >= threshold - EPS)
        for a, b in zip(q[r], c):
            if a != b:
                found.add((int(min(a, b)), int(max(a, b))))
    return found


def measure(x: np.ndarray, ids: list[str], n: int, mode: str, cfg: DedupConfig, queries: int, shard_rows: int,
            seed: int = 0) -> dict[str, Any]:
    """One size and mode: the stage's time and memory, its recall and precision on sampled documents."""
    xs, id_n = x[:n], ids[:n]
    with tempfile.TemporaryDirectory(prefix="embedjob-bench-dedup-") as tmp:
        urls = write_shards(tmp, xs, id_n, shard_rows)
        out = Storage(tmp)
        rss_before = RssPeak.rss_mb()
        t = time.perf_counter()
        with RssPeak() as rss:
            stats = run_dedup(cfg.model_copy(update={"mode": mode, "enabled": True}), out, urls)
        secs = time.perf_counter() - t
        pairs = out.read_parquet(DEDUP_PAIRS)
    pos = {d: i for i, d in enumerate(id_n)}
    got = {(min(pos[a], pos[b]), max(pos[a], pos[b])) for a, b in
           zip(pairs.column("id_a").to_pylist(), pairs.column("id_b").to_pylist())}
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    truth = true_pairs(xs, q, cfg.threshold)
    qs = set(q.tolist())
    got_q = {p for p in got if p[0] in qs or p[1] in qs}
    hit = len(got_q & truth)
    part = stats.get("partitioned") or stats.get("exact") or {}
    return {"documents": n, "mode": stats["mode"], "seconds": round(secs, 2), "pairs": stats["pairs"],
            "groups": stats["groups"], "dropped": stats["dropped"], "sampled_queries": len(q),
            "true_pairs_sampled": len(truth), "found_pairs_sampled": len(got_q),
            "recall": round(hit / len(truth), 4) if truth else None,
            "precision": round(hit / len(got_q), 4) if got_q else None,
            "driver_peak_rss_mb": round(rss.peak, 1), "driver_rss_before_mb": round(rss_before, 1),
            "task_peak_rss_mb": part.get("task_peak_rss_mb"),
            "plan": {k: v for k, v in part.items() if k != "task_peak_rss_mb"}}


def load_vectors(args: argparse.Namespace) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    if args.vectors:
        opts: dict[str, Any] = {}
        for kv in args.storage_option:
            apply_override(opts, kv)
        x, ids = job_vectors(args.vectors, opts)
        return unit_rows(x), ids, {"kind": "job output", "source": args.vectors}
    corpus = args.corpus or DEFAULT_CORPUS
    if args.encode == "token-mean":
        return token_mean_vectors(corpus, args.cache, model=args.model, max_length=args.max_length or 128)
    return corpus_vectors(corpus, args.cache, model=args.model, max_length=args.max_length or 32,
                          backend=args.backend)


def _sizes(spec: Optional[str], total: int) -> list[int]:
    if not spec:
        return sorted({min(total, 20000), min(total, 87000), total})
    return sorted({min(total, int(s)) for s in spec.split(",")})


def run(args: argparse.Namespace) -> int:
    """``embedjob bench dedup`` (flags in :mod:`embedjob.cli`)."""
    import ray

    t = time.time()
    x, ids, meta = load_vectors(args)
    if args.limit:
        x, ids = x[: args.limit], ids[: args.limit]
    load_s = time.time() - t
    data: dict[str, Any] = {"dedup": {"enabled": True, "threshold": args.threshold}}
    for kv in args.set:  # dedup.KEY=VALUE, as --set in `embedjob run`
        apply_override(data, kv if kv.startswith("dedup.") else f"dedup.{kv}")
    cfg = DedupConfig.model_validate(data["dedup"])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure(x, ids, n, m, cfg, args.queries, args.shard_rows)
                for n in _sizes(args.sizes, len(x)) for m in args.modes.split(",")]
    finally:
        if started:
            ray.shutdown()
    res = {"vectors": {**{k: v for k, v in meta.items() if k != "shards"}, "load_seconds": round(load_s, 1),
                       "dim": int(x.shape[1])},
           "threshold": cfg.threshold, "cpus": args.cpus, "probes": cfg.probes, "partition_size": cfg.partition_size,
           "driver_peak_rss_mb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "rows": rows}
    if args.json:
        print(json.dumps(res))
        return 0
    v = res["vectors"]
    print(f"dedup bench: threshold {cfg.threshold}, {args.cpus} CPUs, vectors: {v.get('kind') or v.get('backend')} "
          f"{v.get('model', '')} (made in {v.get('encode_seconds', '?')} s), dim {v['dim']}")
    for r in rows:
        print(f"  {r['documents']:>7} docs {r['mode']:>11}: {r['seconds']:7.1f} s, recall {r['recall']}, precision "
              f"{r['precision']} ({r['true_pairs_sampled']} true pairs of {r['sampled_queries']} sampled docs), "
              f"{r['pairs']} pairs, {r['dropped']} dropped; peak RSS driver {r['driver_peak_rss_mb']} MiB, task "
              f"{r['task_peak_rss_mb']} MiB")
    return 0
