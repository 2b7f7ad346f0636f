"""The word and index sections: nearest neighbours of the most frequent words in each set of word
vectors (BERT static, Word2Vec), and each FAISS index's kind, size and recall@10."""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from embedjob.layout import INDEX_DIR, VECTORS, shard_file
from embedjob.stages.index.config import index_files
from embedjob.stages.index.search import load_index
from embedjob.stages.index.shards import to_float32_matrix
from embedjob.storage import Storage
from embedjob.wordvectors import job_vectors_file, load_job_vectors

logger = logging.getLogger(__name__)

KIND_NAMES = {"bert": "BERT static", "word2vec": "Word2Vec"}
RECALL_QUERIES = 100
RECALL_MAX_VECTORS = 200_000  # exact search for recall reads every document vector: skipped above this


def neighbours(out: Storage, *, n_words: int = 8, n: int = 6) -> Optional[dict[str, Any]]:
    """``{"kinds": [...], "rows": [{"word", "bert": [(w, cos)...], "word2vec": [...]}]}`` for the most
    frequent words found in every set of vectors; None when the output has no word vectors."""
    kvs = {k: load_job_vectors(out.url(), out.storage_options, k) for k in KIND_NAMES
           if out.exists(job_vectors_file(k))}
    if not kvs:
        return None
    first = next(iter(kvs.values()))
    try:
        counts = np.array([first.get_vecattr(w, "count") for w in first.index_to_key], float)
        order = np.argsort(-counts, kind="stable")
    except KeyError:  # no counts: the file's own order (most frequent first for word2vec files)
        order = np.arange(len(first.index_to_key))
    words = []
    for i in order:
        w = first.index_to_key[int(i)]
        if all(w in kv.key_to_index for kv in kvs.values()):
            words.append(w)
        if len(words) >= n_words:
            break
    rows = [{"word": w, **{k: [(x, float(s)) for x, s in kv.most_similar(w, topn=n)] for k, kv in kvs.items()}}
            for w in words]
    return {"kinds": list(kvs), "names": [KIND_NAMES[k] for k in kvs], "rows": rows,
            "sizes": {k: len(kv.index_to_key) for k, kv in kvs.items()}}


def index_view(out: Storage, keys: list[str], queries: Optional[np.ndarray]) -> list[dict[str, Any]]:
    """Each index under ``index/``: its metadata, file size and recall@10 (1.0 for an exact index;
    measured on sampled documents against exact search for the document index)."""
    if not out.exists(INDEX_DIR):
        return []
    rows = []
    for name in sorted(n[: -len(".json")] for n in out.list(INDEX_DIR, suffix=".json")):
        files = index_files(name)
        meta = out.read_json(files["meta"])
        row = {k: meta.get(k) for k in ("kind", "factory", "metric", "count", "dim", "build_seconds")}
        row["name"] = name
        row["bytes"] = int(out.info(files["index"]).get("size") or 0) if out.exists(files["index"]) else None
        row["recall_at_10"], row["recall_note"] = None, ""
        if meta.get("kind") == "flat":
            row["recall_at_10"], row["recall_note"] = 1.0, "exact search"
        elif name == "docs" and queries is not None and len(queries):
            if (meta.get("count") or 0) > RECALL_MAX_VECTORS:
                row["recall_note"] = f"not measured above {RECALL_MAX_VECTORS} vectors: `embedjob bench index`"
            else:
                row["recall_at_10"] = docs_recall(out, keys, queries[:RECALL_QUERIES], meta.get("metric", "ip"))
                row["recall_note"] = f"{min(len(queries), RECALL_QUERIES)} sampled documents as queries"
        rows.append(row)
    return rows


def docs_recall(out: Storage, keys: list[str], q: np.ndarray, metric: str, k: int = 10) -> float:
    """recall@k of the document index for queries ``q`` against exact search over every vector."""
    import pyarrow.compute as pc

    loaded = load_index(out)
    _, labels = loaded.search_vectors(q, k)
    ids = loaded.ids.column("id").to_pylist()
    ann = [{ids[j] for j in row if j >= 0} for row in labels]
    best_s = np.full((len(q), 0), np.nan)
    best_id: np.ndarray = np.empty((len(q), 0), dtype=object)
    q64 = q.astype(np.float64)
    for key in keys:
        t = out.read_parquet(shard_file(VECTORS, key), columns=["id", "vector"])
        t = t.filter(pc.is_valid(t.column("vector")))
        if not t.num_rows:
            continue
        x = to_float32_matrix(t.column("vector")).astype(np.float64)
        s = q64 @ x.T if metric == "ip" else -((q64**2).sum(1)[:, None] - 2 * q64 @ x.T + (x**2).sum(1)[None, :])
        sid = np.array(t.column("id").cast("string").to_pylist(), dtype=object)
        best_s = np.hstack([best_s, s])
        best_id = np.hstack([best_id, np.broadcast_to(sid, s.shape)])
        top = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_id = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_id, top, 1)
    hits = sum(len(a & set(e)) for a, e in zip(ann, best_id))
    return round(hits / max(k * len(q), 1), 4)
