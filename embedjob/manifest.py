"""What a run records about itself: package versions, per-stage counters and per-shard summaries
for ``manifest.json`` and ``stats/<stage>.json``.
"""

from __future__ import annotations

import platform
from typing import Any, Optional

from embedjob import __version__


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
