"""A seeded sample of documents from a job's output: their vectors, dominant topics (theta) and,
optionally, a label column from the input shards; and its 2-D PCA map.

Only the row groups that hold sampled rows are read, so the cost is bounded by the sample, not the
corpus (a shard's row groups are a few thousand rows each)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedjob.errors import ReportError
from embedjob.layout import THETA_DIR, VECTORS, shard_file
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class DocSample:
    """Sampled documents in shard order: ids, vectors (float32), dominant topic (-1: none), theta."""

    ids: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    vectors: Optional[np.ndarray] = None
    theta: Optional[np.ndarray] = None
    labels: Optional[list[str]] = None
    n_tokens: list[int] = field(default_factory=list)  # model tokens of each sampled document (all rows)
    total: int = 0  # documents in the shards the sample was drawn from
    shards_drawn: int = 0


MAX_SHARDS = 64  # shards a sample is drawn from: a bounded number of files to open on any corpus


def _row_counts(out: Storage, keys: list[str], known: dict[str, Any]) -> dict[str, int]:
    """Rows of each shard's vector file: the manifest's count, else the file's footer."""
    counts = {}
    for k in keys:
        n = (known.get(k) or {}).get("rows_out")
        if n is None:
            with out.open(shard_file(VECTORS, k), "rb") as f:
                n = pq.ParquetFile(f).metadata.num_rows
        counts[k] = int(n)
    return counts


def read_rows(store: Storage, rel: str, columns: list[str], rows: np.ndarray) -> pa.Table:
    """Rows ``rows`` (sorted positions) of one Parquet file, reading only the row groups holding them."""
    with store.open(rel, "rb") as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.cumsum([0] + sizes)
        groups = sorted(set(int(g) for g in np.searchsorted(starts, rows, side="right") - 1))
        table = pf.read_row_groups(groups, columns=columns)
    offsets = np.cumsum([0] + [sizes[g] for g in groups])
    local = []
    for r in rows:
        g = int(np.searchsorted(starts, r, side="right") - 1)
        local.append(int(offsets[groups.index(g)] + r - starts[g]))
    return table.take(pa.array(local, pa.int64()))


def sample_documents(out: Storage, keys: list[str], n: int, *, seed: int = 0,
                     shard_rows: Optional[dict[str, Any]] = None) -> DocSample:
    """At most ``n`` documents with non-null vectors, spread over (at most :data:`MAX_SHARDS`
    seeded) shards by their sizes; ``shard_rows``: the manifest's ``shards`` (their ``rows_out``)."""
    rng = np.random.default_rng(seed)
    if len(keys) > MAX_SHARDS:
        keys = sorted(rng.choice(keys, size=MAX_SHARDS, replace=False).tolist())
    counts = _row_counts(out, keys, shard_rows or {})
    total = sum(counts.values())
    sample = DocSample(total=total, shards_drawn=len(keys))
    if not total:
        return sample
    picked = np.sort(rng.choice(total, size=min(n, total), replace=False))
    vecs, thetas, start = [], [], 0
    has_theta = all(out.exists(shard_file(THETA_DIR, k)) for k in keys)
    for k in keys:
        rows = picked[(picked >= start) & (picked < start + counts[k])] - start
        start += counts[k]
        if not len(rows):
            continue
        t = read_rows(out, shard_file(VECTORS, k), ["id", "vector", "n_tokens"], rows)
        sample.n_tokens += [int(x or 0) for x in t.column("n_tokens").to_pylist()]
        keep = np.asarray(pc.is_valid(t.column("vector")))
        ids = [str(x) for x in t.column("id").to_pylist()]
        if not keep.any():
            continue
        v = np.asarray(t.column("vector").combine_chunks().filter(pa.array(keep)).flatten(), np.float32)
        vecs.append(v.reshape(int(keep.sum()), -1))
        sample.ids += [i for i, ok in zip(ids, keep) if ok]
        sample.shards += [k] * int(keep.sum())
        if has_theta:
            thetas.append(_theta_rows(out, k, rows, ids)[keep])
    sample.vectors = np.concatenate(vecs) if vecs else None
    if has_theta and thetas:
        sample.theta = np.concatenate(thetas)
    return sample


def _theta_rows(out: Storage, key: str, rows: np.ndarray, ids: list[str]) -> np.ndarray:
    """Theta of the same rows of the shard (NaN where the theta file's row holds another id)."""
    t = read_rows(out, shard_file(THETA_DIR, key), ["id", "theta"], rows)
    theta = t.column("theta").to_pylist()
    k = next((len(x) for x in theta if x), 0)
    m = np.full((len(rows), max(k, 1)), np.nan, np.float32)
    for i, (tid, x) in enumerate(zip(t.column("id").to_pylist(), theta)):
        if x and str(tid) == ids[i]:
            m[i] = x
    return m


def attach_labels(sample: DocSample, manifest: dict[str, Any], column: str, storage_options: dict[str, Any]) -> None:
    """``sample.labels``: the input column ``column`` of each sampled document (joined on the id)."""
    inp = manifest.get("input") or {}
    id_col = inp.get("id_column", "id")
    labels: dict[str, str] = {}
    by_shard: dict[str, set[str]] = {}
    for doc_id, shard in zip(sample.ids, sample.shards):
        by_shard.setdefault(shard, set()).add(doc_id)
    for shard, wanted in by_shard.items():
        url = (inp.get("shards") or {}).get(shard)
        if not url:
            continue
        store = Storage(url, storage_options)
        names = store.read_parquet_schema("").names
        if column not in names:
            raise ReportError(f"--label-column {column!r}: no such column in input shard {url} "
                              f"(its columns: {', '.join(names)})")
        t = store.read_parquet("", columns=[id_col, column])
        ids = t.column(id_col).cast(pa.string())
        sub = t.filter(pc.is_in(ids, value_set=pa.array(sorted(wanted), pa.string())))
        labels.update(zip(sub.column(id_col).cast(pa.string()).to_pylist(), map(str, sub.column(column).to_pylist())))
    sample.labels = [labels.get(i, "(none)") for i in sample.ids]


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The first two principal components of ``x`` and the share of variance each explains."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2)), [0.0, 0.0]
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s**2
    share = [float(v / var.sum()) if var.sum() else 0.0 for v in var[:2]] + [0.0] * (2 - len(var[:2]))
    xy = u[:, :2] * s[:2]
    if xy.shape[1] < 2:
        xy = np.hstack([xy, np.zeros((len(xy), 2 - xy.shape[1]))])
    return xy, share
