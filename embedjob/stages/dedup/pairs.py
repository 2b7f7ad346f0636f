"""Pairs of document vectors with cosine >= a threshold: exact (blocked matrix products) or
partitioned (k-means partitions, each document compared with the documents of its nearest
partitions). Plain numpy (and FAISS for k-means and the nearest centroids): no Ray, no storage,
so every function runs on in-memory arrays in tests.

A pair is two *positions* ``a < b`` (rows of the stage's document order) and their cosine. The
stage maps positions to ids. Vectors are unit rows (:func:`unit_rows`), so cosine = dot product.

Example::

    x = unit_rows(np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32))
    x[1] = x[0]
    a, b, cos = exact_pairs(x, 0.9)       # (array([0]), array([1]), array([1.0]))
"""

from __future__ import annotations

from typing import Optional

import numpy as np

EPS = 1e-5  # float32 rounding of a dot product of unit vectors: identical vectors give 0.99999994


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 rows of length 1 (an all-zero row stays zero: it pairs with nothing)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def tile_pairs(qa: np.ndarray, qb: np.ndarray, pos_a: np.ndarray, pos_b: np.ndarray,
               threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs between the rows of ``qa`` and of ``qb`` (positions ``pos_a``, ``pos_b``) with
    cosine >= threshold, as ``(min position, max position, cosine)``; a row never pairs with itself."""
    if not len(qa) or not len(qb):
        return _empty()
    sims = qa @ qb.T
    i, j = np.nonzero(sims >= threshold - EPS)
    pa, pb = pos_a[i], pos_b[j]
    other = pa != pb
    pa, pb, cos = pa[other], pb[other], sims[i[other], j[other]]
    return np.minimum(pa, pb), np.maximum(pa, pb), np.clip(cos, -1.0, 1.0).astype(np.float32)


def unique_pairs(a: np.ndarray, b: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each ``(a, b)`` once (``a < b`` already), sorted by ``a`` then ``b``."""
    if not len(a):
        return _empty()
    order = np.lexsort((b, a))
    a, b, cos = a[order], b[order], cos[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], cos[first]


def concat_pairs(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs from several tiles or tasks, each once, sorted."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return _empty()
    return unique_pairs(*(np.concatenate([p[k] for p in parts]) for k in range(3)))


def exact_rows(x: np.ndarray, threshold: float, start: int, stop: int, *, block_rows: int = 2048,
               n_old: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair with cosine >= threshold between rows ``start:stop`` of ``x`` and the rows at or
    after ``start`` (the upper triangle: all of ``x`` split into row ranges finds each pair once).
    ``n_old``: rows ``0:n_old`` were compared with each other by an earlier run, so only pairs
    with a row at or after ``n_old`` are computed. Memory: one block_rows x block_rows tile."""
    parts = []
    for i in range(start, stop, block_rows):
        i2 = min(i + block_rows, stop)
        first_col = i if i2 > n_old else max(i, n_old)  # an old row block meets only new rows
        for j in range(first_col, len(x), block_rows):
            j2 = min(j + block_rows, len(x))
            a, b, c = tile_pairs(x[i:i2], x[j:j2], np.arange(i, i2), np.arange(j, j2), threshold)
            parts.append((a, b, c))
    return concat_pairs(parts)


def exact_pairs(x: np.ndarray, threshold: float, *, block_rows: int = 2048,
                n_old: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows of the unit matrix ``x`` with cosine >= threshold (brute force, blocked)."""
    return exact_rows(x, threshold, 0, len(x), block_rows=block_rows, n_old=n_old)


# -- partitioned --------------------------------------------------------------------------------
def train_kmeans(sample: np.ndarray, k: int, *, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """``k`` unit centroids of spherical k-means (FAISS) over the unit rows of ``sample``."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if k > len(sample):
        raise ValueError(f"k-means with {k} clusters needs at least {k} vectors, got {len(sample)}")
    if k == 1:
        c = sample.mean(axis=0, keepdims=True)
        return unit_rows(c)
    km = faiss.Kmeans(sample.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, len(sample) // k + 1), min_points_per_centroid=1)
    km.train(sample)
    return unit_rows(km.centroids)


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, labels)``, each (n, probes): the ``probes`` nearest centroids of each row,
    nearest first (cosine)."""
    import faiss

    probes = min(probes, len(centroids))
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), probes)
    return sims, labels.astype(np.int32)


def balance(costs: np.ndarray, n_buckets: int) -> np.ndarray:
    """``bucket[partition]``: partitions given to ``n_buckets`` tasks, largest cost first to the
    least loaded (LPT), so that the tasks' work is even."""
    order = np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable")
    load = np.zeros(n_buckets)
    bucket = np.zeros(len(costs), np.int32)
    for p in order:
        b = int(np.argmin(load))
        bucket[p] = b
        load[b] += costs[p]
    return bucket


def partition_costs(labels: np.ndarray, n_partitions: int) -> np.ndarray:
    """Estimated work of each partition from (a sample's) nearest-centroid ``labels`` (n, probes):
    its queries (rows probing it) times its members (rows nearest to it)."""
    members = np.bincount(labels[:, 0], minlength=n_partitions).astype(np.float64)
    queries = np.bincount(labels.reshape(-1), minlength=n_partitions).astype(np.float64)
    return members * queries + members + 1.0


def bucket_rows(labels: np.ndarray, bucket_of: np.ndarray, n_buckets: int) -> list[dict[str, np.ndarray]]:
    """Route each row, once per probed partition, to the task owning that partition: per bucket the
    ``row`` indices (into this shard), the ``part`` probed and ``base`` (the row's own, nearest
    partition: the rows a partition's queries are compared with)."""
    n, probes = labels.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), probes)
    parts = labels.reshape(-1)
    base = np.tile(np.arange(probes) == 0, n)
    dest = bucket_of[parts]
    order = np.argsort(dest, kind="stable")
    bounds = np.searchsorted(dest[order], np.arange(n_buckets + 1))
    out = []
    for k in range(n_buckets):
        sel = order[bounds[k]:bounds[k + 1]]
        out.append({"row": rows[sel], "part": parts[sel], "base": base[sel]})
    return out


def partition_pairs(x: np.ndarray, pos: np.ndarray, part: np.ndarray, base: np.ndarray, threshold: float, *,
                    new: Optional[np.ndarray] = None, block_rows: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs within partitions: in each partition, every row that probes it (query) against every
    row whose nearest partition it is (base). Rows are ``x`` (unit), with global positions ``pos``.
    ``new`` (bool per row): only pairs with a new row are computed (old pairs are known)."""
    order = np.argsort(part, kind="stable")
    bounds = np.flatnonzero(np.diff(part[order])) + 1
    parts = []
    for sel in np.split(order, bounds):
        b_sel = sel[base[sel]]
        if not len(b_sel):
            continue
        if new is None:
            jobs = [(sel, b_sel)]
        else:  # new queries against every base row, old queries against new base rows only
            jobs = [(sel[new[sel]], b_sel), (sel[~new[sel]], b_sel[new[b_sel]])]
        for q_sel, bb in jobs:
            for i in range(0, len(q_sel), block_rows):
                qi = q_sel[i:i + block_rows]
                for j in range(0, len(bb), block_rows):
                    bj = bb[j:j + block_rows]
                    parts.append(tile_pairs(x[qi], x[bj], pos[qi], pos[bj], threshold))
    return concat_pairs(parts)
