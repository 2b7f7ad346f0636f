"""The driver's side of reuse: which old commits may serve, the lookup, and what it counted.

:func:`plan_reuse` runs after the shards are planned and before the per-shard stream. Old commits
serve when they are of this run's recipe (the shard stage hash: model, encoder settings, windows,
prompt, dimensions, stored dtype, preprocessing), their shard is not unchanged (an unchanged
shard's ids are not in any new shard: ids are unique), and their files carry ``text_hash`` and
the commit stamp of their marker. Commits written before reuse existed have no ``text_hash``:
their documents are encoded once more, after which they serve.

Exactly-once: the plan only names rows to copy; a new shard's commit copies them before its done
marker, and old commits are moved aside (``reconcile.py``) only after this run's commits. A run
killed anywhere leaves old commits with their markers, or moved aside whole (marker first): the
rerun plans again from what is there, and copies or encodes each document once.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from embedjob.layout import REUSE_TMP
from embedjob.stages.reuse.lookup import LookupResult, NewShard, Source, lookup
from embedjob.stages.reuse.static import StaticCarry, marker_homes, plan_static, self_plan
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class ReusePlan:
    """What the lookup decided: the plans' folder, each shard's reused rows, and the counts."""

    plan_rel: Optional[str] = None
    reused: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    static: Optional[StaticCarry] = None  # static word vectors on: the homes carried and those encoded again
    removed: Optional[dict[str, Any]] = None  # the lookup's removed ids: {"folder", "read": old commits read}

    def rows(self, key: str) -> Optional[np.ndarray]:
        return self.reused.get(key)


def reuse_sources(previous: dict[str, dict[str, Any]], unchanged: set[str], stage_hash: str) -> list[Source]:
    """The old commits that may serve (see the module's doc)."""
    out = []
    for key, m in sorted(previous.items()):
        outputs = m.get("outputs") or {}
        if key in unchanged or m.get("stage_hash") != stage_hash or not m.get("commit") or "vectors" not in outputs:
            continue
        files = [outputs[k] for k in ("vectors", "tokens", "chunks") if isinstance(outputs.get(k), str)]
        out.append(Source(key, m["commit"], files))
    return out


def snapshot_rewritten(out: Storage, sources: list[Source], todo_keys: set[str], prefix: str) -> int:
    """Copy the files of the old commits whose shard this run rewrites to ``prefix`` (same layout
    below it), and point those sources there; returns the number of files copied."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = []
    for src in sources:
        if src.key in todo_keys:
            src.prefix = prefix
            pairs += [(src.key, rel, prefix + rel) for rel in src.files]

    def copy(pair: tuple[str, str, str]) -> Optional[str]:
        """The source's key when one of its files is gone (that commit cannot serve), else None."""
        key, rel, to = pair
        try:
            out.makedirs(posixpath.dirname(to))
            out.fs.copy(out.path(rel), out.path(to))
        except FileNotFoundError:
            return key
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        gone = {k for k in pool.map(copy, pairs) if k is not None}
    if gone:
        logger.info("reuse: %d earlier commit(s) lost files and cannot serve: %s", len(gone), ", ".join(sorted(gone)))
        sources[:] = [s for s in sources if s.key not in gone]
    return len(pairs)


def off_reason(output) -> Optional[str]:
    """Why reuse does not run (``output`` is the OutputConfig), or None."""
    if output.reuse == "off":
        return "output.reuse is off"
    if output.overwrite:
        return "output.overwrite recomputes every shard"
    return None


def plan_reuse(output, inp, out: Storage, todo: list[Any], previous: dict[str, dict[str, Any]],
               status: dict[str, dict[str, Any]], stage_hash: str, run_id: str, *, static_enabled: bool = False,
               partitions: Optional[int] = None) -> ReusePlan:
    """The reuse plan of ``todo`` (ShardInfo) against the old commits (``output``/``inp``: the
    OutputConfig and InputConfig; ``status``: the shards planned so far, the unchanged ones never
    serve). An empty plan when reuse is off or nothing can serve. With static word vectors on,
    ``plan.static.pulled`` names unchanged shards the caller must process again (``static.py``)."""
    unchanged = {k for k, v in status.items() if v["status"] == "skipped-unchanged"}
    out.delete(REUSE_TMP, recursive=True)  # a killed run's plans: never mixed with this run's
    reason = off_reason(output)
    sources = [] if reason else reuse_sources(previous, unchanged, stage_hash)
    if static_enabled and output.removed_shards == "keep":  # those commits stay: their homes are not carried
        in_input = set(status) | {s.key for s in todo}
        sources = [s for s in sources if s.key in in_input]
    # static word vectors: even with reuse off, the static parts that lose documents are found and their
    # other documents encoded again (else the static sum would drop or double count them)
    static_check = static_enabled and not output.overwrite
    if not todo or not (sources or static_check):
        why = reason or ("no shard to process" if not todo else "no earlier commit of this recipe with text hashes")
        return ReusePlan(stats={"status": "skipped", "enabled": reason is None, "reason": why, "reused": 0})
    t0 = time.time()
    plan_rel = f"{REUSE_TMP}/{run_id}/plan"
    snap = snapshot_rewritten(out, sources, {s.key for s in todo}, f"{REUSE_TMP}/{run_id}/src/")
    rows = sum(s.num_rows for s in todo)
    try:
        found = lookup(out, plan_rel, [NewShard(s.key, s.url) for s in todo], sources,
                       storage_options=inp.storage_options, id_column=inp.id_column, text_column=inp.text_column,
                       rows=rows, partitions=partitions) if sources else LookupResult(counts=_no_counts())
        carry = _static_carry(out, inp, found, previous, status, unchanged, plan_rel, run_id) if static_enabled else None
    except Exception as e:  # noqa: BLE001 - reuse is a saving, never a reason to fail: encode everything
        if static_enabled:  # the static sum may need homes encoded again: no guessing, the job stops
            raise
        logger.warning("reuse: the lookup failed (%s): every document of the %d shard(s) is encoded", e, len(todo))
        out.delete(REUSE_TMP, recursive=True)
        return ReusePlan(stats={"enabled": True, "error": str(e), "reused": 0})
    reused = sum(len(r) for r in found.reused.values())
    stats = {"enabled": reason is None, **({"reason": reason} if reason else {}), "sources": len(sources),
             "shards": len(todo), "rows": rows, "reused": reused, "snapshot_files": snap,
             **{k: v for k, v in found.counts.items() if k != "matched"},
             "lookup_seconds": round(time.time() - t0, 3)}
    if carry is not None:
        stats["static"] = _static_stats(carry, previous)
    stats["seconds"] = stats["lookup_seconds"]
    logger.info("reuse: %d of %d documents of %d shard(s) keep their vectors (%d old commit(s), %d partition(s), "
                "%.1fs); %d changed, %d new", reused, rows, len(todo), len(sources), found.counts["partitions"],
                stats["lookup_seconds"], found.counts["changed"], found.counts["new"])
    read = found.read | set(carry.pulled if carry else ())  # a shard processed again keeps its ids (same input)
    removed = {"folder": f"{REUSE_TMP}/{run_id}/removed",
               "read": {k: m.get("commit") for k, m in previous.items() if k in read}} if sources else None
    return ReusePlan(plan_rel, found.reused, stats, carry, removed)


def _no_counts() -> dict[str, int]:
    return {"matched": 0, "changed": 0, "new": 0, "partitions": 0}  # removed: counted by the reconciliation


def _static_carry(out: Storage, inp, found: LookupResult, previous: dict[str, dict[str, Any]],
                  status: dict[str, dict[str, Any]], unchanged: set[str], plan_rel: str, run_id: str) -> StaticCarry:
    """:func:`plan_static`, with the self plans of the unchanged shards it processes again (their
    files snapshot first: their commit rewrites them in place)."""
    prefix = f"{REUSE_TMP}/{run_id}/src/"

    def make_self(key: str, broken: set[str]):
        m = previous[key]
        outputs = m.get("outputs") or {}
        src = [Source(key, m.get("commit") or "", [outputs[k] for k in ("vectors", "tokens", "chunks")
                                                   if isinstance(outputs.get(k), str)])]
        snapshot_rewritten(out, src, {key}, prefix)
        if not src:
            return None
        return self_plan(out, plan_rel, key, status[key]["url"], m, prefix, broken, inp.storage_options,
                         inp.id_column)

    return plan_static(out, found, previous, unchanged, make_self)


def _static_stats(carry: StaticCarry, previous: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the static side of reuse did, for ``stats/reuse.json``."""
    again = carry.dropped + sum(n for k in carry.pulled for h, (n, _) in marker_homes(previous[k]).items()
                                if h in carry.broken)
    return {"homes_carried": carry.parts_copied, "homes_encoded_again": len(carry.broken),
            "documents_encoded_again": again, "unchanged_shards_processed_again": carry.pulled,
            "why": "an edited or removed document's static contribution cannot be taken out of its shard's "
                   "word sums: the other documents of that part are encoded again"}


def close_reuse(out: Storage, plan: ReusePlan, status: dict[str, dict[str, Any]], encode: dict[str, Any],
                superseded: dict[str, Any]) -> dict[str, Any]:
    """Remove this run's plans and snapshots (every commit that reads them is over), and return
    ``stats/reuse.json``, with the manifest's ``documents``: encoded (by the model, this run),
    reused (copied into shards committed this run) and removed (ids of old commits that no new
    shard holds; without a lookup, the rows of the commits moved aside as not in the input)."""
    if plan.plan_rel:  # the removed ids stay for the Lance merge (the run deletes them at its end)
        run = posixpath.dirname(plan.plan_rel)
        out.delete(f"{run}/plan", recursive=True)
        out.delete(f"{run}/src", recursive=True)
    done = [v["marker"] for v in status.values() if v["status"] == "done"]
    reused = sum(int((m.get("reuse") or {}).get("reused", 0)) for m in done)
    if "removed" in plan.stats:
        removed = int(plan.stats["removed"])
    else:
        removed = sum(int(v.get("rows") or 0) for v in (superseded.get("shards") or {}).values()
                      if str(v.get("reason", "")).startswith("not in the input"))
    docs = {"encoded": int(encode.get("documents") or 0), "reused": reused, "removed": removed}
    return {**plan.stats, "documents": docs}
