"""The dedup stage: near-duplicate pairs and groups (and k-means clusters) from the committed
document vectors, written to ``<output>/dedup/`` only after everything succeeded:

* ``dedup/pairs.parquet`` — ``id_a``, ``id_b``, ``cosine``: every pair with cosine >=
  ``dedup.threshold``, once, ``id_a < id_b``, sorted;
* ``dedup/groups.parquet`` — ``id``, ``group``, ``keep``: the connected groups of duplicates
  (numbered by their smallest id), one document kept per group by ``dedup.keep``;
* ``dedup/clusters/<shard>.parquet`` (``id``, ``cluster``, ``distance``; rows as in
  ``vectors/<shard>.parquet``) and ``dedup/centroids.parquet`` with ``dedup.clusters``;
* ``dedup/examples.json`` (the report's groups) and ``dedup/dedup.json`` (state, written last).

Exact for small corpora (every pair, upper-triangle row ranges in Ray tasks); partitioned above
``dedup.exact_max`` documents: spherical k-means on a sample, every shard's rows routed (in a Ray
task per shard) to the reduce task owning each of their ``probes`` nearest partitions, and each
reduce task compares, partition by partition, the rows probing it with the rows nearest to it.

Example::

    stats = run_dedup(DedupConfig(enabled=True), Storage("out"), ["out/vectors/part-00000.parquet"])
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedjob.errors import ConfigError
from embedjob.layout import (
    DEDUP_CENTROIDS,
    DEDUP_CLUSTERS,
    DEDUP_EXAMPLES,
    DEDUP_GROUPS,
    DEDUP_PAIRS,
    DEDUP_STATE,
    shard_file,
    shard_key_of,
)
from embedjob.stages.dedup import outputs as O
from embedjob.stages.dedup.config import (
    DEDUP_RECIPE,
    DedupConfig,
    choose_mode,
    pair_settings,
    partitions_for,
    reduce_tasks_for,
)
from embedjob.stages.dedup.groups import (
    centrality,
    connected_groups,
    dropped_at,
    group_sums,
    keep_central,
    keep_first,
    keep_longest,
)
from embedjob.stages.dedup.pairs import (
    balance,
    concat_pairs,
    nearest_centroids,
    partition_costs,
    train_kmeans,
)
from embedjob.stages.dedup.shards import (
    exact_task,
    reduce_bucket,
    route_shard,
    run_tasks,
    scan_shard,
    shard_centrality,
    shard_sums,
    write_clusters,
)
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class _Docs:
    """The documents of the run in position order: unchanged shards first (their pairs are known)."""

    urls: list[str]
    new: list[bool]
    scans: list[dict[str, Any]]
    offsets: np.ndarray
    ids: pa.Array
    n_tokens: np.ndarray
    n_old: int
    sample: Optional[np.ndarray] = None
    x: Optional[np.ndarray] = None  # exact mode: every vector
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)


def _footer_rows(url: str, options: dict[str, Any]) -> int:
    with Storage(url, options).open("", "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _cpus() -> int:
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def _scan(cfg: DedupConfig, out: Storage, urls: list[str], new: list[bool]) -> tuple[_Docs, str]:
    """Every shard's ids and token counts, with the vectors (exact) or a training sample."""
    opts = out.storage_options
    rows = run_tasks(_footer_rows, [(u, opts) for u in urls])
    mode = choose_mode(cfg, sum(rows))
    total = max(sum(rows), 1)
    scans = run_tasks(scan_shard, [(u, opts, mode == "exact", max(1, math.ceil(cfg.train_sample * r / total)), cfg.seed + i)
                                   for i, (u, r) in enumerate(zip(urls, rows))])
    counts = [len(s["ids"]) for s in scans]
    docs = _Docs(urls=urls, new=new, scans=scans, offsets=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
                 ids=pa.concat_arrays([s["ids"] for s in scans]) if scans else pa.array([], pa.string()),
                 n_tokens=np.concatenate([s["n_tokens"] for s in scans]) if scans else np.zeros(0, np.int64),
                 n_old=int(sum(c for c, is_new in zip(counts, new) if not is_new)))
    samples = [s["sample"] for s in scans if s.get("sample") is not None and len(s["sample"])]
    docs.sample = np.concatenate(samples) if samples else None
    if mode == "exact" and docs.n:
        docs.x = np.concatenate([s["vectors"] for s in scans if len(s["ids"])])
        for s in scans:
            s["vectors"] = None
    dims = {s["dim"] for s in scans if s["dim"]}
    if len(dims) > 1:
        raise ConfigError(f"dedup: vector shards have different dimensions {sorted(dims)}")
    docs.stats = {"scan_peak_rss_mb": max((s["peak_rss_mb"] for s in scans), default=None)}
    return docs, mode


def _exact(cfg: DedupConfig, docs: _Docs) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """Every pair with a new document, upper-triangle row ranges of equal work in Ray tasks."""
    import ray

    n, x = docs.n, docs.x
    tasks = max(1, min(2 * _cpus(), math.ceil(n / cfg.block_rows)))
    # row i meets n - i rows: cut where the remaining triangle's area falls by 1/tasks
    cuts = sorted({int(round(n * (1 - math.sqrt(1 - k / tasks)))) for k in range(tasks + 1)})
    shared = ray.put(x) if ray.is_initialized() and len(cuts) > 2 else x
    results = run_tasks(exact_task, [(shared, cfg.threshold, a, b, cfg.block_rows, docs.n_old)
                                     for a, b in zip(cuts[:-1], cuts[1:]) if b > a])
    stats = {"tasks": len(results), "task_peak_rss_mb": max((r["peak_rss_mb"] for r in results), default=None),
             "task_seconds_max": max((r["seconds"] for r in results), default=0.0),
             "vectors_mb": round(x.nbytes / 2**20, 1)}
    return concat_pairs([r["pairs"] for r in results]), stats


def _partitioned(cfg: DedupConfig, out: Storage, docs: _Docs, clusters: Optional[dict[str, Any]],
                 staged_rel) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """k-means partitions, rows routed per shard to the reduce tasks, pairs within partitions."""
    import ray

    t = time.time()
    k = partitions_for(cfg, docs.n)
    # partitions need no finer centroids than 64 points each give (FAISS samples 256 by default):
    # k-means time is sample x k, and the sample grows with k
    rng = np.random.default_rng(cfg.seed)
    train = docs.sample if len(docs.sample) <= 64 * k else docs.sample[rng.choice(len(docs.sample), 64 * k, replace=False)]
    centroids = train_kmeans(train, k, iterations=cfg.kmeans_iterations, seed=cfg.seed)
    _, lab = nearest_centroids(docs.sample, centroids, cfg.probes)
    dim = centroids.shape[1]
    n_buckets = reduce_tasks_for(cfg, docs.n, dim, k, _cpus())
    bucket_of = balance(partition_costs(lab, k), n_buckets)
    train_s = time.time() - t
    opts = out.storage_options
    args = []
    for url, off, new in zip(docs.urls, docs.offsets, docs.new):
        cl = None if clusters is None else {**clusters, "rel": staged_rel(shard_file(DEDUP_CLUSTERS, shard_key_of(url)))}
        args.append((url, opts, int(off), bool(new), centroids, cfg.probes, bucket_of, n_buckets, cl))
    routed = run_tasks(route_shard, args, num_returns=n_buckets + 1)
    incremental = docs.n_old > 0
    results = run_tasks(reduce_bucket, [(cfg.threshold, cfg.block_rows, incremental, *[r[b] for r in routed])
                                        for b in range(n_buckets)])
    route_stats = [ray.get(r[-1]) if ray.is_initialized() else r[-1] for r in routed]
    del routed
    stats = {"partitions": k, "probes": min(cfg.probes, k), "reduce_tasks": n_buckets,
             "kmeans_seconds": round(train_s, 3), "train_sample": int(len(train)),
             "reduce_rows_max": max(r["rows"] for r in results), "reduce_rows_total": sum(r["rows"] for r in results),
             "reduce_mb_max": round(max(r["bytes"] for r in results) / 2**20, 1),
             "reduce_seconds_max": max(r["seconds"] for r in results),
             "reduce_seconds_total": round(sum(r["seconds"] for r in results), 3),
             "comparisons": sum(r["comparisons"] for r in results),
             "task_peak_rss_mb": max([r["peak_rss_mb"] for r in results] + [r["peak_rss_mb"] for r in route_stats])}
    return concat_pairs([r["pairs"] for r in results]), stats


def _write_clusters_exact(cfg: DedupConfig, out: Storage, docs: _Docs, centroids: np.ndarray, staged_rel) -> None:
    for url, scan, off in zip(docs.urls, docs.scans, docs.offsets):
        if len(scan["ids"]):
            write_clusters(url, out.storage_options, out, staged_rel(shard_file(DEDUP_CLUSTERS, shard_key_of(url))),
                           docs.x[off:off + len(scan["ids"])], scan["rows"], centroids)


def _central(out: Storage, docs: _Docs, positions: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cosine of each group member (at ``positions``) with its group's mean direction."""
    n_groups = int(group.max()) + 1 if len(group) else 0
    if docs.x is not None:
        sums = group_sums(docs.x[positions], group, n_groups)
        return centrality(docs.x[positions], group, sums)
    shard = np.searchsorted(docs.offsets, positions, side="right") - 1
    per = [(u, out.storage_options, positions[shard == i] - docs.offsets[i], group[shard == i])
           for i, u in enumerate(docs.urls)]
    per_i = [i for i, p in enumerate(per) if len(p[2])]
    sums = sum(run_tasks(shard_sums, [(*per[i], n_groups) for i in per_i]))
    scores = run_tasks(shard_centrality, [(*per[i], sums) for i in per_i])
    out_scores = np.zeros(len(positions))
    for i, sc in zip(per_i, scores):
        out_scores[shard == i] = sc
    return out_scores


def _groups(cfg: DedupConfig, out: Storage, docs: _Docs, order: np.ndarray, ra: np.ndarray, rb: np.ndarray,
            sorted_ids: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups in id-rank space (numbered by their smallest id) and the kept member of each."""
    members, group = connected_groups(ra, rb)
    ids = np.asarray(sorted_ids.take(pa.array(members, pa.int64())).to_pylist(), dtype=object)
    positions = order[members]
    if cfg.keep == "longest":
        keep = keep_longest(group, ids, docs.n_tokens[positions])
    elif cfg.keep == "central":
        keep = keep_central(group, ids, _central(out, docs, positions, group))
    else:
        keep = keep_first(group, ids)
    return members, group, keep


def run_dedup(cfg: DedupConfig, out: Storage, vector_urls: list[str], *,
              texts: Optional[O.TextSource] = None) -> dict[str, Any]:
    """Find the near-duplicates of the documents of ``vector_urls`` and commit ``dedup/``; returns
    the stage stats (pairs, groups, documents dropped, what was computed and reused, seconds)."""
    t0 = time.time()
    O.recover(out)
    build_id = uuid.uuid4().hex[:16]

    def staged_rel(rel: str) -> str:
        return O.staged(rel, build_id)

    keys = [shard_key_of(u) for u in vector_urls]
    fps = O.shard_fingerprints(out, keys)
    prev = O.previous_state(out)
    reuse = prev is not None and prev.get("pair_settings") == pair_settings(cfg)
    old = {k for k in keys if reuse and (prev.get("shards") or {}).get(k) == fps[k]}
    order_keys = sorted(old) + sorted(set(keys) - old)
    url_of = dict(zip(keys, vector_urls))
    docs, mode = _scan(cfg, out, [url_of[k] for k in order_keys], [k not in old for k in order_keys])
    if cfg.clusters is not None and cfg.clusters > docs.n:
        raise ConfigError(f"dedup.clusters={cfg.clusters} is more than the {docs.n} documents with a vector")
    stats: dict[str, Any] = {"mode": mode, "documents": docs.n, "shards": len(keys), "shards_reused": len(old),
                             "threshold": cfg.threshold, "keep": cfg.keep, **docs.stats}
    centroids = None
    if cfg.clusters is not None and docs.n:
        centroids = train_kmeans(docs.sample if docs.x is None else docs.x, cfg.clusters,
                                 iterations=cfg.kmeans_iterations, seed=cfg.seed)
    t = time.time()
    new_docs = docs.n - docs.n_old
    found: tuple[np.ndarray, ...] = concat_pairs([])
    if new_docs and mode == "exact":
        found, stats["exact"] = _exact(cfg, docs)
    elif new_docs:
        clusters = None if centroids is None else {"url": out.url(), "options": out.storage_options, "centroids": centroids}
        found, stats["partitioned"] = _partitioned(cfg, out, docs, clusters, staged_rel)
    stats.update(pairs_computed=int(len(found[0])), pairs_seconds=round(time.time() - t, 3),
                 documents_new=int(new_docs))
    if centroids is not None and (mode == "exact" or not new_docs):
        if docs.x is None:  # partitioned with nothing new to route: the vectors are read for the clusters
            docs.x = np.concatenate([s["vectors"] for s in run_tasks(scan_shard, [(u, out.storage_options, True, 0, 0)
                                                                                    for u in docs.urls])])
        _write_clusters_exact(cfg, out, docs, centroids, staged_rel)
    kept = O.previous_pairs(out, docs.ids) if old else concat_pairs([])
    sel = (kept[0] < docs.n_old) & (kept[1] < docs.n_old)
    a, b, cos = concat_pairs([found, tuple(v[sel] for v in kept)])
    stats["pairs_reused"] = int(sel.sum())
    _finish(cfg, out, docs, (a, b, cos), centroids, texts, build_id, fps, stats)
    stats["seconds_total"] = round(time.time() - t0, 3)
    logger.info("dedup: %d documents (%s), %d pairs >= %g, %d groups, %d documents dropped in %.1fs", docs.n, mode,
                stats["pairs"], cfg.threshold, stats["groups"], stats["dropped"], stats["seconds_total"])
    return stats


def _finish(cfg: DedupConfig, out: Storage, docs: _Docs, pairs: tuple[np.ndarray, ...],
            centroids: Optional[np.ndarray], texts: Optional[O.TextSource], build_id: str, fps: dict[str, str],
            stats: dict[str, Any]) -> None:
    """Pairs and groups by id, the report's figures, then the staged folder committed."""
    a, b, cos = pairs
    order = np.asarray(pc.sort_indices(docs.ids).to_numpy(), dtype=np.int64) if docs.n else np.zeros(0, np.int64)
    rank = np.empty(docs.n, np.int64)
    rank[order] = np.arange(docs.n)
    sorted_ids = docs.ids.take(pa.array(order, pa.int64()))
    ra, rb = rank[a], rank[b]
    ra, rb = np.minimum(ra, rb), np.maximum(ra, rb)
    ra, rb, cos = concat_pairs([(ra, rb, cos)])  # sorted by id_a, id_b
    members, group, keep = _groups(cfg, out, docs, order, ra, rb, sorted_ids)
    groups = O.groups_table(sorted_ids, members, group, keep)
    stats.update(pairs=int(len(ra)), groups=int(group.max()) + 1 if len(group) else 0,
                 documents_in_groups=int(len(members)), dropped=int(len(members) - (group.max() + 1 if len(group) else 0)),
                 dropped_at=dropped_at(ra, rb, cos, [t for t in cfg.report_thresholds if t >= cfg.threshold]
                                       + [cfg.threshold]))
    rel = lambda r: O.staged(r, build_id)  # noqa: E731
    out.write_parquet(rel(DEDUP_PAIRS), O.with_build(O.pairs_table(sorted_ids, ra, rb, cos), build_id))
    out.write_parquet(rel(DEDUP_GROUPS), O.with_build(groups, build_id))
    if centroids is not None:
        out.write_parquet(rel(DEDUP_CENTROIDS), O.centroids_table(centroids))
        stats["clusters"] = int(len(centroids))
    shard_of = {}
    if cfg.examples and groups.num_rows:
        wanted = set(groups.column("id").to_pylist())
        for i, (url, scan) in enumerate(zip(docs.urls, docs.scans)):
            shard_of.update({d: shard_key_of(url) for d in scan["ids"].to_pylist() if d in wanted})
    out.write_json(rel(DEDUP_EXAMPLES), {"threshold": cfg.threshold, "keep": cfg.keep,
                                         "groups": O.examples(groups, shard_of, texts, cfg.examples)})
    out.write_json(rel(DEDUP_STATE), {"recipe": DEDUP_RECIPE, "build_id": build_id, "pair_settings": pair_settings(cfg),
                                      "shards": fps, "documents": docs.n, "pairs": stats["pairs"],
                                      "groups": stats["groups"], "dropped": stats["dropped"]})
    O.commit(out, build_id)
    stats["build_id"] = build_id


def text_source(inp: Any, input_urls: Optional[dict[str, Optional[str]]]) -> O.TextSource:
    """Where the report's example texts are read from: the job's ``input`` section and its shards."""
    return O.TextSource(urls=dict(input_urls or {}), id_column=inp.id_column, text_column=inp.text_column,
                        storage_options=inp.storage_options)
