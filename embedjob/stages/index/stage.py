"""Index stage: FAISS indices over the document vectors and word vectors of a job, and
``embedjob search``.

The stage reads the committed ``vectors/<shard>.parquet`` files (Ray tasks, one per shard) and
writes, only after everything succeeded:

* ``index/docs.faiss`` — a plain FAISS index (``faiss.read_index`` reads it; no pickle). Its labels
  are *positions* ``0..n-1``;
* ``index/docs_ids.parquet`` — ``position`` -> ``id`` plus the ``shard`` key and ``row`` in
  ``vectors/<shard>.parquet`` (rows with a null vector — empty text — are not indexed);
* ``index/docs.json`` — kind, metric, FAISS factory string, search parameters, counts, build id;
* ``index/words-<name>.faiss`` / ``words-<name>_ids.parquet`` / ``words-<name>.json`` for each set
  of word vectors of a stage enabled in the run (``bert``: static, ``word2vec``), read from their
  safe files (``vectors.bin``; never the pickled ``vectors.kv``); cosine: vectors are
  L2-normalised and searched by inner product.

Kinds: ``flat`` (exact), ``hnsw`` (graph; added sequentially on the driver), ``ivf_flat`` and
``ivf_pq`` (coarse quantizer — and product quantizer — trained on a sample drawn from every
shard, then each shard is added in its own Ray task with its global positions as ids, and the
parts are merged with ``merge_from``: global ids stay right whatever the shard order).
``auto`` picks flat, hnsw or ivf_pq by corpus size. The metric is inner product when the
encoder normalised the vectors (cosine), else L2.

Example::

    stats = run_index(cfg, Storage("s3://bucket/out"), vector_urls, manifest["encoder"], ["bert"])
    hits = search("s3://bucket/out", {}, "interest rates rise", k=5)
    hits[0]  # {"id": "doc-00042", "score": 0.61, "shard": "part-00003", "text_start": "The bank..."}
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from embedjob._config_base import Section
from embedjob.layout import INDEX_DIR, shard_key_of
from embedjob.storage import Storage, StorageError
from embedjob.wordvectors import job_vectors_file, load_job_vectors

logger = logging.getLogger(__name__)

DOCS = "docs"
INDEX_RECIPE = "faiss_index_v1"
KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")
TEXT_START_CHARS = 200


class IndexConfig(Section):
    enabled: bool = Field(True, description="Build FAISS indices over the document vectors (and word vectors).")
    kind: Literal["auto", "flat", "hnsw", "ivf_pq", "ivf_flat"] = Field(
        "auto",
        description="Index kind: 'flat' (exact), 'hnsw' (graph, best recall per query time, vectors kept in "
        "memory), 'ivf_flat' (clustered, exact vectors), 'ivf_pq' (clustered and compressed: the smallest). "
        "'auto' = flat up to auto_flat_max vectors, hnsw up to auto_hnsw_max, ivf_pq above.",
    )
    metric: Literal["auto", "ip", "l2"] = Field(
        "auto",
        description="'ip' (inner product; cosine on normalised vectors) or 'l2' (squared Euclidean distance). "
        "'auto' = ip when the encoder normalised the vectors (encode.normalize), else l2. Word indices are "
        "always cosine.",
    )
    auto_flat_max: int = Field(
        20_000, ge=0, description="kind=auto: an exact flat index up to this many vectors."
    )
    auto_hnsw_max: int = Field(
        5_000_000, ge=0,
        description="kind=auto: hnsw up to this many vectors, ivf_pq above (hnsw keeps every vector plus "
        "its graph in memory: about (4*dim + 8*hnsw_m) bytes each).",
    )
    hnsw_m: int = Field(32, ge=4, le=256, description="hnsw: graph neighbours per node (memory and recall grow with it).")
    hnsw_ef_construction: int = Field(
        80, ge=8, description="hnsw: candidate list size while building (build time and graph quality)."
    )
    hnsw_ef_search: int = Field(
        64, ge=1, description="hnsw: candidate list size per query, stored in the index (recall vs speed)."
    )
    ivf_nlist: Optional[int] = Field(
        None, ge=1,
        description="ivf_*: number of clusters; null = 4*sqrt(n) rounded to a power of two (at most "
        "train_sample/39, at least 1).",
    )
    ivf_nprobe: int = Field(
        32, ge=1, description="ivf_*: clusters visited per query, stored in the index (recall vs speed)."
    )
    pq_m: Optional[int] = Field(
        None, ge=1,
        description="ivf_pq: sub-quantizers (bytes per vector at pq_bits=8); must divide the dimension. "
        "null = the largest divisor of dim that is at most dim/8 (48 for 384-d; training cost grows with it).",
    )
    pq_bits: int = Field(8, ge=4, le=12, description="ivf_pq: bits per sub-quantizer code.")
    refine_k_factor: float = Field(
        0.0, ge=0,
        description="ivf_pq: re-rank k*refine_k_factor PQ candidates with exact distances on the full vectors "
        "(IndexRefineFlat; raises recall, stores the vectors too). 0 = no re-ranking.",
    )
    train_sample: int = Field(
        100_000, ge=256,
        description="ivf_*: vectors sampled uniformly across shards (proportionally to their rows) to train on.",
    )
    words: bool = Field(True, description="Also index the word vectors (Word2Vec, BERT static) of the stages enabled "
                        "in the run.")
    use_gpu: Optional[bool] = Field(
        None,
        description="Train the ivf_* coarse quantizer (k-means) on a GPU with GPU FAISS; null = when GPU FAISS is "
        "installed and sees a GPU on the driver. hnsw and adding are on CPU.",
    )
    seed: int = Field(0, description="Seed of the training sample and k-means (same seed, same index).")


# -- pure helpers (no Ray, no storage) ---------------------------------------------------------
def resolve_metric(cfg: IndexConfig, normalized: bool) -> str:
    """``ip`` or ``l2`` as configured, ``auto`` following the encoder's ``normalize``."""
    if cfg.metric != "auto":
        return cfg.metric
    return "ip" if normalized else "l2"


def choose_kind(cfg: IndexConfig, n: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.auto_flat_max:
        return "flat"
    if n <= cfg.auto_hnsw_max:
        return "hnsw"
    return "ivf_pq"


def default_nlist(cfg: IndexConfig, n: int) -> int:
    """Clusters for ``n`` vectors: ``ivf_nlist`` or 4*sqrt(n) as a power of two, capped so every
    cluster gets at least 39 training points (FAISS's own advice)."""
    train_n = min(n, cfg.train_sample)
    if cfg.ivf_nlist is not None:
        nlist = cfg.ivf_nlist
    else:
        nlist = 2 ** int(round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return int(max(1, min(nlist, train_n // 39 if train_n >= 39 else 1, n)))


def default_pq_m(cfg: IndexConfig, dim: int) -> int:
    if cfg.pq_m is not None:
        if dim % cfg.pq_m:
            raise ValueError(f"index.pq_m={cfg.pq_m} does not divide the vector dimension {dim}")
        return cfg.pq_m
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def factory_string(kind: str, dim: int, n: int, cfg: IndexConfig) -> str:
    """The ``faiss.index_factory`` description of an index of ``kind`` for ``n`` vectors."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    nlist = default_nlist(cfg, n)
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf_pq":
        return f"IVF{nlist},PQ{default_pq_m(cfg, dim)}x{cfg.pq_bits}"
    raise ValueError(f"index.kind={kind!r}; valid: auto, {', '.join(KINDS)}")


def min_train_points(kind: str, dim: int, n: int, cfg: IndexConfig) -> int:
    """Fewest training vectors a kind needs (k-means needs at least one point per centroid)."""
    if kind == "ivf_flat":
        return default_nlist(cfg, n)
    if kind == "ivf_pq":
        return max(default_nlist(cfg, n), 2 ** cfg.pq_bits)
    return 0


def _faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def new_index(kind: str, dim: int, n: int, metric: str, cfg: IndexConfig):
    """An empty (untrained) FAISS index of ``kind`` with its build/search parameters set."""
    import faiss

    index = faiss.index_factory(dim, factory_string(kind, dim, n, cfg), _faiss_metric(metric))
    set_search_params(index, kind, cfg.hnsw_ef_search, cfg.ivf_nprobe)
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = cfg.hnsw_ef_construction
    return index


def set_search_params(index, kind: str, ef_search: Optional[int], nprobe: Optional[int],
                      k_factor: Optional[float] = None) -> None:
    """Apply the query-time parameters (they are also serialised with the index)."""
    import faiss

    if kind == "hnsw" and ef_search:
        faiss.downcast_index(index).hnsw.efSearch = int(ef_search)
    if kind.startswith("ivf"):
        base = index
        if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
            ref = faiss.downcast_index(index)
            if k_factor:
                ref.k_factor = float(k_factor)
            base = ref.base_index
        if nprobe:
            faiss.extract_index_ivf(base).nprobe = int(nprobe)


def _use_gpu(cfg: IndexConfig) -> bool:
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if cfg.use_gpu and gpus == 0:
        logger.warning("index.use_gpu=true but FAISS sees no GPU (faiss-cpu installed?): training on CPU")
    return bool(gpus) if cfg.use_gpu is None else bool(cfg.use_gpu and gpus)


def train_index(index, sample: np.ndarray, cfg: IndexConfig) -> None:
    """Train an IVF index on ``sample``; the coarse k-means runs on a GPU when allowed."""
    import faiss

    if index.is_trained:
        return
    ivf = faiss.extract_index_ivf(index)
    if _use_gpu(cfg):
        km = faiss.Kmeans(sample.shape[1], ivf.nlist, niter=20, seed=cfg.seed, gpu=True,
                          spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT)
        km.train(sample)
        ivf.quantizer.add(km.centroids)  # a filled quantizer is not re-trained by IVF.train
        logger.info("index: coarse quantizer trained on GPU (%d clusters)", ivf.nlist)
    ivf.cp.seed = cfg.seed
    index.train(sample)


def to_float32_matrix(column: pa.ChunkedArray | pa.Array, dim: Optional[int] = None) -> np.ndarray:
    """A (non-null) list / fixed-size-list column as an (n, dim) float32 matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    d = dim or (arr.type.list_size if pa.types.is_fixed_size_list(arr.type) else len(flat) // n)
    if d == 0 or len(flat) != n * d:
        raise ValueError(f"vectors have unequal lengths ({len(flat)} values for {n} rows)")
    return flat.reshape(n, d)


# -- reading vector shards (Ray tasks) ---------------------------------------------------------
def _shard_rows(url: str, storage_options: dict[str, Any]) -> int:
    import pyarrow.parquet as pq

    store = Storage(url, storage_options)
    with store.open("", "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def scan_vector_shard(url: str, storage_options: dict[str, Any], *, with_vectors: bool, sample_n: int = 0,
                      seed: int = 0) -> dict[str, Any]:
    """Ids and rows of the non-null vectors of one ``vectors/<shard>.parquet``, plus the vectors
    themselves (``with_vectors``) and/or a uniform sample of ``sample_n`` of them."""
    store = Storage(url, storage_options)
    try:
        table = store.read_parquet("", columns=["id", "vector"])
    except (OSError, KeyError, pa.ArrowInvalid) as e:
        raise StorageError(f"cannot read vector shard {url!r} (columns id, vector): {e}") from e
    vec = table.column("vector")
    valid = np.asarray(vec.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    rows = np.flatnonzero(valid).astype(np.int64)
    ids = table.column("id").cast(pa.string()).combine_chunks().filter(pa.array(valid))
    x = to_float32_matrix(vec.combine_chunks().filter(pa.array(valid))) if (with_vectors or sample_n) else None
    out: dict[str, Any] = {"shard": shard_key_of(url), "ids": ids, "rows": rows, "count": len(rows),
                           "null_vectors": int(len(valid) - len(rows)),
                           "dim": int(x.shape[1]) if x is not None and len(x) else None}
    if with_vectors:
        out["vectors"] = x
    if sample_n and x is not None:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(x), size=min(sample_n, len(x)), replace=False))
        out["sample"] = x[pick]
    return out


def add_vector_shard(url: str, storage_options: dict[str, Any], trained: np.ndarray, offset: int,
                     keep_vectors: bool) -> dict[str, Any]:
    """Add one shard's vectors to a copy of the trained (empty) IVF index, with global positions
    ``offset..offset+n-1`` as ids; returns the serialised part (and the vectors for re-ranking)."""
    import faiss

    part = scan_vector_shard(url, storage_options, with_vectors=True)
    index = faiss.deserialize_index(trained)
    x = part["vectors"]
    if len(x):
        index.add_with_ids(x, np.arange(offset, offset + len(x), dtype=np.int64))
    return {"part": faiss.serialize_index(index), "count": len(x), "vectors": x if keep_vectors else None}


def _map_tasks(fn, args_list: list[tuple], kwargs: dict[str, Any]) -> list[Any]:
    """Run ``fn`` over shards in Ray tasks when Ray is up (inline otherwise), results in order."""
    import ray

    if ray.is_initialized() and len(args_list) > 1:
        task = ray.remote(num_cpus=1)(fn)
        shared = {k: (ray.put(v) if isinstance(v, np.ndarray) and v.nbytes > 1 << 20 else v)
                  for k, v in kwargs.items()}
        return ray.get([task.remote(*a, **shared) for a in args_list])
    return [fn(*a, **kwargs) for a in args_list]


# -- building ----------------------------------------------------------------------------------
@dataclass
class BuiltIndex:
    index: Any
    ids: pa.Table
    meta: dict[str, Any]


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
        index = _maybe_refine(index, kind, cfg, metric, [x])
    else:
        index.add(x)
    meta = _meta(name, kind, metric, dim, n, cfg, index, time.time() - t, note)
    return BuiltIndex(index, labels, meta)


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
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


def _maybe_refine(index, kind: str, cfg: IndexConfig, metric: str, parts: list[np.ndarray]):
    """Wrap an ivf_pq index in IndexRefineFlat (exact re-ranking) when refine_k_factor > 0."""
    import faiss

    if kind != "ivf_pq" or cfg.refine_k_factor <= 0:
        return index
    flat = faiss.IndexFlat(index.d, index.metric_type)
    for x in parts:  # in position order, as the IVF ids
        if len(x):
            flat.add(x)
    if flat.ntotal != index.ntotal:
        raise RuntimeError(f"refine vectors ({flat.ntotal}) and index ({index.ntotal}) disagree")
    refined = faiss.IndexRefine(index, flat)
    refined.k_factor = float(cfg.refine_k_factor)
    return refined


def _meta(name: str, kind: str, metric: str, dim: int, n: int, cfg: IndexConfig, index, seconds: float,
          note: Optional[str]) -> dict[str, Any]:
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
    total_rows = _map_tasks(_shard_rows, [(u, storage_options) for u in vector_urls], {})
    n_rows = sum(total_rows)
    kind = choose_kind(cfg, n_rows)  # by rows; the exact count (null vectors left out) follows
    ivf = kind.startswith("ivf")
    if ivf:  # ids and a training sample now (proportional to each shard's rows); vectors per shard later
        results = _map_tasks(_scan_sampled, [
            (u, storage_options, max(1, math.ceil(cfg.train_sample * r / max(n_rows, 1))), cfg.seed + i)
            for i, (u, r) in enumerate(zip(vector_urls, total_rows))], {})
    else:
        results = _map_tasks(scan_vector_shard, [(u, storage_options) for u in vector_urls],
                             {"with_vectors": True})
    counts = [r["count"] for r in results]
    n = sum(counts)
    dims = {r["dim"] for r in results if r["dim"]}
    if n == 0 or not dims:
        raise StorageError(f"index: the {len(vector_urls)} vector shard(s) hold no non-null vector")
    if len(dims) > 1:
        raise StorageError(f"index: vector shards have different dimensions {sorted(dims)}")
    dim = dims.pop()
    ids = pa.table({
        "position": pa.array(np.arange(n, dtype=np.int64)),
        "id": pa.concat_arrays([r["ids"] for r in results]) if n else pa.array([], pa.string()),
        "shard": pa.array(np.repeat(np.array([r["shard"] for r in results], dtype=object), counts), pa.string()),
        "row": pa.array(np.concatenate([r["rows"] for r in results]), pa.int64()),
    })
    kind, note = _feasible_kind(kind, dim, n, cfg, "the documents")
    index = new_index(kind, dim, n, metric, cfg)
    if kind.startswith("ivf"):
        sample = np.concatenate([r["sample"] for r in results if r.get("sample") is not None and len(r["sample"])])
        sample = _subsample(sample, cfg.train_sample, cfg.seed)
        train_index(index, sample, cfg)
        logger.info("index: %s trained on %d sampled vectors in %.1fs", factory_string(kind, dim, n, cfg),
                    len(sample), time.time() - t0)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        import faiss

        trained = faiss.serialize_index(index)
        keep = kind == "ivf_pq" and cfg.refine_k_factor > 0
        parts = _add_parts(vector_urls, storage_options, trained, offsets, keep)
        for p in parts:
            part = faiss.deserialize_index(p["part"])
            index.merge_from(part, 0)
        index = _maybe_refine(index, kind, cfg, metric, [p["vectors"] for p in parts if keep])
    else:
        if ivf:  # fell back to flat after a sampled scan: read the vectors now
            results = _map_tasks(scan_vector_shard, [(u, storage_options) for u in vector_urls],
                                 {"with_vectors": True})
        for r in results:
            if r["count"]:
                index.add(r["vectors"])
            r["vectors"] = None  # the index holds its own copy
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} vectors, expected {n}")
    meta = _meta(DOCS, kind, metric, dim, n, cfg, index, time.time() - t0, note)
    meta.update(shards=len(vector_urls), null_vectors=sum(r["null_vectors"] for r in results),
                normalized_vectors=bool(normalized))
    logger.info("index: %s over %d document vectors (%s) built in %.1fs", meta["factory"], n, metric,
                meta["build_seconds"])
    return BuiltIndex(index, ids, meta)


def _scan_sampled(url: str, storage_options: dict[str, Any], sample_n: int, seed: int) -> dict[str, Any]:
    return scan_vector_shard(url, storage_options, with_vectors=False, sample_n=sample_n, seed=seed)


def _add_parts(urls: list[str], storage_options: dict[str, Any], trained: np.ndarray, offsets: np.ndarray,
               keep: bool) -> list[dict[str, Any]]:
    import ray

    if ray.is_initialized() and len(urls) > 1:
        task = ray.remote(num_cpus=1)(add_vector_shard)
        ref = ray.put(trained)
        return ray.get([task.remote(u, storage_options, ref, int(o), keep) for u, o in zip(urls, offsets)])
    return [add_vector_shard(u, storage_options, trained, int(o), keep) for u, o in zip(urls, offsets)]


# -- word vectors ------------------------------------------------------------------------------
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


# -- writing and reading -----------------------------------------------------------------------
def index_files(name: str) -> dict[str, str]:
    """Relative paths of an index's files under the output root."""
    return {"index": f"{INDEX_DIR}/{name}.faiss", "ids": f"{INDEX_DIR}/{name}_ids.parquet",
            "meta": f"{INDEX_DIR}/{name}.json"}


def write_index(out: Storage, built: BuiltIndex) -> dict[str, str]:
    """Commit the id map, the metadata and the FAISS file (each an atomic write)."""
    import faiss

    files = index_files(built.meta["name"])
    ids = built.ids.replace_schema_metadata({b"embedjob.build_id": built.meta["build_id"].encode()})
    out.write_parquet(files["ids"], ids)
    out.write_json(files["meta"], {**built.meta, "files": files})
    out.write_bytes(files["index"], faiss.serialize_index(built.index).tobytes())
    return files


@dataclass
class LoadedIndex:
    index: Any
    ids: pa.Table
    meta: dict[str, Any]

    def search_vectors(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)


def load_index(out: Storage, name: str = DOCS) -> LoadedIndex:
    """Read an index, its id map and metadata from the output (checked to be from one build)."""
    import faiss
    import pyarrow.parquet as pq

    files = index_files(name)
    if not out.exists(files["meta"]):
        raise StorageError(f"no index {name!r} at {out.url(INDEX_DIR)} (was the job run with index.enabled=true?)")
    meta = out.read_json(files["meta"])
    index = faiss.deserialize_index(np.frombuffer(out.read_bytes(files["index"]), dtype=np.uint8))
    with out.open(files["ids"], "rb") as f:
        ids = pq.ParquetFile(f).read()
    build_id = (ids.schema.metadata or {}).get(b"embedjob.build_id", b"").decode()
    if index.ntotal != meta["count"] or ids.num_rows != meta["count"] or build_id != meta["build_id"]:
        raise StorageError(f"index {name!r} at {out.url(INDEX_DIR)}: files are from different builds "
                           "(being rewritten by a running job?); retry when the job has finished")
    sp = meta.get("search_params") or {}
    set_search_params(index, meta["kind"], sp.get("ef_search"), sp.get("nprobe"), sp.get("refine_k_factor"))
    return LoadedIndex(index, ids, meta)


# -- the stage ---------------------------------------------------------------------------------
def run_index(cfg, out: Storage, vector_urls: list[str], encoder_settings: dict[str, Any],
              word_vector_kinds: Sequence[str] = ()) -> dict[str, Any]:
    """Build the document index and one ``words-<kind>`` index per job word-vector set named in
    ``word_vector_kinds`` (``'bert'``, ``'word2vec'``: the stages enabled in this run), read with
    :func:`~embedjob.wordvectors.load_job_vectors` (never a pickle), and commit them to
    ``<out>/index/`` once all are built. Returns the stage stats (with each index's description)."""
    icfg: IndexConfig = cfg.index
    opts = out.storage_options
    t0 = time.time()
    built = [build_docs_index(icfg, vector_urls, opts, bool(encoder_settings.get("normalize")))]
    skipped: dict[str, str] = {}
    if icfg.words:
        for name in sorted(word_vector_kinds):
            rel = job_vectors_file(name)
            if not out.exists(rel):
                skipped[name] = f"{out.url(rel)} does not exist"
                continue
            kv = load_job_vectors(out.url(), opts, name)
            if len(kv) == 0:
                skipped[name] = "no words"
                continue
            built.append(build_words_index(icfg, name, kv))
    files = {}
    for b in built:  # every index is built before any is written
        files[b.meta["name"]] = write_index(out, b)
    stats = {
        "docs": {k: v for k, v in built[0].meta.items()},
        "words": {b.meta["name"][len("words-"):]: b.meta for b in built[1:]},
        "files": files,
        "seconds_total": round(time.time() - t0, 3),
    }
    if skipped:
        stats["words_skipped"] = skipped
    return stats


# -- search ------------------------------------------------------------------------------------
def query_encoder(settings: dict[str, Any]):
    """The job's own encoder (model, pooling, normalisation, max length) for query texts; the
    model folder is re-resolved when the recorded path does not exist on this machine."""
    from embedjob.encode import TextEncoder, cpu_supports_bf16
    from embedjob.models import resolve_model_path

    s = dict(settings)
    if not os.path.isdir(s.get("model_path") or ""):
        s["model_path"] = resolve_model_path(s["model"])
    device = "cpu"
    if s.get("device") == "cuda":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    s["device"] = device
    if device == "cpu" and (s.get("dtype") == "float16" or (s.get("dtype") == "bfloat16" and not cpu_supports_bf16())):
        s["dtype"] = "float32"  # same model and pooling; half precision is slow or missing on this CPU
    return TextEncoder(s)


def _input_options(manifest_input: dict[str, Any], out: Storage,
                   override: Optional[dict[str, Any]]) -> dict[str, Any]:
    if override is not None:
        return override
    opts = {k: v for k, v in (manifest_input.get("storage_options") or {}).items() if v != "***"}
    url = manifest_input.get("url") or next(iter((manifest_input.get("shards") or {}).values()), "")
    from embedjob.storage import split_url

    if split_url(url)[0] == out.protocol and out.protocol != "file":
        opts = {**opts, **out.storage_options}  # redacted secrets: the output's credentials
    return opts


def fetch_texts(shard_url: str, storage_options: dict[str, Any], id_column: str, text_column: str,
                wanted: list[tuple[str, int]]) -> dict[str, Optional[str]]:
    """Texts of documents ``(id, row)`` of one input shard: the row's row group is read and its id
    checked; when rows moved (e.g. skipped empty texts) the id is looked up in the whole shard."""
    import pyarrow.parquet as pq

    store = Storage(shard_url, storage_options)
    found: dict[str, Optional[str]] = {}
    with store.open("", "rb") as f:
        pf = pq.ParquetFile(f)
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups: dict[int, pa.Table] = {}
        missing = []
        for doc_id, row in wanted:
            g = int(np.searchsorted(starts, row, side="right") - 1)
            if 0 <= g < pf.num_row_groups:
                if g not in groups:
                    groups[g] = pf.read_row_group(g, columns=[id_column, text_column])
                t = groups[g]
                r = row - int(starts[g])
                if str(t.column(id_column)[r].as_py()) == doc_id:
                    found[doc_id] = t.column(text_column)[r].as_py()
                    continue
            missing.append(doc_id)
        if missing:
            t = pf.read(columns=[id_column, text_column])
            ids = t.column(id_column).cast(pa.string())
            mask = pc.is_in(ids, value_set=pa.array(missing, pa.string()))
            sub = t.filter(mask)
            for i, txt in zip(sub.column(id_column).cast(pa.string()).to_pylist(), sub.column(text_column).to_pylist()):
                found[i] = txt
    return found


class Searcher:
    """A loaded document index plus the job's encoder: ``Searcher(url, opts).search("text")``."""

    def __init__(self, output_url: str, storage_options: Optional[dict[str, Any]] = None, *,
                 input_storage_options: Optional[dict[str, Any]] = None):
        self.out = Storage(output_url, storage_options or {})
        if not self.out.exists("manifest.json"):
            raise StorageError(f"{self.out.url('manifest.json')} does not exist: not a finished embedjob output")
        self.manifest = self.out.read_json("manifest.json")
        self.loaded = load_index(self.out, DOCS)
        self.inp = self.manifest.get("input") or {}
        self.input_options = _input_options(self.inp, self.out, input_storage_options)
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            if "encoder" not in self.manifest:
                raise StorageError(f"{self.out.url('manifest.json')} has no 'encoder' settings to encode queries with")
            self._encoder = query_encoder(self.manifest["encoder"])
        return self._encoder

    def search(self, query: str, k: int = 10, *, with_text: bool = True) -> list[dict[str, Any]]:
        q = self.encoder.encode_texts([query]).vectors
        return self.search_vector(q[0], k, with_text=with_text)

    def search_vector(self, q: np.ndarray, k: int = 10, *, with_text: bool = True) -> list[dict[str, Any]]:
        k = max(1, min(int(k), self.loaded.index.ntotal))
        scores, labels = self.loaded.search_vectors(q.reshape(1, -1), k)
        pos = [int(p) for p in labels[0] if p >= 0]
        rows = self.loaded.ids.take(pa.array(pos, pa.int64())).to_pylist()
        hits = [{"id": r["id"], "score": float(s), "shard": r["shard"], "row": r["row"], "text_start": None}
                for r, s in zip(rows, scores[0])]
        if with_text:
            self._attach_texts(hits)
        return hits

    def _attach_texts(self, hits: list[dict[str, Any]]) -> None:
        shards = self.inp.get("shards") or {}
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for h in hits:
            by_shard.setdefault(h["shard"], []).append((h["id"], h["row"]))
        for shard, wanted in by_shard.items():
            url = shards.get(shard)
            if url is None:
                logger.warning("search: shard %r is not in the manifest's input shards: no text shown", shard)
                continue
            try:
                texts = fetch_texts(url, self.input_options, self.inp.get("id_column", "id"),
                                    self.inp.get("text_column", "text"), wanted)
            except (OSError, StorageError, KeyError, pa.ArrowInvalid) as e:
                logger.warning("search: cannot read texts from input shard %s (%s); pass "
                               "--input-storage-option if it needs other credentials", url, e)
                continue
            for h in hits:
                if h["shard"] == shard and texts.get(h["id"]) is not None:
                    h["text_start"] = texts[h["id"]][:TEXT_START_CHARS]


def search(output_url: str, storage_options: Optional[dict[str, Any]], query: str, k: int = 10, *,
           input_storage_options: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The ``k`` documents nearest to ``query`` in a finished job's index: ``id``, ``score`` (see
    ``index/docs.json``: inner product or squared L2), ``shard``, ``row`` and ``text_start``."""
    return Searcher(output_url, storage_options, input_storage_options=input_storage_options).search(query, k)


def similar_words(output_url: str, storage_options: Optional[dict[str, Any]], name: str, word: str,
                  k: int = 10) -> list[dict[str, Any]]:
    """Nearest words (cosine) to ``word`` in the ``words-<name>`` index of a finished job."""
    import faiss

    out = Storage(output_url, storage_options or {})
    loaded = load_index(out, f"words-{name}")
    words = loaded.ids.column("word")
    hit = pc.index(words, word).as_py()
    if hit < 0:
        raise StorageError(f"word {word!r} is not in the {name} word index of {output_url} ({len(words)} words; "
                           "words are matched after the job's preprocessing, e.g. lower-cased and stemmed)")
    if loaded.meta["kind"].startswith("ivf") and not isinstance(faiss.downcast_index(loaded.index), faiss.IndexRefine):
        faiss.extract_index_ivf(loaded.index).make_direct_map()
    q = loaded.index.reconstruct(int(hit)).reshape(1, -1)
    scores, labels = loaded.search_vectors(q, min(k + 1, loaded.index.ntotal))
    out_rows = []
    for s, p in zip(scores[0], labels[0]):
        if p < 0 or p == hit:
            continue
        out_rows.append({"word": words[int(p)].as_py(), "score": float(s)})
    return out_rows[:k]


def main(argv: Optional[list[str]] = None) -> int:
    """``embedjob search OUTPUT "query text" [-k 10] [--storage-option KEY=VALUE ...]``."""
    from embedjob.config import apply_override

    p = argparse.ArgumentParser(prog="embedjob search",
                                description="Nearest documents to a query text in a finished job's FAISS index; "
                                "the query is encoded with the job's own model and settings (from manifest.json).")
    p.add_argument("output", help="the job's output URL (path, s3://...)")
    p.add_argument("query", help="query text (with --words NAME: a word)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for the output (dotted keys nest: client_kwargs.endpoint_url=...)")
    p.add_argument("--input-storage-option", action="append", default=None, metavar="KEY=VALUE",
                   help="fsspec option for reading the input shards' text (default: the manifest's, "
                   "with the output's credentials when on the same store)")
    p.add_argument("--words", metavar="NAME", help="search the word index NAME (word2vec, bert) for words near QUERY")
    p.add_argument("--json", action="store_true", help="print the hits as one JSON object")
    args = p.parse_args(argv)
    opts: dict[str, Any] = {}
    for kv in args.storage_option:
        apply_override(opts, kv)
    in_opts = None
    if args.input_storage_option is not None:
        in_opts = {}
        for kv in args.input_storage_option:
            apply_override(in_opts, kv)
    if args.words:
        hits = similar_words(args.output, opts, args.words, args.query, args.k)
        if args.json:
            print(json.dumps({"query": args.query, "index": f"words-{args.words}", "hits": hits}))
        else:
            for i, h in enumerate(hits, 1):
                print(f"{i:>3}  {h['score']:.4f}  {h['word']}")
        return 0
    try:  # a one-shot CLI: no model-loading progress bar around the results
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    t = time.time()
    hits = search(args.output, opts, args.query, args.k, input_storage_options=in_opts)
    if args.json:
        print(json.dumps({"query": args.query, "seconds": round(time.time() - t, 3), "hits": hits}))
        return 0
    for i, h in enumerate(hits, 1):
        text = (h["text_start"] or "").replace("\n", " ")
        print(f"{i:>3}  {h['score']:.4f}  {h['id']}  {text[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
