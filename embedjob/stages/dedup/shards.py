"""The dedup stage's work on one vector shard or one reduce bucket, as plain functions that Ray
runs as tasks (:func:`run_tasks`; inline when Ray is not up):

* :func:`scan_shard` — ids, rows and token counts of the non-null vectors, with the vectors
  (exact mode) or a uniform sample of them (partitioned mode);
* :func:`route_shard` — a shard's unit vectors sent, once per probed partition, to the reduce
  task owning that partition; its cluster file written to the staging folder;
* :func:`reduce_bucket` — the pairs within a bucket's partitions;
* :func:`exact_task` — a row range of the exact upper triangle;
* :func:`shard_sums` / :func:`shard_centrality` — the ``central`` keep policy, shard by shard.

Each task reports the peak resident memory of its worker (``peak_rss_mb``).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from embedjob.errors import ConfigError
from embedjob.layout import shard_key_of
from embedjob.stages.dedup.groups import centrality, group_sums
from embedjob.stages.dedup.pairs import (
    bucket_rows,
    exact_rows,
    nearest_centroids,
    partition_pairs,
    unit_rows,
)
from embedjob.storage import Storage, StorageError
from embedjob.vector_codec import codec_of, decode


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (a Ray worker's: its tasks' largest)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _one_thread() -> None:
    """FAISS in a task uses the task's one CPU, not every core of the node."""
    import faiss

    faiss.omp_set_num_threads(1)


def read_vector_shard(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The non-null vectors of one ``vectors/<shard>.parquet`` as unit float32 rows, with their
    ``ids``, ``rows`` (in the file), ``n_tokens`` and the file's ``total_rows``."""
    store = Storage(url, storage_options)
    try:
        table = store.read_parquet("", columns=["id", "vector", "n_tokens"])
    except (OSError, KeyError, pa.ArrowInvalid) as e:
        raise StorageError(f"dedup: cannot read vector shard {url!r} (columns id, vector, n_tokens): {e}") from e
    codec = codec_of(table.schema)
    if codec["dtype"] == "binary":
        raise ConfigError(f"dedup needs document vectors with a cosine; {url} stores binary vectors "
                          "(output.vector_dtype=binary): use float32, float16 or int8")
    vec = table.column("vector")
    valid = np.asarray(vec.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    kept = vec.combine_chunks().filter(pa.array(valid))
    x = unit_rows(decode(kept, codec)) if len(kept) else np.zeros((0, codec.get("dim") or 0), np.float32)
    tokens = table.column("n_tokens").combine_chunks().filter(pa.array(valid))
    return {"shard": shard_key_of(url), "ids": table.column("id").cast(pa.string()).combine_chunks().filter(pa.array(valid)),
            "rows": np.flatnonzero(valid).astype(np.int64), "vectors": x, "total_rows": len(valid),
            "n_tokens": np.asarray(tokens.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)}


def scan_shard(url: str, storage_options: dict[str, Any], with_vectors: bool, sample_n: int = 0,
               seed: int = 0) -> dict[str, Any]:
    """:func:`read_vector_shard`, keeping the vectors (``with_vectors``) or only a uniform sample
    of ``sample_n`` of them (``sample``)."""
    r = read_vector_shard(url, storage_options)
    x = r["vectors"]
    r["dim"] = int(x.shape[1]) if len(x) else None
    if sample_n:
        rng = np.random.default_rng(seed)
        r["sample"] = x[np.sort(rng.choice(len(x), size=min(sample_n, len(x)), replace=False))]
    if not with_vectors:
        r["vectors"] = None
    r["peak_rss_mb"] = peak_rss_mb()
    return r


def cluster_table(total_rows: int, rows: np.ndarray, ids_all: pa.Array, label: np.ndarray,
                  distance: np.ndarray) -> pa.Table:
    """``id``, ``cluster``, ``distance`` with the rows of the shard's vector file (null where the
    vector is null), so the file lines up with ``vectors/<shard>.parquet`` row for row."""
    cluster = np.zeros(total_rows, np.int32)
    dist = np.zeros(total_rows, np.float32)
    valid = np.zeros(total_rows, bool)
    cluster[rows], dist[rows], valid[rows] = label, distance, True
    mask = ~valid
    return pa.table({"id": ids_all, "cluster": pa.array(cluster, pa.int32(), mask=mask),
                     "distance": pa.array(dist, pa.float32(), mask=mask)})


def write_clusters(url: str, storage_options: dict[str, Any], dest: Storage, rel: str, x: np.ndarray,
                   rows: np.ndarray, centroids: np.ndarray) -> None:
    """The shard's cluster file (each document's nearest centroid, 1 - cosine to it) at ``dest/rel``."""
    sims, labels = nearest_centroids(x, centroids, 1)
    ids_all = Storage(url, storage_options).read_parquet("", columns=["id"]).column("id").cast(pa.string())
    total = len(ids_all)
    dest.write_parquet(rel, cluster_table(total, rows, ids_all.combine_chunks(), labels[:, 0],
                                          (1.0 - sims[:, 0]).clip(0.0, 2.0)))


def route_shard(url: str, storage_options: dict[str, Any], offset: int, new: bool, centroids: np.ndarray,
                probes: int, bucket_of: np.ndarray, n_buckets: int,
                clusters: Optional[dict[str, Any]] = None) -> list[Any]:
    """Send the shard's rows to the reduce buckets: ``[bucket 0, ..., bucket R-1, stats]``, each
    bucket ``{x, pos, part, base, new}`` (a row once per probed partition the bucket owns); with
    ``clusters`` (centroids, staging folder and options, file name) the shard's cluster file too."""
    _one_thread()
    r = read_vector_shard(url, storage_options)
    x, n = r["vectors"], len(r["vectors"])
    _, labels = nearest_centroids(x, centroids, probes) if n else (None, np.zeros((0, probes), np.int32))
    out: list[Any] = []
    for b in bucket_rows(labels, bucket_of, n_buckets):
        out.append({"x": x[b["row"]], "pos": offset + b["row"], "part": b["part"], "base": b["base"],
                    "new": np.full(len(b["row"]), new)})
    if clusters is not None and n:
        write_clusters(url, storage_options, Storage(clusters["url"], clusters["options"]), clusters["rel"], x,
                       r["rows"], clusters["centroids"])
    out.append({"rows": n, "peak_rss_mb": peak_rss_mb()})
    return out


def reduce_bucket(threshold: float, block_rows: int, incremental: bool, *parts: dict[str, np.ndarray]) -> dict[str, Any]:
    """The pairs within the partitions of one bucket (its parts from every shard)."""
    t = time.time()
    parts = tuple(p for p in parts if len(p["pos"]))
    if not parts:
        return {"pairs": (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)), "rows": 0,
                "bytes": 0, "seconds": 0.0, "comparisons": 0, "peak_rss_mb": peak_rss_mb()}
    x = np.concatenate([p["x"] for p in parts])
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("pos", "part", "base", "new")}
    pairs = partition_pairs(x, cat["pos"], cat["part"], cat["base"], threshold,
                            new=cat["new"] if incremental else None, block_rows=block_rows)
    queries = np.bincount(cat["part"])
    members = np.bincount(cat["part"][cat["base"]], minlength=len(queries))
    return {"pairs": pairs, "rows": int(len(x)), "bytes": int(x.nbytes), "seconds": round(time.time() - t, 3),
            "comparisons": int((queries * members).sum()), "peak_rss_mb": peak_rss_mb()}


def exact_task(x: np.ndarray, threshold: float, start: int, stop: int, block_rows: int, n_old: int) -> dict[str, Any]:
    """Rows ``start:stop`` of the exact upper triangle."""
    t = time.time()
    pairs = exact_rows(x, threshold, start, stop, block_rows=block_rows, n_old=n_old)
    return {"pairs": pairs, "seconds": round(time.time() - t, 3), "peak_rss_mb": peak_rss_mb()}


def shard_sums(url: str, storage_options: dict[str, Any], rows: np.ndarray, group: np.ndarray,
               n_groups: int) -> np.ndarray:
    """Per-group sums of the unit vectors at positions ``rows`` (into the shard's non-null vectors)."""
    x = read_vector_shard(url, storage_options)["vectors"]
    return group_sums(x[rows], group, n_groups)


def shard_centrality(url: str, storage_options: dict[str, Any], rows: np.ndarray, group: np.ndarray,
                     sums: np.ndarray) -> np.ndarray:
    """Cosine of the vectors at ``rows`` with their group's mean direction."""
    x = read_vector_shard(url, storage_options)["vectors"]
    return centrality(x[rows], group, sums)


def run_tasks(fn: Callable[..., Any], args_list: list[tuple], *, num_returns: int = 1) -> list[Any]:
    """``fn(*args)`` for each args tuple: Ray tasks (1 CPU each) when Ray is up, inline otherwise;
    results in order (with ``num_returns`` > 1: a list of object refs per task, not fetched)."""
    import ray

    if not ray.is_initialized():
        return [fn(*a) for a in args_list]
    task = ray.remote(num_cpus=1)(fn)
    if num_returns > 1:
        return [task.options(num_returns=num_returns).remote(*a) for a in args_list]
    return ray.get([task.remote(*a) for a in args_list])
