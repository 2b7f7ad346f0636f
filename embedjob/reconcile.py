"""What a rerun keeps, and what it moves aside: one recipe per output folder.

A reader that globs an output folder (``duckdb "select * from 'out/vectors/*.parquet'"``) must see
the vectors, tokens and static parts of one recipe only (the shard stage hash: preprocessing,
model, pooling, static options), and exactly the rows that ``manifest.json`` counts. After the
per-shard stages, :func:`reconcile_outputs` makes that true:

* a shard committed by this run, or unchanged since an earlier run of the same recipe, is kept;
* a shard of the same recipe whose reprocessing failed keeps its previous commit (listed as such);
* a shard that left the input keeps its commit only with ``output.removed_shards: keep``
  (same recipe); by default it is moved aside;
* everything else under the per-shard folders (another recipe's commits, leftovers of a crashed
  run, files a kept shard's marker does not list) is moved to ``_superseded/<run id>/`` under the
  same relative path, and listed in ``_superseded/<run id>/moved.json`` and in the manifest.

Nothing is deleted: a superseded file is moved only after this run's replacements are committed,
and the shard's done marker goes first, so a crash halfway leaves unmarked leftovers that the
next run moves aside in turn (never a marker without its files).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from embedjob.layout import DONE, LANCE_DATA, PER_SHARD_DIRS, STAGE_MARKER_PREFIX, SUPERSEDED, shard_marker
from embedjob.storage import Storage

logger = logging.getLogger(__name__)



def read_marker(out: Storage, rel: str) -> Optional[dict[str, Any]]:
    """The done marker at ``rel`` (:func:`~embedjob.layout.shard_marker` or ``stage_marker``);
    ``None`` when it is missing or unreadable, so that its work is redone."""
    try:
        marker = out.read_json(rel)
    except (FileNotFoundError, OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def marked_shards(out: Storage) -> list[str]:
    """The keys of the shards that have a done marker in the output."""
    return [n[: -len(".json")] for n in out.list(DONE, suffix=".json") if not n.startswith(STAGE_MARKER_PREFIX)]


def read_shard_markers(out: Storage, *, threads: int = 16) -> dict[str, dict[str, Any]]:
    """Every per-shard done marker in the output, ``{shard key: marker}`` (unreadable ones are
    treated as absent, so their shard is redone)."""
    keys = marked_shards(out)

    def read(key: str) -> Optional[dict[str, Any]]:
        marker = read_marker(out, shard_marker(key))
        if marker is None:
            logger.warning("unreadable done marker %s: its shard is redone", out.url(shard_marker(key)))
        return marker

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys) or 1))) as pool:
        read_back = list(pool.map(read, keys))
    return {k: m for k, m in zip(keys, read_back) if m is not None}


def list_shard_files(out: Storage) -> dict[str, set[str]]:
    """``{shard key: {relative paths}}`` of every file under the per-shard output folders."""
    files: dict[str, set[str]] = {}
    for folder in PER_SHARD_DIRS:
        for name in out.list(folder):
            if name.startswith("."):  # a write in flight (storage's temporary names)
                continue
            key = name[: -len(".parquet")] if name.endswith(".parquet") else name
            files.setdefault(key, set()).add(f"{folder}/{name}")
    return files


def marker_files(marker: dict[str, Any]) -> set[str]:
    """The per-shard output files a done marker lists (vectors, tokens, static part)."""
    listed: set[str] = set()
    outputs = marker.get("outputs") or {}
    for v in outputs.values():
        if isinstance(v, str):
            listed.add(v)
        elif isinstance(v, dict) and isinstance(v.get("part"), str):
            listed.add(v["part"])
    return listed


def list_lance_files(out: Storage) -> set[str]:
    """Names of the data files of the Lance dataset (``output.lance``), in any version or none."""
    return set(out.list(LANCE_DATA)) if out.exists(LANCE_DATA) else set()


def is_intact(marker: dict[str, Any], files: dict[str, set[str]], key: str,
              lance_files: Optional[set[str]] = None) -> bool:
    """True when every file the marker lists is present (with ``lance_files``: its Lance fragments' too)."""
    part = marker.get("lance")
    if lance_files is not None and part is not None:
        wanted = {d["path"] for f in part.get("fragments", []) for d in f.get("files", [])}
        if not wanted <= lance_files:
            return False
    return marker_files(marker) <= files.get(key, set())


def reconcile_outputs(out: Storage, *, keep: dict[str, dict[str, Any]], markers: dict[str, dict[str, Any]],
                      reasons: dict[str, str], run_id: str) -> dict[str, Any]:
    """Move aside every per-shard output and marker that ``keep`` (``{key: marker}``) does not
    vouch for. ``markers`` are the shard markers found before this run (for the record of what was
    moved), ``reasons`` says why a shard with a marker is dropped (``"recipe changed"``...).

    Returns ``{"run": run_id, "to": "_superseded/<run>/", "shards": {key: {"reason", "files"}}}``
    (``shards`` empty when nothing moved)."""
    files = list_shard_files(out)
    current = set(marked_shards(out))
    dest = f"{SUPERSEDED}/{run_id}"
    moved: dict[str, dict[str, Any]] = {}
    for key in sorted(set(files) | current):
        if key in keep:
            extra = files.get(key, set()) - marker_files(keep[key])
            if extra:
                moved[key] = {"reason": "not listed by the shard's current commit", "files": sorted(extra)}
                _move_all(out, sorted(extra), dest)
            continue
        old = markers.get(key)
        reason = reasons.get(key) or ("uncommitted leftover" if old is None else "not vouched for by this run")
        rels = sorted(files.get(key, set()))
        marker_rel = shard_marker(key)
        entry: dict[str, Any] = {"reason": reason, "files": rels}
        if key in current:
            entry["marker"] = marker_rel
            if old is not None:
                entry["stage_hash"] = old.get("stage_hash")
                entry["rows"] = old.get("rows_out")
            _move_all(out, [marker_rel], dest)  # the commit point goes first
        _move_all(out, rels, dest)
        moved[key] = entry
    if moved:
        out.write_json(f"{dest}/moved.json", {"run": run_id, "moved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "shards": moved})
        logger.warning("moved the outputs of %d shard(s) aside to %s (%s); nothing was deleted",
                       len(moved), out.url(dest), _summary(moved))
    return {"run": run_id, "to": dest + "/", "shards": moved}


def _move_all(out: Storage, rels: list[str], dest: str) -> None:
    for rel in rels:
        out.move(rel, f"{dest}/{rel}")


def _summary(moved: dict[str, dict[str, Any]]) -> str:
    by_reason: dict[str, int] = {}
    for v in moved.values():
        by_reason[v["reason"]] = by_reason.get(v["reason"], 0) + 1
    return ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items()))


def outputs_to_keep(removed_shards: str, status: dict[str, dict[str, Any]], previous: dict[str, dict[str, Any]],
                     stage_hash: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``({shard: marker} whose files stay, {shard: why its earlier commit is moved aside})``.

    Kept: shards committed by this run or unchanged; a shard whose reprocessing failed keeps an
    earlier commit of the same recipe; a shard no longer in the input keeps one only with
    ``removed_shards=keep`` (``output.removed_shards``). Updates ``status`` for the shards kept that way."""
    keep: dict[str, dict[str, Any]] = {}
    reasons: dict[str, str] = {}
    for key, v in status.items():
        if v["status"] in ("done", "skipped-unchanged"):
            keep[key] = v["marker"]
    for key, old in previous.items():
        if key in keep:
            continue
        same_recipe = old.get("stage_hash") == stage_hash
        if key in status:  # in the input, failed this run
            if same_recipe:
                keep[key] = old
                status[key].update(previous_commit="kept", rows=old.get("rows_out"), marker=old)
            else:
                reasons[key] = "the shard failed and its earlier commit is of another recipe"
        elif same_recipe and removed_shards == "keep":
            keep[key] = old
            status[key] = {"status": "kept-not-in-input", "url": (old.get("input") or {}).get("url"),
                           "rows": old.get("rows_out"), "marker": old}
        else:
            reasons[key] = ("not in the input (output.removed_shards=move)" if same_recipe
                            else "not in the input, another recipe")
    return keep, reasons
