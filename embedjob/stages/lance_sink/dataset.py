"""The dataset version of a run: exactly the fragments of the shards kept in the output, and the
optional ANN index with its recall@10 against exact search.

A version is a pure function of the kept shards' markers (shard order, each shard's fragments in
its marker's order), committed as a Lance ``Overwrite``: a no-change rerun commits nothing, a
rerun that re-encoded or moved shards aside commits a version without their old fragments, and
the fragments of a retried commit that its marker does not list are never in any version.

Example (what the tests do)::

    import lancedb
    lancedb.connect("out/lance").open_table("docs").search(vec).limit(10).to_list()
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from embedjob.errors import JobError, StorageError, root_cause
from embedjob.layout import LANCE_DOCS, LANCE_STATS, SUPERSEDED
from embedjob.stages.lance_sink.merge import merge_blocker, merge_docs, state_of
from embedjob.stages.lance_sink.write import schema_of
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

RECALL_QUERIES = 100
RECALL_K = 10
REFINE_FACTOR = 10


def _open(uri: str, opts: dict[str, str]):
    import lance

    try:
        return lance.dataset(uri, storage_options=opts)
    except (ValueError, OSError, RuntimeError):  # no dataset yet
        return None


def run_lance(output, out: Storage, keep: dict[str, dict[str, Any]], normalized: bool,
              stages: dict[str, Any], run_id: str, removed: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The lance stage of a run (``output`` is its ``OutputConfig``): commit, index, ``stats/lance.json``;
    any failure is a :class:`JobError` naming the stage (the Parquet outputs stay committed). With
    ``output.lance`` off, a dataset an earlier run left is moved aside (no run vouches for it)."""
    if not output.lance:
        dest = f"{SUPERSEDED}/{run_id}/{LANCE_DOCS}"
        out.move(LANCE_DOCS, dest)
        logger.warning("lance: output.lance is off: moved %s aside to %s", out.url(LANCE_DOCS), out.url(dest))
        return {"moved_aside": dest}
    try:
        stats = commit_docs(out, keep, index=output.lance_index, min_rows=output.lance_index_min_rows,
                            normalized=normalized, merge=output.reuse == "auto" and not output.overwrite,
                            removed=removed)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"lance stage failed: {root_cause(e)}") from e
    enc = (stages.get("encode") or {}).get("seconds")
    stats["encode_seconds"] = enc
    if enc:  # the per-shard fragment writes ran inside the commit tasks, beside the encoding
        spent = stats.get("write_seconds", 0.0) + stats.get("commit_seconds", 0.0)
        stats["write_share_of_encode"] = round(spent / enc, 4)
    out.write_json(LANCE_STATS, stats)
    return stats


def commit_docs(out: Storage, keep: dict[str, dict[str, Any]], *, index: str = "none", min_rows: int = 5000,
                normalized: bool = True, seed: int = 0, dataset: str = LANCE_DOCS,
                merge: bool = False, removed: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Commit the version of ``dataset`` holding exactly the kept shards' rows (unless the latest
    already does): with ``merge`` (output.reuse on), by id into the version the last run recorded
    when it can (merge.py; ``removed``: the reuse lookup's removed ids), else their fragments as a new
    version. Then build ``index`` when asked.
    Returns the stats of ``stats/lance.json``."""
    import lance
    from lance.fragment import FragmentMetadata

    t0 = time.time()
    parts = {k: keep[k].get("lance") for k in sorted(keep)}
    parts = {k: p if p is None or p.get("dataset", LANCE_DOCS) == dataset else None for k, p in parts.items()}
    missing = sorted(k for k, p in parts.items() if p is None)
    if missing:
        raise StorageError(f"lance: the commit(s) of shard(s) {', '.join(missing[:5])} list no Lance fragments; "
                           "rerun with output.overwrite=true to write them")
    schemas = {k: schema_of(p) for k, p in parts.items() if p["rows"]}
    if not schemas:
        logger.warning("lance: no rows to write: %s left as it is", out.url(dataset))
        return {"rows": 0, "committed": False}
    first = next(iter(schemas))
    for k, s in schemas.items():
        if not s.equals(schemas[first], check_metadata=True):
            raise StorageError(f"lance: shards {first} and {k} have different columns ({schemas[first]} vs {s}); "
                               "their carry_columns types differ in the input")
    frags = [FragmentMetadata.from_json(_json(f)) for p in parts.values() for f in p["fragments"]]
    uri, opts = out.object_store(dataset)
    current = _open(uri, opts)
    same = current is not None and current.schema.equals(schemas[first], check_metadata=False) and (
        [sorted(d.path for d in f.metadata.files) for f in current.get_fragments()]
        == [sorted(d.path for d in f.files) for f in frags])
    blocker = "output.reuse is off or output.overwrite is on" if not merge else (
        None if same else merge_blocker(out, current, schemas[first], keep))
    how: dict[str, Any] = {"mode": "as committed"}
    if same:
        ds = current
        logger.info("lance: %s version %d already holds the %d committed shard(s)", out.url(dataset),
                    ds.version, len(schemas))
    elif blocker is None:  # a rerun of the same recipe: the changed rows by id, the rest stays (merge.py)
        ds, how = merge_docs(out, current, keep, dataset=dataset, removed=removed)
    else:
        op = lance.LanceOperation.Overwrite(schemas[first], frags)
        ds = lance.LanceDataset.commit(uri, op, read_version=current.version if current is not None else None,
                                       storage_options=opts)
        how = {"mode": "overwrite", **({"why_not_merge": blocker} if current is not None else {}), "committed": True}
        logger.info("lance: %s version %d: %d rows from %d shard(s) (%s)", out.url(dataset), ds.version,
                    ds.count_rows(), len(schemas), blocker)
    committed = bool(how.get("committed"))
    rows = ds.count_rows()
    expected = sum(p["rows"] for p in parts.values())
    if rows != expected:
        raise StorageError(f"lance: version {ds.version} holds {rows} rows, the committed shards {expected}")
    stats: dict[str, Any] = {"dataset": dataset, "version": ds.version, "rows": rows, "shards": len(schemas),
                             "fragments": len(frags), "committed": committed, **how,
                             "write_seconds": round(sum(p.get("seconds", 0.0) for p in parts.values()), 3),
                             "commit_seconds": round(time.time() - t0, 3)}
    if index != "none":  # its own seconds: commit_seconds is the version's commit alone
        stats["index"] = build_index(ds, index, min_rows=min_rows, normalized=normalized, seed=seed,
                                     rebuild=committed)
    stats["merge_state"] = state_of(keep, ds.version)  # what the next run merges into (merge.py)
    return stats


def _json(f: Any) -> str:
    return f if isinstance(f, str) else json.dumps(f)


def _has_vector_index(ds) -> bool:
    return any("vector" in (i.get("fields") or []) for i in ds.list_indices())


def index_params(kind: str, n: int, dim: int, *, binary: bool = False) -> dict[str, Any]:
    """``create_index`` parameters for ``n`` vectors of ``dim``: about sqrt(n) partitions (at least
    some hundred rows each), PQ sub-vectors of 4 dimensions (a divisor of ``dim``). Packed bits
    (``binary``) get IVF_FLAT, the index Lance builds for the Hamming distance, whatever ``kind``."""
    parts = max(1, min(int(math.sqrt(n)), n // 256 or 1))
    if binary:
        return {"index_type": "IVF_FLAT", "num_partitions": parts}
    params: dict[str, Any] = {"index_type": "IVF_PQ" if kind == "ivf_pq" else "IVF_HNSW_SQ", "num_partitions": parts}
    if kind == "ivf_pq":
        params["num_sub_vectors"] = max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
    return params


def build_index(ds, kind: str, *, min_rows: int, normalized: bool, seed: int = 0,
                rebuild: bool = True) -> dict[str, Any]:
    """Lance's ANN index on ``vector`` and its recall@10 against exact search (``RECALL_QUERIES``
    of the dataset's own vectors as queries)."""
    n = ds.count_rows()
    if n < min_rows:
        note = f"output.lance_index={kind!r} skipped: {n} rows < output.lance_index_min_rows={min_rows}"
        logger.warning("lance: %s", note)
        return {"kind": kind, "built": False, "note": note}
    binary = ds.schema.field("vector").type.value_type == pa.uint8()  # output.vector_dtype binary: packed bits
    metric = "hamming" if binary else "cosine" if normalized else "l2"
    dim = ds.schema.field("vector").type.list_size
    params = index_params(kind, n, dim, binary=binary)
    t = time.time()
    if rebuild or not _has_vector_index(ds):
        ds.create_index("vector", metric=metric, replace=True, **params)
    seconds = time.time() - t
    recall = index_recall(ds, metric, seed=seed)
    refined = index_recall(ds, metric, seed=seed, refine_factor=REFINE_FACTOR)
    logger.info("lance: %s index (%s) over %d vectors in %.1fs, recall@%d %.3f (%.3f with refine_factor %d)",
                params["index_type"], metric, n, seconds, RECALL_K, recall, refined, REFINE_FACTOR)
    return {"kind": kind, "built": True, "metric": metric, **params, "seconds": round(seconds, 3),
            f"recall@{RECALL_K}": round(recall, 4), f"recall@{RECALL_K}_refine_factor_{REFINE_FACTOR}": round(refined, 4),
            "recall_queries": min(RECALL_QUERIES, n)}


def index_recall(ds, metric: str, *, seed: int = 0, queries: Optional[np.ndarray] = None,
                 refine_factor: Optional[int] = None) -> float:
    """Mean share of the exact top-10 ids that the indexed search returns (Lance's default query
    parameters; ``refine_factor``: re-ranked with exact distances, as LanceDB's ``.refine_factor()``)."""
    n = ds.count_rows()
    if queries is None:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=min(RECALL_QUERIES, n), replace=False))
        vec = ds.take(pick.tolist(), columns=["vector"]).column("vector").combine_chunks()
        flat = vec.flatten().to_numpy(zero_copy_only=False)
        queries = (flat if metric == "hamming" else flat.astype(np.float32)).reshape(len(pick), -1)
    hits = []
    for q in queries:
        near = {"column": "vector", "q": q, "k": RECALL_K, "metric": metric}
        idx = {**near, "use_index": True, **({"refine_factor": refine_factor} if refine_factor else {})}
        approx = ds.to_table(columns=["id"], nearest=idx).column("id").to_pylist()
        exact = ds.to_table(columns=["id"], nearest={**near, "use_index": False}).column("id").to_pylist()
        hits.append(len(set(approx) & set(exact)) / max(1, len(exact)))
    return float(np.mean(hits)) if hits else 0.0
