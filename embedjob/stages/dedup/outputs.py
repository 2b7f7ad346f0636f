"""What the dedup stage writes, and how it becomes visible all at once.

Everything of one run is written under ``_tmp/stage-dedup/<build id>/`` first (the cluster files
by the tasks that compute them); :func:`commit` then moves the previous ``dedup/`` aside and the
staged folder in its place, and deletes the previous one. On a local disk each move is one
rename: a reader sees the old ``dedup/`` or the new one, never a mix; a run killed between the two
renames leaves no ``dedup/`` at all and the previous one under ``_tmp``, which :func:`recover`
puts back at the start of the next run. On an object store a move copies object by object:
``dedup/dedup.json`` names the build id that ``pairs.parquet`` and ``groups.parquet`` carry in
their metadata, so a reader can tell a complete set.

``dedup.json`` is also the incremental state: the pair settings and the fingerprint of every shard
whose documents ``pairs.parquet`` covers. A rerun with the same pair settings keeps the pairs of
unchanged shards and computes only those of new documents (against all).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.layout import (
    DEDUP_DIR,
    DEDUP_PAIRS,
    DEDUP_STAGING,
    DEDUP_STATE,
    shard_marker,
)
from embedjob.reconcile import read_marker
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

BUILD_KEY = b"embedjob.dedup_build_id"


def staged(rel: str, build_id: str) -> str:
    """Where ``dedup/<name>`` is written before the commit."""
    return f"{DEDUP_STAGING}/{build_id}/{rel[len(DEDUP_DIR) + 1:]}"


PREVIOUS = f"{DEDUP_STAGING}/previous"  # the last committed dedup/, during a commit


def recover(out: Storage) -> None:
    """Undo what a killed run left: a previous ``dedup/`` moved aside but not replaced goes back;
    every other staged leftover is deleted."""
    if out.exists(DEDUP_STAGING):
        if not out.exists(DEDUP_DIR) and out.exists(PREVIOUS):
            out.move(PREVIOUS, DEDUP_DIR)
            logger.warning("dedup: put back the outputs of its last run, moved aside by a run that was killed")
        out.delete(DEDUP_STAGING, recursive=True)


def commit(out: Storage, build_id: str) -> None:
    """The staged folder becomes ``dedup/`` (the previous one moved aside, then deleted)."""
    if out.exists(DEDUP_DIR):
        out.move(DEDUP_DIR, PREVIOUS)
    out.move(f"{DEDUP_STAGING}/{build_id}", DEDUP_DIR)
    out.delete(DEDUP_STAGING, recursive=True)  # the previous dedup/, and the emptied staging folder


def shard_fingerprints(out: Storage, keys: list[str]) -> dict[str, str]:
    """A fingerprint of each committed shard's vectors: its done marker's input, recipe and commit
    time (a shard re-encoded, or encoded from a changed input, gets a new one)."""
    fps = {}
    for k in keys:
        m = read_marker(out, shard_marker(k)) or {}
        fps[k] = json.dumps([m.get("input"), m.get("stage_hash"), m.get("committed_at")], sort_keys=True, default=str)
    return fps


def previous_state(out: Storage) -> Optional[dict[str, Any]]:
    """The last committed run's ``dedup.json``, when it and its pairs are there."""
    try:
        state = out.read_json(DEDUP_STATE)
    except (FileNotFoundError, OSError, ValueError):
        return None
    return state if isinstance(state, dict) and out.exists(DEDUP_PAIRS) else None


def previous_pairs(out: Storage, ids: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The committed pairs whose two documents are both among ``ids`` (position = index in ``ids``)."""
    t = out.read_parquet(DEDUP_PAIRS, columns=["id_a", "id_b", "cosine"])
    a = pc.index_in(t.column("id_a"), value_set=ids)
    b = pc.index_in(t.column("id_b"), value_set=ids)
    ok = pc.and_(pc.is_valid(a), pc.is_valid(b))
    a, b = (np.asarray(pc.filter(v, ok).to_numpy(zero_copy_only=False), np.int64) for v in (a, b))
    cos = np.asarray(pc.filter(t.column("cosine"), ok).to_numpy(), np.float32)
    return np.minimum(a, b), np.maximum(a, b), cos


def with_build(table: pa.Table, build_id: str) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), BUILD_KEY: build_id.encode()})


def pairs_table(sorted_ids: pa.Array, ra: np.ndarray, rb: np.ndarray, cos: np.ndarray) -> pa.Table:
    """``id_a``, ``id_b``, ``cosine`` from id ranks (``ra < rb``: ``id_a < id_b``)."""
    return pa.table({"id_a": sorted_ids.take(pa.array(ra, pa.int64())),
                     "id_b": sorted_ids.take(pa.array(rb, pa.int64())),
                     "cosine": pa.array(cos, pa.float32())})


def groups_table(sorted_ids: pa.Array, members: np.ndarray, group: np.ndarray, keep: np.ndarray) -> pa.Table:
    return pa.table({"id": sorted_ids.take(pa.array(members, pa.int64())), "group": pa.array(group, pa.int64()),
                     "keep": pa.array(keep, pa.bool_())})


def centroids_table(centroids: np.ndarray) -> pa.Table:
    return pa.table({"cluster": pa.array(np.arange(len(centroids), dtype=np.int32)),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(centroids.reshape(-1), pa.float32()),
                                                                 centroids.shape[1])})


@dataclass
class TextSource:
    """Where the documents' texts are (the input shards), for the report's examples."""

    urls: dict[str, Optional[str]] = field(default_factory=dict)  # shard key -> input file
    id_column: str = "id"
    text_column: str = "text"
    storage_options: dict[str, Any] = field(default_factory=dict)


def first_lines(texts: TextSource, wanted: dict[str, list[str]], width: int = 160) -> dict[str, str]:
    """``{id: first non-empty line of its text}`` for the ids wanted from each shard."""
    found: dict[str, str] = {}
    for key, ids in wanted.items():
        url = texts.urls.get(key)
        if not url:
            continue
        try:
            t = Storage(url, texts.storage_options).read_parquet("", columns=[texts.id_column, texts.text_column])
        except (OSError, KeyError, pa.ArrowInvalid) as e:  # the input moved: the examples go without texts
            logger.warning("dedup: texts of %s not read for the report (%s)", url, e)
            continue
        col = t.column(texts.id_column).cast(pa.string())
        sub = t.filter(pc.is_in(col, value_set=pa.array(ids, pa.string())))
        for i, txt in zip(sub.column(texts.id_column).cast(pa.string()).to_pylist(),
                          sub.column(texts.text_column).to_pylist()):
            line = next((ln.strip() for ln in str(txt or "").splitlines() if ln.strip()), "")
            found[i] = line[:width] + ("…" if len(line) > width else "")
    return found


def examples(groups: pa.Table, shard_of: dict[str, str], texts: Optional[TextSource], n: int,
             per_group: int = 6) -> list[dict[str, Any]]:
    """The ``n`` largest groups (ties: lowest number), at most ``per_group`` members each (the kept
    one first), with the first line of each text when the input can be read."""
    if not n or not groups.num_rows:
        return []
    g = np.asarray(groups.column("group").to_numpy())
    sizes = np.bincount(g)
    top = sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))[:n]
    rows = []
    ids, keep = groups.column("id").to_pylist(), groups.column("keep").to_pylist()
    for k in top:
        idx = sorted(np.flatnonzero(g == k), key=lambda i: (not keep[i], ids[i]))[:per_group]
        rows.append({"group": int(k), "size": int(sizes[k]),
                     "members": [{"id": ids[i], "keep": bool(keep[i])} for i in idx]})
    if texts is not None:
        wanted: dict[str, list[str]] = {}
        for r in rows:
            for m in r["members"]:
                wanted.setdefault(shard_of.get(m["id"], ""), []).append(m["id"])
        lines = first_lines(texts, wanted)
        for r in rows:
            for m in r["members"]:
                m["first_line"] = lines.get(m["id"])
    return rows
