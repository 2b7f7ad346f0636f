"""The report's dedup section (documents dropped at a few thresholds, a handful of duplicate groups
with the first line of each text) and the clusters of sampled documents for the document map,
read from ``dedup/`` (see ``embedjob/stages/dedup``)."""

from __future__ import annotations

from typing import Any, Optional

import embedjob.report.page as P
from embedjob.layout import DEDUP_CLUSTERS, DEDUP_EXAMPLES, shard_file
from embedjob.report.sample import DocSample
from embedjob.storage import Storage


def dedup_section(out: Storage, stats: Optional[dict[str, Any]]) -> str:
    title = "Near-duplicates"
    if not stats or "pairs" not in stats:
        return P.section("dedup", title, P.absent("no dedup in this output (dedup.enabled: false)"))
    summary = P.kv([("documents", stats.get("documents")), ("mode", stats.get("mode")),
                    ("threshold (cosine)", stats.get("threshold")), ("pairs", stats.get("pairs")),
                    ("groups", stats.get("groups")), (f"documents dropped (keep: {stats.get('keep')})", stats.get("dropped")),
                    ("clusters", stats.get("clusters")), ("seconds", stats.get("seconds"))])
    at = stats.get("dropped_at") or {}
    rows = [[f"≥ {t}", v.get("pairs"), v.get("groups"), v.get("dropped"),
             100.0 * v.get("dropped", 0) / max(int(stats.get("documents") or 0), 1)] for t, v in at.items()]
    body = summary + "<h3>Documents dropped by threshold</h3>" + P.table(
        ["cosine", "pairs", "groups", "dropped", "% of documents"], rows, numeric={1, 2, 3, 4})
    ex = out.read_json(DEDUP_EXAMPLES).get("groups", []) if out.exists(DEDUP_EXAMPLES) else []
    body += "<h3>Largest duplicate groups</h3>"
    if not ex:
        return P.section("dedup", title, body + P.absent("no duplicate group"))
    table_rows = []
    for g in ex:
        for i, m in enumerate(g["members"]):
            table_rows.append([g["group"] if i == 0 else "", g["size"] if i == 0 else "", m["id"],
                               "kept" if m["keep"] else "dropped", m.get("first_line") or "(text not read)"])
    body += P.table(["group", "size", "id", "", "first line"], table_rows, numeric={1})
    return P.section("dedup", title, body)


def attach_clusters(out: Storage, sample: DocSample) -> bool:
    """``sample.labels``: each sampled document's cluster (``dedup/clusters/<shard>.parquet``, rows
    as in its vectors file), when every sampled shard has a cluster file; True when attached."""
    shards = sorted(set(sample.shards))
    if not sample.ids or not all(out.exists(shard_file(DEDUP_CLUSTERS, k)) for k in shards):
        return False
    labels: dict[str, str] = {}
    for k in shards:  # two narrow columns of each sampled shard
        t = out.read_parquet(shard_file(DEDUP_CLUSTERS, k), columns=["id", "cluster"])
        labels.update((str(i), f"cluster {c:03d}") for i, c in zip(t.column("id").to_pylist(),
                                                                   t.column("cluster").to_pylist()) if c is not None)
    sample.labels = [labels.get(i, "(none)") for i in sample.ids]
    return True
