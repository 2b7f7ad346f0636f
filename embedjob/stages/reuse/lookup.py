"""The reuse lookup: a hash join of (id, text_hash), partition by partition, in Ray tasks.

Nothing holds every hash: each shard's map task splits its (id, text_hash) rows into ``P``
partitions by a hash of the id (Ray objects), and reduce task ``p`` joins partition ``p`` of the
new shards with partition ``p`` of the old commits they may reuse from, holding about ``N / P``
rows. A match (same id, same text hash, same recipe) becomes a row of the new shard's plan,
``<plan>/<new shard>/<p>.parquet``: (``row``, ``src``, ``src_row``, ``src_commit``, ``src_prefix``,
``static_home``), which its commit task copies (``copy.py``). The driver gets back, per new shard,
only the indices of its reused rows by static home (the commit whose static part holds the row's
word sums: ``static_home`` of the old row, or its commit), and per home the rows matched and held.

An old commit whose shard key is rewritten in this run is read from a snapshot of its files taken
before the stream (``stage.py``): another shard's commit may copy from it after its own commit
replaced the files in place. Old commits serve only when their files carry the commit stamp of their done marker (a commit
killed halfway leaves files of another content under an older marker: never read as that marker's).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.schema import STATIC_HOME, TEXT_HASH
from embedjob.stages.reuse.hashes import HASH_TYPE, partition_of, text_hashes
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

ROWS_PER_PARTITION = 1_000_000  # rows of each side a reduce task holds, about (~50 bytes each)
MAX_PARTITIONS = 256
COMMIT_META = b"embedjob.commit"  # the commit stamp in each output file's schema metadata


def partitions_for(rows: int) -> int:
    """``P``: enough partitions for ~ROWS_PER_PARTITION rows each, at most MAX_PARTITIONS."""
    return max(1, min(MAX_PARTITIONS, math.ceil(rows / ROWS_PER_PARTITION)))


@dataclass
class NewShard:
    key: str
    url: str


@dataclass
class Source:
    """An old commit that may serve: its shard key, marker commit stamp and the files it lists."""

    key: str
    commit: str
    files: list[str]
    prefix: str = ""  # where its files are read: "" (in place) or a snapshot folder under _tmp/_reuse/<run>/


@dataclass
class LookupResult:
    reused: dict[str, np.ndarray] = field(default_factory=dict)  # new shard -> its reused rows
    by_home: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # new shard -> home -> reused rows
    homes: dict[str, list[int]] = field(default_factory=dict)  # home -> [old rows matched, old rows read]
    read: set[str] = field(default_factory=set)  # the old commits (shard keys) whose rows the join read
    counts: dict[str, int] = field(default_factory=dict)  # new / changed / removed / matched documents
    stale_sources: list[str] = field(default_factory=list)


def _split(table: pa.Table, partitions: int) -> list[pa.Table]:
    if partitions == 1:
        return [table]
    part = partition_of(table.column("id"), partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    return [table.take(pa.array(order[bounds[p]:bounds[p + 1]])) for p in range(partitions)]


def new_side(shard: NewShard, storage_options: dict[str, Any], id_column: str, text_column: str,
             partitions: int) -> list[pa.Table]:
    """(id, text_hash, shard, row) of one input shard's documents, split by partition (a document
    without text has a null hash: never matched, but not removed either)."""
    t = Storage(shard.url, storage_options).read_parquet("", columns=[id_column, text_column])
    h = text_hashes(t.column(text_column).to_pylist())
    table = pa.table({"id": t.column(id_column).cast(pa.string()), TEXT_HASH: h,
                      "shard": pa.array([shard.key] * t.num_rows, pa.string()),
                      "row": pa.array(np.arange(t.num_rows, dtype=np.int64))})
    return _split(table, partitions)


def stamp_of(out: Storage, rel: str) -> Optional[str]:
    raw = (out.read_parquet_schema(rel).metadata or {}).get(COMMIT_META)
    return raw.decode() if raw else None


def old_side(out_url: str, storage_options: dict[str, Any], source: Source, partitions: int) -> list[pa.Table]:
    """(id, text_hash, src, src_row) of one old commit's rows, split by partition; nothing when its
    vectors have no text_hash (written before reuse) or a file is not of its marker's commit."""
    out = Storage(out_url, storage_options)
    empty = pa.table({"id": pa.array([], pa.string()), TEXT_HASH: pa.array([], HASH_TYPE),
                      "src": pa.array([], pa.string()), "src_row": pa.array([], pa.int64()),
                      "src_commit": pa.array([], pa.string()), "src_prefix": pa.array([], pa.string())})
    vec_rel = next((source.prefix + f for f in source.files if f.startswith("vectors/")), None)
    try:
        if vec_rel is None or TEXT_HASH not in out.read_parquet_schema(vec_rel).names:
            return [empty] * partitions
        if any(stamp_of(out, source.prefix + rel) != source.commit for rel in source.files):
            logger.warning("reuse: the files of %s are not those its done marker vouches for: not reused", source.key)
            return [empty] * partitions
        names = out.read_parquet_schema(vec_rel).names
        t = out.read_parquet(vec_rel, columns=["id", TEXT_HASH] + ([STATIC_HOME] if STATIC_HOME in names else []))
    except (OSError, pa.ArrowException, ValueError) as e:
        logger.warning("reuse: cannot read %s (%s): its documents are encoded again", vec_rel, e)
        return [empty] * partitions
    table = pa.table({"id": t.column("id").cast(pa.string()), TEXT_HASH: t.column(TEXT_HASH),
                      "src": pa.array([source.key] * t.num_rows, pa.string()),
                      "src_row": pa.array(np.arange(t.num_rows, dtype=np.int64)),
                      "src_commit": pa.array([source.commit] * t.num_rows, pa.string()),
                      "src_prefix": pa.array([source.prefix] * t.num_rows, pa.string()),
                      STATIC_HOME: _homes(t, source.commit)})
    return _split(table, partitions)


def _homes(t: pa.Table, commit: str) -> pa.Array:
    """Each old row's static home: its ``static_home``, else the commit that wrote it (encoded there)."""
    own = pa.array([commit] * t.num_rows, pa.string())
    if STATIC_HOME not in t.column_names:
        return own
    return pc.coalesce(t.column(STATIC_HOME).combine_chunks().cast(pa.string()), own)


def _home_counts(table: Optional[pa.Table]) -> dict[str, int]:
    if table is None or not table.num_rows:
        return {}
    vc = pc.value_counts(table.column(STATIC_HOME).combine_chunks())
    return {str(k): int(n) for k, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())}


def _with_text(table: Optional[pa.Table]) -> Optional[pa.Table]:
    return None if table is None else table.filter(pc.is_valid(table.column(TEXT_HASH)))


def _removed(plan_url: str, storage_options: dict[str, Any], p: int, new: Optional[pa.Table],
             old: Optional[pa.Table]) -> tuple[int, list[str]]:
    """Write partition ``p``'s removed ids (old ids no new shard holds, with or without text) to
    ``<plan>/../removed/<p>.parquet`` (the Lance merge deletes them); their number and the old
    commits read."""
    if old is None or not old.num_rows:
        return 0, []
    ids = old.column("id").combine_chunks()
    gone = ids.filter(pc.invert(pc.is_in(ids, new.column("id").combine_chunks()))) if new is not None else ids
    gone = pc.unique(gone)
    if len(gone):
        Storage(plan_url.rsplit("/", 1)[0], storage_options).write_parquet(f"removed/{p:05d}.parquet",
                                                                           pa.table({"id": gone}))
    return len(gone), sorted(set(old.column("src").to_pylist()))


def join_partition(plan_url: str, storage_options: dict[str, Any], p: int, n_new: int,
                   *pieces: pa.Table) -> dict[str, Any]:
    """Reduce task ``p``: join its new and old pieces on (id, text_hash), write each new shard's plan
    file, and return ``{"reused": {shard: {home: rows}}, "homes": {home: [matched, read]}, "counts": {...}}``."""
    new_all = pa.concat_tables(pieces[:n_new]) if n_new else None
    old_all = pa.concat_tables(pieces[n_new:]) if len(pieces) > n_new else None
    removed, read = _removed(plan_url, storage_options, p, new_all, old_all)
    new, old = _with_text(new_all), _with_text(old_all)
    held = _home_counts(old)
    if new is None or old is None or not new.num_rows or not old.num_rows:
        return {"reused": {}, "homes": {h: [0, n] for h, n in held.items()}, "read": read,
                "counts": _counts(new, old, 0, removed)}
    matched = new.join(old, keys=["id", TEXT_HASH], join_type="inner", use_threads=False)
    # one source per new row (an id kept twice in old commits of the same recipe: either serves)
    matched = matched.sort_by([("shard", "ascending"), ("row", "ascending"), ("src", "ascending")])
    shard, row = matched.column("shard").to_numpy(zero_copy_only=False), matched.column("row").to_numpy()
    first = np.ones(len(row), bool)
    first[1:] = (shard[1:] != shard[:-1]) | (row[1:] != row[:-1])
    matched = matched.filter(pa.array(first))
    out = Storage(plan_url, storage_options)
    reused: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(set(matched.column("shard").to_pylist())):
        part = matched.filter(pc.equal(matched.column("shard"), key)).select(
            ["row", "src", "src_row", "src_commit", "src_prefix", STATIC_HOME])
        out.write_parquet(f"{key}/{p:05d}.parquet", part)
        homes = part.column(STATIC_HOME).to_numpy(zero_copy_only=False)
        rows = part.column("row").to_numpy()
        reused[key] = {str(h): rows[homes == h] for h in np.unique(homes)}
    got = _home_counts(matched)
    return {"reused": reused, "homes": {h: [got.get(h, 0), n] for h, n in held.items()}, "read": read,
            "counts": _counts(new, old, matched.num_rows, removed)}


def _counts(new: Optional[pa.Table], old: Optional[pa.Table], matched: int, removed: int) -> dict[str, int]:
    """Documents by what became of them: (with text) matched (reused), changed (an old id, another
    text), new (an id no old commit has); and removed (an old id no new shard has)."""
    new_ids = set(new.column("id").to_pylist()) if new is not None else set()
    old_ids = set(old.column("id").to_pylist()) if old is not None else set()
    both = len(new_ids & old_ids)
    return {"matched": matched, "changed": max(0, both - matched), "new": len(new_ids - old_ids),
            "removed": removed}


def _tasks_return(fn):
    """``fn`` returning its one partition as itself (a task of ``num_returns=1`` returns one object)."""
    def task(*args: Any) -> Any:
        parts = fn(*args)
        return parts[0] if len(parts) == 1 else parts

    task.__name__ = fn.__name__
    return task


def lookup(out: Storage, plan_rel: str, shards: list[NewShard], sources: list[Source], *,
           storage_options: dict[str, Any], id_column: str, text_column: str, rows: int,
           partitions: Optional[int] = None) -> LookupResult:
    """Run the join over ``shards`` (new, from the input) and ``sources`` (old commits) and return
    each new shard's reused rows and the counts; plans land under ``<output>/<plan_rel>/``."""
    import ray

    p_count = partitions or partitions_for(rows)
    opts = dict(num_cpus=0.5, max_retries=3)
    newf = ray.remote(**opts)(_tasks_return(new_side)).options(num_returns=p_count)
    oldf = ray.remote(**opts)(_tasks_return(old_side)).options(num_returns=p_count)
    joinf = ray.remote(**opts)(join_partition)
    as_list = (lambda r: [r]) if p_count == 1 else list
    new_refs = [as_list(newf.remote(s, storage_options, id_column, text_column, p_count)) for s in shards]
    old_refs = [as_list(oldf.remote(out.url(), out.storage_options, s, p_count)) for s in sources]
    plan_url = out.url(plan_rel)
    joins = [joinf.remote(plan_url, out.storage_options, p, len(new_refs), *[r[p] for r in new_refs],
                          *[r[p] for r in old_refs]) for p in range(p_count)]
    result = LookupResult(counts={"matched": 0, "changed": 0, "new": 0, "removed": 0, "partitions": p_count})
    for ref in joins:  # one partition's answer at a time: the driver holds row indices, never hashes
        got = ray.get(ref)
        for k, v in got["counts"].items():
            result.counts[k] += v
        result.read.update(got["read"])
        for h, (m, n) in got["homes"].items():
            have = result.homes.setdefault(h, [0, 0])
            have[0], have[1] = have[0] + m, have[1] + n
        for key, homes in got["reused"].items():
            mine = result.by_home.setdefault(key, {})
            for h, rows_ in homes.items():
                mine[h] = np.concatenate([mine[h], rows_]) if h in mine else rows_
    result.reused = {k: np.sort(np.concatenate(list(v.values()))) for k, v in result.by_home.items()}
    return result
