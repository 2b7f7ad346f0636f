"""`embedjob bench vectors`: what each ``output.vector_dtype`` costs and loses, and what the Lance
sink costs, measured side by side on one set of encoded documents.

The first ``--limit`` non-empty documents of a corpus are encoded once with the job's encoder
(cached in ``--cache`` with the encode time, so a rerun does not encode again) and cut into shards
of ``--shard-rows`` (int8 with the one scale every shard shares, as the job does). For each dtype the
shards are written as the job writes ``vectors/<shard>.parquet`` and as Lance fragments, and
indexed by the index stage's own code (``index.kind=flat``: exact search over the stored vectors;
binary: FAISS Hamming search, its candidates rescored with the int8 ``rescore`` column); ``--queries``
held-out documents are searched as ``embedjob search`` searches, and recall@10 is measured against
exact float32 search; for binary also recall@10 and query time per rescore factor (``RESCORE_FACTORS``;
1 = Hamming ranking only). The Lance write (fragments of
every shard with the text carried, then the commit) is timed against the encoding of the same
documents (the job's goal: at most 5%).

    embedjob bench vectors --limit 20000 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedjob.models import model_fingerprint
from embedjob.stages.encode import EncodeConfig, TextEncoder, resolve_encoder_settings
from embedjob.stages.lance_sink.dataset import commit_docs
from embedjob.stages.lance_sink.write import write_shard_fragments
from embedjob.storage import Storage, list_shards
from embedjob.vector_codec import add_rescore_column, bytes_per_vector, encode, with_codec

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "int8", "binary")
RESCORE_FACTORS = (1, 2, 4, 8, 16, 32)  # binary: k * factor Hamming candidates rescored with int8


def load_documents(corpus_url: str, limit: int) -> pa.Table:
    """``id``, ``text`` of the first ``limit`` non-empty documents, in shard order."""
    parts, n = [], 0
    for url in list_shards(corpus_url):
        t = Storage(url).read_parquet("", columns=["id", "text"])
        t = t.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(
            pc.fill_null(t.column("text"), ""))), 0))
        parts.append(t.select(["id", "text"]).cast(pa.schema([("id", pa.string()), ("text", pa.string())])))
        n += t.num_rows
        if n >= limit:
            break
    return pa.concat_tables(parts).slice(0, limit)


def encode_documents(docs: pa.Table, cache: str, model: str, chunk: int = 1000) -> tuple[np.ndarray, float]:
    """(vectors, encode seconds) of ``docs`` with the default encoder settings, cached chunk by
    chunk (``chunk`` documents per ``.npy``, with its seconds), so an interrupted run resumes."""
    cfg = EncodeConfig(model=model)
    settings = resolve_encoder_settings(cfg)
    ids = docs.column("id").to_pylist()
    key = hashlib.sha256(json.dumps([ids[:10], model_fingerprint(settings.model_path), settings.dtype, chunk])
                         .encode()).hexdigest()[:12]
    folder = os.path.join(cache, f"bench-vectors-{key}")
    os.makedirs(folder, exist_ok=True)
    texts = docs.column("text").to_pylist()
    enc = None
    parts, seconds = [], 0.0
    for c, start in enumerate(range(0, len(texts), chunk)):
        path = os.path.join(folder, f"chunk-{c:05d}")
        n = min(chunk, len(texts) - start)
        if os.path.exists(path + ".json") and json.load(open(path + ".json"))["documents"] == n:
            parts.append(np.load(path + ".npy", allow_pickle=False))
            seconds += json.load(open(path + ".json"))["encode_seconds"]
            continue
        if enc is None:
            enc = TextEncoder(settings, batch_tokens=cfg.batch_tokens_for(settings.device),
                              max_batch_docs=cfg.max_batch_docs)
        t = time.perf_counter()
        x = enc.encode_texts(texts[start:start + n]).vectors
        dt = time.perf_counter() - t
        np.save(path + ".npy", x)
        with open(path + ".json", "w") as f:  # written last: a chunk without it is encoded again
            json.dump({"encode_seconds": dt, "documents": n, "model": model, "dtype": settings.dtype}, f)
        logger.info("bench vectors: encoded documents %d-%d in %.1fs", start, start + n, dt)
        parts.append(x)
        seconds += dt
    return np.concatenate(parts), seconds


def encode_rate_now(docs: pa.Table, model: str, n: int) -> float:
    """Seconds per document of encoding ``n`` of ``docs`` now (beside the Lance writes, under the
    same load of a shared machine), after one warm-up batch."""
    cfg = EncodeConfig(model=model)
    settings = resolve_encoder_settings(cfg)
    enc = TextEncoder(settings, batch_tokens=cfg.batch_tokens_for(settings.device), max_batch_docs=cfg.max_batch_docs)
    texts = docs.column("text").to_pylist()
    enc.encode_texts(texts[:16])
    t = time.perf_counter()
    enc.encode_texts(texts[16:16 + n])
    return (time.perf_counter() - t) / max(1, min(n, len(texts) - 16))


def lance_warmup(folder: str) -> float:
    """Seconds of the first Lance write of a process (import, runtime start): paid once per commit
    worker in a job, kept out of the per-shard timings."""
    t = time.perf_counter()
    from lance.fragment import write_fragments

    write_fragments(pa.table({"id": ["x"]}), os.path.join(folder, "warmup.lance"), mode="overwrite")
    return time.perf_counter() - t


def _shards(n: int, rows: int) -> list[tuple[str, int, int]]:
    return [(f"part-{i:05d}", s, min(n, s + rows)) for i, s in enumerate(range(0, n, rows))]


def write_vectors(folder: str, ids: list[str], x: np.ndarray, dtype: str, shards: list[tuple[str, int, int]]) -> int:
    """``vectors/<shard>.parquet`` as the job writes them; returns their bytes on disk."""
    os.makedirs(os.path.join(folder, "vectors"), exist_ok=True)
    total = 0
    for name, a, b in shards:
        arr, codec = encode(x[a:b], dtype)
        t = pa.table({"id": pa.array(ids[a:b], pa.string()), "vector": arr,
                      "n_tokens": pa.array(np.zeros(b - a, np.int32))})
        if dtype == "binary":  # output.binary_rescore (the default)
            t, codec = add_rescore_column(t, x[a:b], None, codec)
        path = os.path.join(folder, "vectors", f"{name}.parquet")
        pq.write_table(t.replace_schema_metadata(with_codec(t.schema, codec).metadata), path)
        total += os.path.getsize(path)
    return total


def search_recall(folder: str, n_shards: int, q: np.ndarray, truth: np.ndarray, k: int,
                  factors: tuple[int, ...] = ()) -> tuple[float, list[dict[str, Any]]]:
    """recall@k of the index stage's index over ``folder``'s vectors (as ``embedjob search``), and
    for binary vectors recall@k and milliseconds per query for each rescore factor of ``factors``."""
    from embedjob.stages.index.build import build_docs_index
    from embedjob.stages.index.config import IndexConfig
    from embedjob.stages.index.search import LoadedIndex

    urls = [os.path.join(folder, "vectors", f"part-{i:05d}.parquet") for i in range(n_shards)]
    built = build_docs_index(IndexConfig(kind="flat"), urls, {}, True)
    loaded = LoadedIndex(built.index, built.ids, built.meta, built.rescore)

    def recall(labels: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(labels, truth)]))

    rows = []
    for f in factors if built.rescore is not None else ():
        t = time.perf_counter()
        _, labels = loaded.search_vectors(q, k, rescore_factor=f)
        rows.append({"factor": f, f"recall_at_{k}": round(recall(labels), 4),
                     "ms_per_query": round(1000 * (time.perf_counter() - t) / len(q), 4)})
    return recall(loaded.search_vectors(q, k)[1]), rows


def lance_write(folder: str, docs: pa.Table, x: np.ndarray, dtype: str, shards: list[tuple[str, int, int]],
                *, index: str = "none") -> dict[str, Any]:
    """Every shard's Lance fragments (text carried) as the commit tasks write them, then the
    version commit; seconds and bytes on disk per vector."""
    out = Storage(folder)
    src = os.path.join(folder, "docs.parquet")
    pq.write_table(docs, src)
    keep, t_write = {}, 0.0
    for name, a, b in shards:
        arr, codec = encode(x[a:b], dtype)
        t = pa.table({"id": docs.column("id").slice(a, b - a), "vector": arr,
                      "n_tokens": pa.array(np.zeros(b - a, np.int32))})
        t = t.replace_schema_metadata(with_codec(t.schema, codec).metadata)
        t0 = time.perf_counter()
        part = write_shard_fragments(out, name, t, pa.array(np.arange(a, b)), {"carry_columns": ["text"],
                                                                               "input_url": src})
        t_write += time.perf_counter() - t0
        keep[name] = {"lance": part}
    stats = commit_docs(out, keep, index=index, min_rows=1, normalized=True)
    t_commit = stats["commit_seconds"]  # the version's commit; the ANN index is timed on its own
    data = os.path.join(folder, "lance", "docs.lance", "data")
    size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
    res = {"write_seconds": round(t_write, 3), "commit_seconds": round(t_commit, 3),
           "bytes_on_disk_per_row": round(size / len(x), 1)}
    if "index" in stats:
        res["index"] = stats["index"]
    return res


def run_bench(docs: pa.Table, x: np.ndarray, encode_seconds: float, *, queries: int, shard_rows: int,
              k: int = 10, lance_index: str = "ivf_pq", seed: int = 0,
              encode_now: float = 0.0) -> dict[str, Any]:
    """Every dtype's bytes, recall@k and Lance write; ``encode_seconds`` of all of ``x``,
    ``encode_now`` seconds per document measured beside the writes (0: not measured)."""
    import faiss

    from embedjob.stages.index.config import IndexConfig

    rng = np.random.default_rng(seed)
    qi = np.sort(rng.choice(len(x), size=min(queries, len(x) // 10), replace=False))
    mask = np.ones(len(x), bool)
    mask[qi] = False
    base, q, base_docs = np.ascontiguousarray(x[mask]), np.ascontiguousarray(x[qi]), docs.filter(pa.array(mask))
    ids = base_docs.column("id").to_pylist()
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth = exact.search(q, k)
    shards = _shards(len(base), shard_rows)
    res: dict[str, Any] = {"documents": int(len(base)), "queries": int(len(q)), "dim": int(base.shape[1]),
                           "shards": len(shards), "encode_seconds": round(encode_seconds, 2), "dtypes": {}}
    per_doc = encode_seconds / len(x)
    res.update(encode_seconds_per_1000=round(1000 * per_doc, 2),
               **({"encode_seconds_per_1000_now": round(1000 * encode_now, 2)} if encode_now else {}))
    with tempfile.TemporaryDirectory(prefix="embedjob-bench-vectors-") as tmp:
        res["lance_warmup_seconds"] = round(lance_warmup(tmp), 3)
        for dtype in DTYPES:
            folder = os.path.join(tmp, dtype)
            parquet_bytes = write_vectors(folder, ids, base, dtype, shards)
            rec, per_factor = search_recall(folder, len(shards), q, truth, k, RESCORE_FACTORS if dtype == "binary" else ())
            row = {"bytes_per_vector": bytes_per_vector(dtype, base.shape[1]),
                   "parquet_bytes_per_row": round(parquet_bytes / len(base), 1), f"recall_at_{k}": round(rec, 4)}
            if per_factor:
                row["rescore"] = {"default_factor": IndexConfig().rescore_factor, "factors": per_factor}
            lance = lance_write(folder, base_docs, base, dtype, shards,
                                index=lance_index if dtype in ("float32", "binary") else "none")
            row["lance"] = lance
            spent = lance["write_seconds"] + lance["commit_seconds"]
            row["lance_write_share_of_encode"] = round(spent / (per_doc * len(base)), 4)
            if encode_now:
                row["lance_write_share_of_encode_now"] = round(spent / (encode_now * len(base)), 4)
            res["dtypes"][dtype] = row
            logger.info("bench vectors: %s %s", dtype, row)
    return res


def run(args: argparse.Namespace) -> int:
    """``embedjob bench vectors`` (flags in :mod:`embedjob.cli`)."""
    from embedjob.bench.corpus import DEFAULT_CORPUS

    corpus = args.corpus or DEFAULT_CORPUS
    docs = load_documents(corpus, args.limit)
    x, enc_s = encode_documents(docs, args.cache, args.model)
    now = encode_rate_now(docs, args.model, args.encode_sample) if args.encode_sample else 0.0
    res = run_bench(docs, x, enc_s, queries=args.queries, shard_rows=args.shard_rows, lance_index=args.lance_index,
                    encode_now=now)
    res["corpus"] = corpus
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"vectors bench: {res['documents']} documents (dim {res['dim']}) of {corpus} in {res['shards']} shards, "
          f"{res['queries']} held-out queries; encoding: {res['encode_seconds_per_1000']}s per 1000 documents "
          f"({res.get('encode_seconds_per_1000_now', '-')}s measured beside the writes); first Lance write of a "
          f"process {res['lance_warmup_seconds']}s (once per commit worker, not counted below)")
    for dtype, row in res["dtypes"].items():
        lance = row["lance"]
        print(f"  {dtype:8s} {row['bytes_per_vector']:5d} B/vector ({row['parquet_bytes_per_row']} B/row in Parquet, "
              f"{lance['bytes_on_disk_per_row']} B/row in Lance with text); recall@10 vs float32 exact "
              f"{row['recall_at_10']:.4f}; Lance write {lance['write_seconds'] + lance['commit_seconds']:.2f}s = "
              f"{100 * row['lance_write_share_of_encode']:.2f}% of encoding "
              f"({100 * row.get('lance_write_share_of_encode_now', float('nan')):.2f}% of the encoding measured beside it)")
        for r in row.get("rescore", {}).get("factors", []):
            print(f"           rescore factor {r['factor']:3d}: recall@10 {r['recall_at_10']:.4f}, "
                  f"{r['ms_per_query']:.3f} ms/query" + ("  (index.rescore_factor default)"
                                                         if r["factor"] == row["rescore"]["default_factor"] else ""))
        if "index" in lance:
            print(f"           Lance {lance['index'].get('index_type')} index: {lance['index']}")
    return 0
