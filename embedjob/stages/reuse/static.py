"""Reuse with static word vectors on: which static parts a rerun carries, and what it encodes again.

A static part (``static/parts/<shard>.parquet``) is the per-word sums over the documents its commit
encoded; one document's contribution cannot be taken out of it. So every row of ``vectors/`` names
its *static home* (``static_home``: the commit whose part holds its word sums; rows written before
this column: their own commit), and each marker counts its rows per home with the home's document
count (``static_homes: {home: [rows here, documents of the home]}``).

A home is *complete* when all its documents are still in the output unchanged: the rows the lookup
matched plus those in unchanged shards equal its document count. A rerun

* carries a complete home whole: its part is copied to ``static/carried/<commit>.parquet`` (before
  the stream; named by commit, so a rerun copies it again harmlessly) and its rows are copied with
  their home (re-partitioning 4 shards into 7 encodes nothing);
* encodes again the surviving documents of an incomplete home (an edited or removed document's old
  contribution cannot be subtracted: its old text is gone), unchanged shards included: those are
  processed again with their other rows copied from their own files (a *self plan*).

The static stage sums each home's part once when every home's rows add up to its document count,
and refuses otherwise (``stages/static/stage.py``): no double count, no dropped document, whatever
run was killed where. Every home a kept row names is either carried (complete) or its rows encoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.errors import IncompleteShardError
from embedjob.layout import CARRIED_DIR, PARTS_DIR, carried_part, shard_file
from embedjob.schema import STATIC_HOME, TEXT_HASH
from embedjob.stages.reuse.lookup import COMMIT_META, LookupResult, stamp_of
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


def marker_homes(marker: dict[str, Any]) -> dict[str, list[int]]:
    """``{home: [rows here, documents of the home]}`` of a committed shard (empty for a marker written
    before homes: its rows are its own commit's, a home no other shard holds)."""
    return {str(h): [int(v[0]), int(v[1])] for h, v in (marker.get("static_homes") or {}).items()}


def home_part(key: str, marker: dict[str, Any], home: str) -> str:
    """Where ``home``'s part is read for a shard committed as ``marker``: its own, or a carried one."""
    return shard_file(PARTS_DIR, key) if home == marker.get("commit") else carried_part(home)


@dataclass
class StaticCarry:
    """What :func:`plan_static` decided."""

    broken: set[str] = field(default_factory=set)  # incomplete homes: their rows are encoded again
    docs: dict[str, int] = field(default_factory=dict)  # carried home -> its documents (for the markers)
    pulled: list[str] = field(default_factory=list)  # unchanged shards processed again (self plans)
    dropped: int = 0  # matched rows encoded again, not copied, because their home is incomplete
    parts_copied: int = 0


def _documents(previous: dict[str, dict[str, Any]], held: dict[str, list[int]]) -> dict[str, int]:
    """Each home's document count: as the markers record it, else (a commit written before homes)
    the rows the lookup read of it."""
    docs = {h: n for h, (_, n) in held.items()}
    for m in previous.values():
        for h, (_, d) in marker_homes(m).items():
            docs[h] = d
    return docs


def _secure_part(out: Storage, home: str, previous: dict[str, dict[str, Any]]) -> bool:
    """Make sure ``static/carried/<home>.parquet`` holds ``home``'s part (copied from the shard whose
    commit it is, when its stamp matches); False when it cannot be found."""
    dest = carried_part(home)
    if out.exists(dest):
        return True
    key = next((k for k, m in previous.items() if m.get("commit") == home), None)
    src = shard_file(PARTS_DIR, key) if key else None
    if src is None or not out.exists(src):
        return False
    stamp = stamp_of(out, src)
    if stamp is not None and stamp != home:
        return False
    out.makedirs(CARRIED_DIR)
    out.fs.copy(out.path(src), out.path(dest))
    return True


def self_plan(out: Storage, plan_rel: str, key: str, url: str, marker: dict[str, Any], prefix: str,
              broken: set[str], storage_options: dict[str, Any], id_column: str) -> Optional[dict[str, np.ndarray]]:
    """An unchanged shard processed again: its rows of complete homes copied from its own files (read
    from ``prefix``, the snapshot), written as ``<plan>/<key>/self.parquet``; returns those rows by
    home, or None when its files are not its marker's."""
    vec_rel = prefix + shard_file("vectors", key)
    try:
        t = out.read_parquet(vec_rel, columns=["id", TEXT_HASH, STATIC_HOME])
    except (OSError, pa.ArrowException, ValueError, KeyError):
        return None
    if ((t.schema.metadata or {}).get(COMMIT_META) or b"").decode() != marker.get("commit"):
        return None
    ids = Storage(url, storage_options).read_parquet("", columns=[id_column]).column(id_column).cast(pa.string())
    at = {v: i for i, v in enumerate(ids.to_pylist())}
    homes = t.column(STATIC_HOME).to_pylist()
    keep = [j for j, (i, h) in enumerate(zip(t.column("id").cast(pa.string()).to_pylist(), homes))
            if h is not None and h not in broken and i in at]
    rows = np.array([at[str(t.column("id")[j].as_py())] for j in keep], dtype=np.int64)
    n = len(keep)
    plan = pa.table({"row": rows, "src": pa.array([key] * n, pa.string()), "src_row": pa.array(keep, pa.int64()),
                     "src_commit": pa.array([marker["commit"]] * n, pa.string()),
                     "src_prefix": pa.array([prefix] * n, pa.string()),
                     STATIC_HOME: pa.array([homes[j] for j in keep], pa.string())})
    out.write_parquet(f"{plan_rel}/{key}/self.parquet", plan)
    col = np.asarray([homes[j] for j in keep], dtype=object)
    return {str(h): rows[col == h] for h in sorted(set(col.tolist()))}


def plan_static(out: Storage, found: LookupResult, previous: dict[str, dict[str, Any]], unchanged: set[str],
                make_self: Callable[[str, set[str]], Optional[dict[str, np.ndarray]]]) -> StaticCarry:
    """The incomplete homes, the unchanged shards that hold some (processed again, their other rows
    copied by ``make_self(key, broken)``: rows by home, None when it cannot), and the complete homes
    whose parts are secured in ``static/carried/``; drops the incomplete homes' rows from ``found``
    (they are encoded) and adds the self plans' rows."""
    docs = _documents(previous, found.homes)
    held_unchanged: dict[str, int] = {}
    for k in unchanged:
        for h, (n, _) in marker_homes(previous.get(k) or {}).items():
            held_unchanged[h] = held_unchanged.get(h, 0) + n
    homes = set(found.homes) | set(held_unchanged)
    broken = {h for h in homes if found.homes.get(h, [0, 0])[0] + held_unchanged.get(h, 0) != docs.get(h, -1)}
    carry = StaticCarry()
    while True:  # a part not found or a self plan not made breaks more homes: again until none does
        pulled = sorted(k for k in unchanged if set(marker_homes(previous.get(k) or {})) & broken)
        selves = {k: make_self(k, broken) for k in pulled}
        failed = {h for k, got in selves.items() if got is None for h in marker_homes(previous[k])}
        wanted = {h for rows in found.by_home.values() for h in rows} | {
            h for got in selves.values() for h in (got or {})}
        for h in sorted(wanted - broken - failed):
            if not _secure_part(out, h, previous):
                failed.add(h)
        if not failed - broken:
            break
        logger.warning("reuse: %d static home(s) cannot be carried (part or files not found): their documents "
                       "are encoded again", len(failed - broken))
        broken |= failed
    carry.parts_copied = len(wanted - broken)
    for key, by_home in list(found.by_home.items()):
        for h in [h for h in by_home if h in broken]:
            carry.dropped += len(by_home.pop(h))
    for key, got in selves.items():
        found.by_home[key] = dict(got or {})
    found.reused = {k: np.sort(np.concatenate(list(v.values()))) if v else np.zeros(0, np.int64)
                    for k, v in found.by_home.items()}
    carry.broken, carry.pulled = broken, pulled
    carry.docs = {h: docs[h] for h in homes - broken if h in docs}
    return carry


def drop_broken(plan: pa.Table, broken: set[str]) -> pa.Table:
    """The plan rows whose home is complete (the others are encoded this run)."""
    if not broken or STATIC_HOME not in plan.column_names:
        return plan
    return plan.filter(pc.invert(pc.is_in(plan.column(STATIC_HOME), pa.array(sorted(broken), pa.string()))))


def with_own_home(vectors: pa.Table, commit: str) -> pa.Table:
    """The rows encoded in this commit (with text) are of its own static home."""
    if TEXT_HASH not in vectors.column_names:  # no hashes (never reused): every row is of this commit
        home = pa.array([commit] * vectors.num_rows, pa.string())
        return vectors.append_column(STATIC_HOME, home).replace_schema_metadata(vectors.schema.metadata)
    home = pc.if_else(pc.is_valid(vectors.column(TEXT_HASH)), pa.scalar(commit, pa.string()),
                      pa.scalar(None, pa.string()))
    return vectors.append_column(STATIC_HOME, home).replace_schema_metadata(vectors.schema.metadata)


def homes_of(vectors: pa.Table, commit: str, docs: dict[str, int]) -> dict[str, list[int]]:
    """The marker's ``static_homes`` of a shard's rows: ``{home: [rows here, documents of the home]}``
    (this commit's home: the rows encoded here; a carried one: its count from the plan)."""
    if STATIC_HOME not in vectors.column_names:
        return {}
    vc = pc.value_counts(vectors.column(STATIC_HOME).combine_chunks())
    got = {h: int(n) for h, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()) if h is not None}
    missing = sorted(h for h in got if h != commit and h not in docs)
    if missing:
        raise IncompleteShardError(f"rows of static home(s) {missing} were copied without the plan's document "
                                   "count; the shard is not committed and is redone")
    return {h: [n, n if h == commit else int(docs[h])] for h, n in sorted(got.items())}
