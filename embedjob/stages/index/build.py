"""Building FAISS indices in memory: the document index over every vector shard (scanned in Ray
tasks; IVF kinds trained on a sample drawn from every shard, each shard added in its own task with
its global positions as ids, the parts merged), a word index per set of word vectors (cosine:
L2-normalised, inner product), and an index over any in-memory matrix. Nothing is written here:
:mod:`stage` commits the :class:`BuiltIndex` objects once all are built."""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from embedjob.errors import NothingToDo
from embedjob.stages.index.config import (
    CHUNK_INDEX,
    DOCS,
    INDEX_RECIPE,
    IndexConfig,
    choose_kind,
    default_nlist,
    default_pq_m,
    factory_string,
    min_train_points,
    resolve_metric,
)
from embedjob.stages.index.faiss_index import maybe_refine, new_index, train_index
from embedjob.stages.index.shards import (
    add_parts,
    map_tasks,
    scan_sampled,
    scan_vector_shard,
    shard_codec,
    shard_rows,
)
from embedjob.storage import Storage, StorageError

logger = logging.getLogger(__name__)


@dataclass
class BuiltIndex:
    """An index built in memory, not yet written: the FAISS object, its id map (a row per position)
    and its metadata (what ``index/<name>.json`` holds)."""

    index: Any
    ids: pa.Table
    meta: dict[str, Any]
    rescore: Optional[np.ndarray] = None  # binary: the int8 vectors by position (index/<name>_rescore.npy)


def build_from_matrix(x: np.ndarray, labels: pa.Table, cfg: IndexConfig, metric: str, name: str) -> BuiltIndex:
    """Index an in-memory matrix (word vectors, tests, benchmarks): row i gets label/position i."""
    n, dim = x.shape
    kind, note = _feasible_kind(choose_kind(cfg, n), dim, n, cfg, name)
    t = time.time()
    index = new_index(kind, dim, n, metric, cfg)
    if kind.startswith("ivf"):
        sample = _subsample(x, cfg.train_sample, cfg.seed)
        train_index(index, sample, cfg)
        index.add_with_ids(x, np.arange(n, dtype=np.int64))
        index = maybe_refine(index, kind, cfg, metric, [x])
    else:
        index.add(x)
    meta = _meta(name, kind, metric, dim, n, cfg, index, time.time() - t, note)
    return BuiltIndex(index, labels, meta)


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` rows of ``x``, drawn uniformly with ``seed``, in their order."""
    if len(x) <= n:
        return x
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), size=n, replace=False))]


def _feasible_kind(kind: str, dim: int, n: int, cfg: IndexConfig, name: str) -> tuple[str, Optional[str]]:
    """Fall back to flat when there are too few vectors to train an IVF kind (warns, noted in stats)."""
    need = min_train_points(kind, dim, n, cfg)
    if need and n < need:
        note = (f"index.kind={kind!r} needs at least {need} vectors to train; {name} has {n}: built 'flat' instead")
        logger.warning("index: %s", note)
        return "flat", note
    return kind, None


def _meta(name: str, kind: str, metric: str, dim: int, n: int, cfg: IndexConfig, index, seconds: float,
          note: Optional[str]) -> dict[str, Any]:
    """What ``index/<name>.json`` says of a built index: recipe, kind, metric, factory string,
    search parameters, counts and a fresh build id (the id map carries it too)."""
    desc = factory_string(kind, dim, n, cfg)
    if kind == "ivf_pq" and cfg.refine_k_factor > 0:
        desc += ",RFlat"
    meta = {
        "name": name, "recipe": INDEX_RECIPE, "kind": kind, "requested_kind": cfg.kind, "metric": metric,
        "score": "inner product (higher is nearer)" if metric == "ip" else "squared L2 distance (lower is nearer)",
        "factory": desc, "dim": int(dim), "count": int(index.ntotal),
        "search_params": {"ef_search": cfg.hnsw_ef_search if kind == "hnsw" else None,
                          "nprobe": cfg.ivf_nprobe if kind.startswith("ivf") else None,
                          "refine_k_factor": cfg.refine_k_factor if kind == "ivf_pq" and cfg.refine_k_factor else None},
        "build_seconds": round(seconds, 3), "build_id": uuid.uuid4().hex,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if kind == "hnsw":
        meta["hnsw"] = {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction}
    if kind.startswith("ivf"):
        meta["ivf"] = {"nlist": default_nlist(cfg, n), "train_sample": min(n, cfg.train_sample)}
        if kind == "ivf_pq":
            meta["ivf"].update(pq_m=default_pq_m(cfg, dim), pq_bits=cfg.pq_bits)
    if note:
        meta["note"] = note
    return meta


def build_docs_index(cfg: IndexConfig, vector_urls: list[str], storage_options: dict[str, Any],
                     normalized: bool) -> BuiltIndex:
    """The document index over every vector shard, ids in shard order then row order."""
    if not vector_urls:
        raise StorageError("index: no vector shards to index (did every shard fail?)")
    metric = resolve_metric(cfg, normalized)
    t0 = time.time()
    codec = shard_codec(vector_urls[0], storage_options)
    if codec["dtype"] == "binary":
        return _build_binary(vector_urls, storage_options, codec, t0, cfg.rescore_factor)
    kind, results = _scan_shards(cfg, vector_urls, storage_options)
    sampled = kind.startswith("ivf")  # ids and a sample only: the vectors are read per shard later
    counts = [r["count"] for r in results]
    n = sum(counts)
    dim = _common_dim(results, n, len(vector_urls))
    ids = _id_map(results, counts, n)
    kind, note = _feasible_kind(kind, dim, n, cfg, "the documents")
    index = new_index(kind, dim, n, metric, cfg)
    if kind.startswith("ivf"):
        index = _add_ivf(index, kind, dim, n, metric, cfg, results, counts, vector_urls, storage_options, t0)
    else:
        results = _add_flat(index, results, sampled, vector_urls, storage_options)
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} vectors, expected {n}")
    meta = _meta(DOCS, kind, metric, dim, n, cfg, index, time.time() - t0, note)
    meta.update(shards=len(vector_urls), null_vectors=sum(r["null_vectors"] for r in results),
                normalized_vectors=bool(normalized), vector_dtype=codec["dtype"])
    logger.info("index: %s over %d document vectors (%s) built in %.1fs", meta["factory"], n, metric,
                meta["build_seconds"])
    return BuiltIndex(index, ids, meta)


def _build_binary(vector_urls: list[str], storage_options: dict[str, Any], codec: dict[str, Any],
                  t0: float, rescore_factor: int = 1) -> BuiltIndex:
    """``output.vector_dtype: binary``: an exact FAISS binary index (Hamming distance) over the
    packed bits of every shard, whatever ``index.kind`` says (the bits are the compression), and
    the shards' int8 ``rescore`` vectors, when every shard has them, to rescore its candidates."""
    import faiss

    results = map_tasks(scan_vector_shard, [(u, storage_options) for u in vector_urls], {"with_vectors": True})
    counts = [r["count"] for r in results]
    n = sum(counts)
    if n == 0:
        raise NothingToDo(f"nothing to index: the {len(vector_urls)} vector shard(s) hold no non-null vector "
                          "(every text empty or null)")
    width = next(r["vectors"].shape[1] for r in results if r["count"])
    index = faiss.IndexBinaryFlat(width * 8)
    for r in results:
        if r["count"]:
            index.add(r["vectors"])
    meta = {"name": DOCS, "recipe": INDEX_RECIPE, "kind": "binary_flat", "requested_kind": "binary_flat",
            "metric": "hamming", "score": "Hamming distance in bits (lower is nearer)", "factory": f"BFlat{width * 8}",
            "dim": int(codec.get("dim") or width * 8), "count": int(index.ntotal), "search_params": {},
            "build_seconds": round(time.time() - t0, 3), "build_id": uuid.uuid4().hex,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": len(vector_urls),
            "null_vectors": sum(r["null_vectors"] for r in results), "vector_dtype": "binary"}
    rescore = None
    if all("rescore" in r for r in results) and "rescore" in codec:
        rescore = np.concatenate([r["rescore"] for r in results])
        meta["rescore"] = {"factor": int(rescore_factor), "scale": codec["rescore"]["scale"],
                           "score": "inner product with the stored int8 vectors (higher is nearer)"}
        logger.info("index: binary Hamming index over %d document vectors built in %.1fs; a search rescores "
                    "the k * %d nearest with the int8 vectors", n, meta["build_seconds"], rescore_factor)
    else:
        logger.info("index: binary Hamming index over %d document vectors built in %.1fs (no int8 rescore "
                    "column in the vector shards: Hamming ranking only)", n, meta["build_seconds"])
    return BuiltIndex(index, _id_map(results, counts, n), meta, rescore)


def _scan_shards(cfg: IndexConfig, vector_urls: list[str],
                 storage_options: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The kind (chosen by rows; the exact count, null vectors left out, follows) and every shard's
    scan: for an IVF kind ids and a training sample (proportional to each shard's rows), the vectors
    being read per shard later; else ids and vectors."""
    total_rows = map_tasks(shard_rows, [(u, storage_options) for u in vector_urls], {})
    n_rows = sum(total_rows)
    kind = choose_kind(cfg, n_rows)
    if kind.startswith("ivf"):
        results = map_tasks(scan_sampled, [
            (u, storage_options, max(1, math.ceil(cfg.train_sample * r / max(n_rows, 1))), cfg.seed + i)
            for i, (u, r) in enumerate(zip(vector_urls, total_rows))], {})
    else:
        results = map_tasks(scan_vector_shard, [(u, storage_options) for u in vector_urls],
                            {"with_vectors": True})
    return kind, results


def _common_dim(results: list[dict[str, Any]], n: int, n_shards: int) -> int:
    """The one vector dimension of all shards (an error when there is no vector or more than one)."""
    dims = {r["dim"] for r in results if r["dim"]}
    if n == 0 or not dims:
        raise NothingToDo(f"nothing to index: the {n_shards} vector shard(s) hold no non-null vector "
                          "(every text empty or null)")
    if len(dims) > 1:
        raise StorageError(f"index: vector shards have different dimensions {sorted(dims)}")
    return dims.pop()


def _id_map(results: list[dict[str, Any]], counts: list[int], n: int) -> pa.Table:
    """``position`` -> ``id``, ``shard`` and ``row`` of every indexed vector, in shard then row order."""
    return pa.table({
        "position": pa.array(np.arange(n, dtype=np.int64)),
        "id": pa.concat_arrays([r["ids"] for r in results]) if n else pa.array([], pa.string()),
        "shard": pa.array(np.repeat(np.array([r["shard"] for r in results], dtype=object), counts), pa.string()),
        "row": pa.array(np.concatenate([r["rows"] for r in results]), pa.int64()),
    })


def _add_ivf(index, kind: str, dim: int, n: int, metric: str, cfg: IndexConfig, results: list[dict[str, Any]],
             counts: list[int], vector_urls: list[str], storage_options: dict[str, Any], t0: float):
    """Train on the shards' samples, add each shard to its own copy of the trained index (Ray
    tasks, global positions as ids) and merge the parts in shard order; returns the index."""
    import faiss

    sample = np.concatenate([r["sample"] for r in results if r.get("sample") is not None and len(r["sample"])])
    sample = _subsample(sample, cfg.train_sample, cfg.seed)
    train_index(index, sample, cfg)
    logger.info("index: %s trained on %d sampled vectors in %.1fs", factory_string(kind, dim, n, cfg),
                len(sample), time.time() - t0)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    trained = faiss.serialize_index(index)
    keep = kind == "ivf_pq" and cfg.refine_k_factor > 0
    parts = add_parts(vector_urls, storage_options, trained, offsets, keep)
    for p in parts:
        part = faiss.deserialize_index(p["part"])
        index.merge_from(part, 0)
    return maybe_refine(index, kind, cfg, metric, [p["vectors"] for p in parts if keep])


def _add_flat(index, results: list[dict[str, Any]], sampled: bool, vector_urls: list[str],
              storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Add every shard's vectors in order (flat, hnsw); returns the scans used."""
    if sampled:  # fell back to flat after a sampled scan: read the vectors now
        results = map_tasks(scan_vector_shard, [(u, storage_options) for u in vector_urls],
                            {"with_vectors": True})
    for r in results:
        if r["count"]:
            index.add(r["vectors"])
        r["vectors"] = None  # the index holds its own copy
    return results


def build_words_index(cfg: IndexConfig, name: str, kv) -> BuiltIndex:
    """A cosine index over one set of word vectors; position i is ``kv.index_to_key[i]``."""
    x = np.ascontiguousarray(kv.vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    words = list(kv.index_to_key)
    labels = pa.table({"position": pa.array(np.arange(len(words), dtype=np.int64)),
                       "word": pa.array(words, pa.string())})
    built = build_from_matrix(x, labels, cfg, "ip", f"words-{name}")
    built.meta["normalized_vectors"] = True
    logger.info("index: %s over %d %s word vectors built in %.1fs", built.meta["factory"], len(words), name,
                built.meta["build_seconds"])
    return built


def build_chunks_index(cfg: IndexConfig, chunk_urls: list[str], storage_options: dict[str, Any],
                       normalized: bool) -> BuiltIndex:
    """The passage index over ``chunks/<shard>.parquet`` (encode.write_chunks): position ->
    ``id``, ``chunk``, ``start_char``, ``end_char``, ``shard``."""
    xs, labels = [], []
    for url in chunk_urls:
        t = Storage(url, storage_options).read_parquet("")
        if not t.num_rows:
            continue
        vec = t.column("vector").combine_chunks()
        xs.append(np.asarray(vec.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(t.num_rows, -1))
        shard = url.rstrip("/").rsplit("/", 1)[-1][: -len(".parquet")]
        labels.append(t.select(["id", "chunk", "start_char", "end_char"]).append_column(
            "shard", pa.array([shard] * t.num_rows, pa.string())))
    if not xs:
        raise StorageError("index: encode.write_chunks is on but no chunk files hold rows")
    x = np.ascontiguousarray(np.concatenate(xs))
    t0 = time.time()
    built = build_from_matrix(x, pa.concat_tables(labels), cfg, resolve_metric(cfg, normalized), CHUNK_INDEX)
    built.meta.update(shards=len(chunk_urls), normalized_vectors=bool(normalized))
    logger.info("index: %s over %d passage vectors built in %.1fs", built.meta["factory"], len(x), time.time() - t0)
    return built
