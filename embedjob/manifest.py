"""What a run records about itself: package versions, per-stage counters and per-shard summaries
for ``manifest.json`` and ``stats/<stage>.json``.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Optional

from embedjob import __version__
from embedjob.errors import Interrupted
from embedjob.layout import DONE, LANCE_DOCS, SUPERSEDED, TOKENS_DIR, VECTORS
from embedjob.redact import redact, redact_url


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "embedjob": __version__}
    for pkg in ("ray", "torch", "transformers", "gensim", "pyarrow", "fsspec", "s3fs", "faiss-cpu", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def marker_summary(marker: Optional[dict[str, Any]]) -> dict[str, Any]:
    if not marker:
        return {}
    keys = ("rows_in", "rows_out", "empty_text", "skipped_empty", "bert_tokens", "words", "outputs", "vector_codec")
    return {k: marker[k] for k in keys if k in marker}


def stage_stats(name: str, status: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    done = [v["marker"] for v in status.values() if v["status"] == "done"]
    base = {"stage": name, "shards_processed": len(done),
            "shards_skipped_unchanged": sum(1 for v in status.values() if v["status"] == "skipped-unchanged"),
            "shards_failed": sum(1 for v in status.values() if v["status"] == "failed")}
    if name == "reuse":
        return {"stage": name, **stats}
    if name == "read":
        base["rows"] = sum(m["rows_in"] for m in done)
    elif name == "preprocess":
        base["rows"] = sum(m["rows_in"] for m in done)
        base["empty_text"] = sum(m["empty_text"] for m in done)
        base["skipped_empty"] = sum(m["skipped_empty"] for m in done)
        base["gensim_tokens"] = sum(m["words"] for m in done)
    else:
        base.update(stats)
    return base


def build_manifest(run: Any) -> dict[str, Any]:
    """``manifest.json``: what this run read, made, kept and moved aside, and how it went.

    ``run`` is the sequencer's state of one run (``pipeline._Run``): its config, shards, statuses,
    stage results and error."""
    cfg, inp, status, keep = run.cfg, run.cfg.input, run.status, run.keep
    failed = sum(1 for v in status.values() if v["status"] == "failed")
    return {
        "embedjob_version": __version__,
        "job": cfg.name,
        "run_id": run.lease.run_id,
        "status": (("interrupted" if isinstance(run.error, Interrupted) else "failed") if run.error is not None
                   else ("partial" if failed else "ok")),
        **({"error": str(run.error)} if run.error is not None else {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(time.time() - run.t_start, 3),
        "config": redact(cfg.model_dump(mode="json")),
        "versions": package_versions(),
        "ray": run.ray_info,
        "encoder": {**run.encoder.as_dict(), "actors": run.plan.as_dict() if run.plan else {}},
        "recipe": run.stage_hash,
        "input": {
            "url": redact_url(inp.url), "id_column": inp.id_column, "text_column": inp.text_column,
            "storage_options": redact(inp.storage_options),
            "shards": {s.key: redact_url(s.url) for s in run.shards},
            "ids": run.id_stats,
        },
        "shards": {k: {kk: vv for kk, vv in v.items() if kk != "marker"} | marker_summary(v.get("marker"))
                   for k, v in sorted(status.items())},
        "totals": {
            "shards": len(run.shards), "done": sum(1 for v in status.values() if v["status"] == "done"),
            "skipped_unchanged": sum(1 for v in status.values() if v["status"] == "skipped-unchanged"),
            "kept_not_in_input": sum(1 for v in status.values() if v["status"] == "kept-not-in-input"),
            "failed": failed,
            **({"interrupted": n} if (n := sum(1 for v in status.values() if v["status"] == "interrupted")) else {}),
            "committed_shards": len(keep),
            # documents encoded by the model in this run, copied from earlier commits (output.reuse), gone
            "documents": (run.stages.get("reuse") or {}).get("documents"),
            # rows in the output's per-shard files: exactly what a reader that globs vectors/ gets
            "rows_out": sum(int(m.get("rows_out") or 0) for m in keep.values()),
        },
        "superseded": run.superseded,
        "stages": run.stages,
        "outputs": {"vectors": VECTORS + "/", "tokens": TOKENS_DIR + "/", "stats": "stats/", "markers": DONE + "/",
                    **({"lance": LANCE_DOCS} if cfg.output.lance else {}),
                    "superseded": SUPERSEDED + "/"},
    }
