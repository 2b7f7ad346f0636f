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
from embedjob.stages.reuse.lookup import NewShard, Source, lookup
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class ReusePlan:
    """What the lookup decided: the plans' folder, each shard's reused rows, and the counts."""

    plan_rel: Optional[str] = None
    reused: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

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


def off_reason(output, static_enabled: bool) -> Optional[str]:
    """Why reuse does not run (``output`` is the OutputConfig), or None."""
    if output.reuse == "off":
        return "output.reuse is off"
    if output.overwrite:
        return "output.overwrite recomputes every shard"
    if static_enabled:  # per-shard word sums cannot be split per document: every document is encoded
        return "static word vectors are on (their per-shard sums need every document encoded)"
    return None


def plan_reuse(output, inp, out: Storage, todo: list[Any], previous: dict[str, dict[str, Any]],
               status: dict[str, dict[str, Any]], stage_hash: str, run_id: str, *, static_enabled: bool = False,
               partitions: Optional[int] = None) -> ReusePlan:
    """The reuse plan of ``todo`` (ShardInfo) against the old commits (``output``/``inp``: the
    OutputConfig and InputConfig; ``status``: the shards planned so far, the unchanged ones never
    serve). An empty plan when reuse is off or nothing can serve."""
    unchanged = {k for k, v in status.items() if v["status"] == "skipped-unchanged"}
    out.delete(REUSE_TMP, recursive=True)  # a killed run's plans: never mixed with this run's
    reason = off_reason(output, static_enabled)
    sources = [] if reason else reuse_sources(previous, unchanged, stage_hash)
    if reason or not todo or not sources:
        why = reason or ("no shard to process" if not todo else "no earlier commit of this recipe with text hashes")
        return ReusePlan(stats={"status": "skipped", "enabled": reason is None, "reason": why, "reused": 0})
    t0 = time.time()
    plan_rel = f"{REUSE_TMP}/{run_id}/plan"
    snap = snapshot_rewritten(out, sources, {s.key for s in todo}, f"{REUSE_TMP}/{run_id}/src/")
    if not sources:  # every earlier commit lost files
        return ReusePlan(stats={"status": "skipped", "enabled": True, "reason": "no earlier commit with all its files",
                                "reused": 0})
    rows = sum(s.num_rows for s in todo)
    try:
        found = lookup(out, plan_rel, [NewShard(s.key, s.url) for s in todo], sources,
                       storage_options=inp.storage_options, id_column=inp.id_column, text_column=inp.text_column,
                       rows=rows, partitions=partitions)
    except Exception as e:  # noqa: BLE001 - reuse is a saving, never a reason to fail: encode everything
        logger.warning("reuse: the lookup failed (%s): every document of the %d shard(s) is encoded", e, len(todo))
        out.delete(REUSE_TMP, recursive=True)
        return ReusePlan(stats={"enabled": True, "error": str(e), "reused": 0})
    reused = sum(len(r) for r in found.reused.values())
    stats = {"enabled": True, "sources": len(sources), "shards": len(todo), "rows": rows, "reused": reused,
             "snapshot_files": snap,
             **{k: v for k, v in found.counts.items() if k != "matched"},
             "lookup_seconds": round(time.time() - t0, 3)}
    stats["seconds"] = stats["lookup_seconds"]
    logger.info("reuse: %d of %d documents of %d shard(s) keep their vectors (%d old commit(s), %d partition(s), "
                "%.1fs); %d changed, %d new", reused, rows, len(todo), len(sources), found.counts["partitions"],
                stats["lookup_seconds"], found.counts["changed"], found.counts["new"])
    return ReusePlan(plan_rel, found.reused, stats)


def close_reuse(out: Storage, plan: ReusePlan, status: dict[str, dict[str, Any]], encode: dict[str, Any],
                superseded: dict[str, Any]) -> dict[str, Any]:
    """Remove this run's plans and snapshots (every commit that reads them is over), and return
    ``stats/reuse.json``, with the manifest's ``documents``: encoded (by the model, this run),
    reused (copied into shards committed this run) and removed (ids of old commits that no new
    shard holds; without a lookup, the rows of the commits moved aside as not in the input)."""
    if plan.plan_rel:
        out.delete(REUSE_TMP, recursive=True)
    done = [v["marker"] for v in status.values() if v["status"] == "done"]
    reused = sum(int((m.get("reuse") or {}).get("reused", 0)) for m in done)
    if "removed" in plan.stats:
        removed = int(plan.stats["removed"])
    else:
        removed = sum(int(v.get("rows") or 0) for v in (superseded.get("shards") or {}).values()
                      if str(v.get("reason", "")).startswith("not in the input"))
    docs = {"encoded": int(encode.get("documents") or 0), "reused": reused, "removed": removed}
    return {**plan.stats, "documents": docs}
