"""How topics are read and scored: LDAvis relevance ranking, top words, topic diversity and gensim
coherence (NPMI, C_V) against a seeded sample of the job's own tokens."""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.stages.topics.config import TopicsConfig
from embedjob.storage import Storage


def relevance(log_topic_word: np.ndarray, word_counts: Optional[np.ndarray], lam: float) -> np.ndarray:
    """LDAvis relevance (Sievert & Shirley 2014) of every (topic, word):
    ``lam * log p(w|k) + (1 - lam) * log(p(w|k) / p(w))`` with ``p(w)`` the corpus frequency (+1
    smoothed); ``lam = 1`` (or no counts) ranks by probability."""
    if word_counts is None or lam >= 1.0:
        return np.asarray(log_topic_word)
    freq = np.asarray(word_counts, np.float64) + 1.0
    log_p = np.log(freq / freq.sum())
    return np.asarray(log_topic_word, np.float64) - (1.0 - lam) * log_p[None, :]


def top_words(topic_word: np.ndarray, vocab: list[str], n: int) -> list[list[str]]:
    order = np.argsort(-topic_word, axis=1)[:, :n]
    return [[vocab[j] for j in row] for row in order]


def topic_diversity(topics: list[list[str]], n: int = 25) -> float:
    """Unique words among the top ``n`` of all topics / (n * K) (Dieng et al. 2020)."""
    words = [w for t in topics for w in t[:n]]
    return len(set(words)) / float(n * len(topics)) if topics else 0.0


def reference_texts(token_urls: list[str], storage_options: dict[str, Any], limit: Optional[int],
                    seed: int) -> list[list[str]]:
    """The coherence reference: the job's token lists, a seeded sample of at most ``limit`` spread
    over the shards in proportion to their sizes."""
    sizes = []
    for u in token_urls:
        s = Storage(u, storage_options)
        with s.open("", "rb") as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    texts: list[list[str]] = []
    for u, n in zip(token_urls, sizes):
        if n == 0:
            continue
        tokens = Storage(u, storage_options).read_parquet("", columns=["tokens"]).column("tokens")
        if limit is not None and total > limit:
            take = int(round(limit * n / total))
            idx = np.sort(rng.choice(n, size=min(take, n), replace=False))
            tokens = tokens.take(pa.array(idx))
        texts.extend(t for t in tokens.to_pylist() if t)
    return texts


def coherence_scores(topics: list[list[str]], texts: list[list[str]], dictionary, *, measures: Sequence[str],
                     topn: int, processes: int = 1) -> dict[str, Any]:
    """gensim CoherenceModel scores: ``{measure: {"mean": m, "per_topic": [...]}}``."""
    from gensim.models.coherencemodel import CoherenceModel

    out: dict[str, Any] = {}
    for m in measures:
        cm = CoherenceModel(topics=[t[:topn] for t in topics], texts=texts, dictionary=dictionary, coherence=m,
                            topn=topn, processes=processes)
        per = [float(x) for x in cm.get_coherence_per_topic()]
        # A top word absent from the reference texts makes gensim divide by a zero probability (inf):
        # such a topic's score is undefined; it is left out of the mean and counted.
        finite = [x for x in per if math.isfinite(x)]
        out[m] = {"mean": float(np.mean(finite)) if finite else float("nan"),
                  "per_topic": [x if math.isfinite(x) else None for x in per],
                  "undefined_topics": len(per) - len(finite), "window_size": cm.window_size}
    return out


def evaluate_topics(topics: list[list[str]], texts: list[list[str]], dictionary, cfg: TopicsConfig) -> dict[str, Any]:
    """metrics.json body: NPMI / C_V (gensim, top ``top_n`` words) and topic diversity, with the
    settings they were computed with."""
    t = time.time()
    scores = coherence_scores(topics, texts, dictionary, measures=cfg.coherence, topn=cfg.top_n,
                              processes=cfg.coherence_processes)
    out: dict[str, Any] = {
        "num_topics": len(topics),
        "diversity": topic_diversity(topics, cfg.diversity_top_n),
        "coherence": scores,
        "settings": {
            "coherence": "gensim.models.coherencemodel.CoherenceModel",
            "topn": cfg.top_n,
            "window_size": {m: s["window_size"] for m, s in scores.items()},
            "reference": "job tokens (tokens/*.parquet)",
            "reference_docs": len(texts),
            "reference_docs_cap": cfg.coherence_docs,
            "reference_seed": cfg.seed,
            "dictionary_words": len(dictionary),
            "diversity_top_n": cfg.diversity_top_n,
            "ranking": f"LDAvis relevance, lambda={cfg.ranking_lambda}",
        },
        "seconds": round(time.time() - t, 3),
    }
    if "c_npmi" in scores:
        out["npmi"] = scores["c_npmi"]["mean"]
    if "c_v" in scores:
        out["c_v"] = scores["c_v"]["mean"]
    return out
