"""Reading a finished job's topics back: what ``embedjob topics OUTPUT`` prints (no torch)."""

from __future__ import annotations

import json
from typing import Any, Optional

from embedjob.errors import TopicsError
from embedjob.layout import TOPICS_JSON, TOPICS_METRICS
from embedjob.storage import Storage, StorageError


def read_topics(store: Storage) -> Optional[tuple[dict[str, Any], Optional[dict[str, Any]]]]:
    """``topics/topics.json`` and ``topics/metrics.json`` (None where the job wrote none) of an
    output, or None when it has no topics: what ``embedjob topics`` and the report read."""
    if not store.exists(TOPICS_JSON):
        return None
    doc = store.read_json(TOPICS_JSON)
    metrics = store.read_json(TOPICS_METRICS) if store.exists(TOPICS_METRICS) else None
    return doc, metrics


def format_topics(topics_doc: dict[str, Any], metrics: Optional[dict[str, Any]] = None, n: int = 10) -> str:
    """A header line (model, K, mean NPMI / C_V, diversity) when ``metrics`` is given, then one line
    per topic: its coherence scores and top ``n`` words."""
    lines = []
    if metrics:
        parts = [f"{metrics.get('model', topics_doc.get('model'))}, K={topics_doc.get('num_topics')}"]
        if metrics.get("npmi") is not None:
            parts.append(f"NPMI {metrics['npmi']:.4f}")
        if metrics.get("c_v") is not None:
            parts.append(f"C_V {metrics['c_v']:.4f}")
        parts.append(f"diversity {metrics.get('diversity', float('nan')):.3f}")
        lines.append(", ".join(parts))
    for t in topics_doc["topics"]:
        score = []
        if "npmi" in t:
            score.append("npmi undefined" if t["npmi"] is None else f"npmi {t['npmi']:+.3f}")
        if "c_v" in t:
            score.append("c_v undefined" if t["c_v"] is None else f"c_v {t['c_v']:.3f}")
        lines.append(f"{t['topic']:3d} [{' '.join(score)}] {' '.join(t['words'][:n])}")
    return "\n".join(lines)


def topics_report(output_url: str, *, storage_options: Optional[dict[str, Any]] = None, top: int = 10,
                  as_json: bool = False) -> str:
    """What ``embedjob topics OUTPUT`` prints: the topics of a finished job with their coherence
    (:func:`format_topics`, ``top`` words each), or ``topics.json`` and ``metrics.json`` as one JSON
    object with ``as_json``. Raises :class:`TopicsError` when the output has no topics or cannot be read.

    Example::

        print(topics_report("output/local", top=5))
    """
    try:
        store = Storage(output_url, storage_options or {})
        found = read_topics(store)
        if found is None:
            raise TopicsError(f"no topics at {store.url(TOPICS_JSON)!r}: run the job with topics.enabled=true")
        doc, metrics = found
    except (StorageError, OSError) as e:
        raise TopicsError(f"cannot read {output_url!r}: {e}") from None
    if as_json:
        return json.dumps({"topics": doc, "metrics": metrics})
    return format_topics(doc, metrics, top)
