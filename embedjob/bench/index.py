"""`embedjob bench index`: recall@10 of the ANN document index against exact search, and the
queries/s of each, measured side by side in one run.

The vectors are a finished job's (``--vectors OUTPUT_URL``: its ``vectors/*.parquet``) or are
encoded here from a corpus (``--corpus URL --limit N``, with the job's encoder settings, cached in
``--cache`` so a rerun does not encode again). ``--queries`` vectors are held out of the index
and used as queries; the exact answers come from ``faiss.IndexFlat`` over the same vectors.
The ANN index is built with the index stage's own code and config (``--set index.key=value``).
Both searches get the same batches (``--batch-size``; default: all queries at once, which
favours the exact search's BLAS path) and the same threads; each is timed ``--repeat`` times and
the fastest run counts. Both wall-clock queries/s and queries per CPU-second of the process are
reported: on a shared, oversubscribed machine use ``--threads 1`` and read the CPU figures.

    embedjob bench index --vectors output/mixed-en --kind hnsw --queries 1000 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

import numpy as np

from embedjob.models import model_fingerprint
from embedjob.stages.encode import EncodeConfig, TextEncoder, resolve_encoder_settings
from embedjob.storage import Storage, StorageError, list_shards

logger = logging.getLogger(__name__)


def load_job_vectors(output_url: str, storage_options: dict[str, Any], limit: Optional[int]) -> np.ndarray:
    """The non-null document vectors of a job output, in shard then row order."""
    from embedjob.stages.index.shards import scan_vector_shard

    out = Storage(output_url, storage_options)
    names = out.list("vectors", suffix=".parquet")
    if not names:
        raise StorageError(f"no vectors/*.parquet under {output_url}")
    parts, n = [], 0
    for nm in names:
        r = scan_vector_shard(out.url(f"vectors/{nm}"), storage_options, with_vectors=True)
        parts.append(r["vectors"])
        n += len(r["vectors"])
        if limit and n >= limit:
            break
    x = np.concatenate(parts)
    return x[:limit] if limit else x


def encode_corpus(corpus_url: str, limit: int, cache: Optional[str], model: str) -> np.ndarray:
    """Encode the first ``limit`` non-empty texts of a corpus with the default encoder settings
    (cached as .npy under ``cache``, keyed by corpus, limit and model fingerprint)."""
    import pyarrow.parquet as pq

    cfg = EncodeConfig(model=model)
    settings = resolve_encoder_settings(cfg)
    key = hashlib.sha256(json.dumps([corpus_url, limit, model_fingerprint(settings.model_path),
                                     {k: v for k, v in settings.as_dict().items() if k != "model_path"}],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache, f"bench-index-{key}.npy") if cache else None
    if path and os.path.exists(path):
        logger.info("bench index: vectors from cache %s", path)
        return np.load(path, allow_pickle=False)
    texts: list[str] = []
    for url in list_shards(corpus_url):
        with Storage(url).open("", "rb") as f:
            col = pq.ParquetFile(f).read(columns=["text"]).column("text").to_pylist()
        texts.extend(t for t in col if t and t.strip())
        if len(texts) >= limit:
            break
    texts = texts[:limit]
    enc = TextEncoder(settings, batch_tokens=cfg.batch_tokens_for(settings.device), max_batch_docs=cfg.max_batch_docs)
    t = time.time()
    x = enc.encode_texts(texts).vectors
    logger.info("bench index: encoded %d documents in %.1fs (%.0f docs/s)", len(texts), time.time() - t,
                len(texts) / max(time.time() - t, 1e-9))
    if path:
        os.makedirs(cache, exist_ok=True)
        np.save(path, x)
    return x


def timed_search(index, q: np.ndarray, k: int, batch_size: int, repeat: int) -> tuple[np.ndarray, float, float]:
    """(labels, best wall seconds, best CPU seconds of this process) over ``repeat`` runs of
    searching ``q`` in batches. CPU time is the steadier measure on a shared, busy machine."""
    best, best_cpu = float("inf"), float("inf")
    labels = None
    for _ in range(max(1, repeat)):
        t, c = time.perf_counter(), time.process_time()
        out = [index.search(q[i:i + batch_size], k)[1] for i in range(0, len(q), batch_size)]
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
        labels = np.concatenate(out)
    return labels, best, max(best_cpu, 1e-9)


def recall_at(ann: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = sum(len(set(a[:k]) & set(e[:k])) for a, e in zip(ann, exact))
    return hits / (k * len(exact))


def run_bench(x: np.ndarray, *, kind: str, queries: int, k: int, batch_size: Optional[int], repeat: int,
              overrides: list[str], sweep: Optional[list[int]], seed: int = 0,
              search_threads: Optional[int] = None) -> dict[str, Any]:
    import faiss
    import pyarrow as pa

    from embedjob.config import load_job
    from embedjob.stages.index.build import build_from_matrix
    from embedjob.stages.index.config import resolve_metric
    from embedjob.stages.index.faiss_index import set_search_params

    cfg = load_job(None, [f"index.kind={kind}", *overrides]).index
    rng = np.random.default_rng(seed)
    qi = np.sort(rng.choice(len(x), size=min(queries, len(x) // 10), replace=False))
    mask = np.ones(len(x), bool)
    mask[qi] = False
    base, q = np.ascontiguousarray(x[mask]), np.ascontiguousarray(x[qi])
    norms = np.linalg.norm(base[: min(len(base), 1000)], axis=1)
    normalized = bool(np.allclose(norms, 1.0, atol=1e-3))
    metric = resolve_metric(cfg, normalized)
    bs = batch_size or len(q)

    exact = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    exact.add(base)
    t = time.perf_counter()
    labels = pa.table({"position": pa.array(np.arange(len(base), dtype=np.int64))})
    built = build_from_matrix(base, labels, cfg, metric, "bench")
    build_s = time.perf_counter() - t
    if search_threads:  # the build used every core; both searches get the same threads
        faiss.omp_set_num_threads(search_threads)
    truth, t_exact, c_exact = timed_search(exact, q, k, bs, repeat)
    ann_labels, t_ann, c_ann = timed_search(built.index, q, k, bs, repeat)
    res = {
        "n_vectors": int(len(base)), "n_queries": int(len(q)), "dim": int(base.shape[1]), "k": k,
        "metric": metric, "kind": built.meta["kind"], "factory": built.meta["factory"],
        "search_params": built.meta["search_params"], "batch_size": bs, "threads": faiss.omp_get_max_threads(),
        "build_seconds": round(build_s, 2),
        "recall_at_10": round(recall_at(ann_labels, truth, 10), 4) if k >= 10 else None,
        f"recall_at_{k}": round(recall_at(ann_labels, truth, k), 4),
        "qps_exact": round(len(q) / t_exact, 1), "qps_ann": round(len(q) / t_ann, 1),
        "qps_exact_cpu": round(len(q) / c_exact, 1), "qps_ann_cpu": round(len(q) / c_ann, 1),
    }
    res["speedup"] = round(res["qps_ann"] / res["qps_exact"], 2)
    res["speedup_cpu"] = round(res["qps_ann_cpu"] / res["qps_exact_cpu"], 2)
    kind_ = built.meta["kind"]
    if sweep and kind_ in ("hnsw", "ivf_flat", "ivf_pq"):
        rows = []
        for v in sweep:
            if kind_ == "hnsw":
                set_search_params(built.index, kind_, v, None)
            else:
                set_search_params(built.index, kind_, None, v)
            lab, ts, cs = timed_search(built.index, q, k, bs, repeat)
            rows.append({"ef_search" if kind_ == "hnsw" else "nprobe": v,
                         "recall_at_10": round(recall_at(lab, truth, 10), 4),
                         "qps_ann": round(len(q) / ts, 1), "speedup": round(len(q) / ts / res["qps_exact"], 2),
                         "qps_ann_cpu": round(len(q) / cs, 1),
                         "speedup_cpu": round(len(q) / cs / res["qps_exact_cpu"], 2)})
        res["sweep"] = rows
    return res


def run(args: argparse.Namespace) -> int:
    """``embedjob bench index`` (flags in :mod:`embedjob.cli`)."""
    from embedjob.config import apply_override

    opts: dict[str, Any] = {}
    for kv in args.storage_option:
        apply_override(opts, kv)
    t = time.time()
    if args.vectors:
        x = load_job_vectors(args.vectors, opts, args.limit)
        source = args.vectors
    else:
        x = encode_corpus(args.corpus, args.limit or 20000, args.cache, args.model)
        source = args.corpus
    load_s = time.time() - t
    res = run_bench(x, kind=args.kind, queries=args.queries, k=args.k, batch_size=args.batch_size,
                    repeat=args.repeat, overrides=args.set,
                    sweep=[int(v) for v in args.sweep.split(",")] if args.sweep else None,
                    search_threads=args.threads)
    res.update(source=source, load_seconds=round(load_s, 1))
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"index bench: {res['n_vectors']} vectors (dim {res['dim']}, {res['metric']}) from {source}, "
          f"{res['n_queries']} held-out queries, batch {res['batch_size']}, {res['threads']} threads")
    print(f"  {res['factory']} {res['search_params']}: built in {res['build_seconds']}s")
    print(f"  recall@{args.k} vs exact: {res[f'recall_at_{args.k}']:.4f}")
    print(f"  queries/s: ann {res['qps_ann']:.0f}, exact (IndexFlat) {res['qps_exact']:.0f} -> {res['speedup']:.1f}x")
    print(f"  queries per CPU-second: ann {res['qps_ann_cpu']:.0f}, exact {res['qps_exact_cpu']:.0f} -> "
          f"{res['speedup_cpu']:.1f}x")
    for row in res.get("sweep", []):
        print("   ", "  ".join(f"{k}={v}" for k, v in row.items()))
    return 0
