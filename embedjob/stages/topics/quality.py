"""What coherence and diversity do not show: redundant topics (pairs whose top words overlap
heavily), how many topics the documents actually use (argmax theta), and, when the input has a
label column, how well argmax theta recovers the labels (NMI, ARI). Plain numpy, no Ray."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Two topics whose top-10 words share at least this fraction are counted as one topic said twice.
OVERLAP_THRESHOLD = 0.5


def overlapping_pairs(topics: Sequence[Sequence[str]], top_n: int = 10,
                      threshold: float = OVERLAP_THRESHOLD) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, overlap)`` of topics (``i < j``) whose top ``top_n`` words share at least
    ``threshold`` of their words (overlap = ``|A & B| / top_n``).

    >>> overlapping_pairs([["a", "b"], ["b", "a"], ["c", "d"]], top_n=2)
    [(0, 1, 1.0)]
    """
    sets = [set(t[:top_n]) for t in topics]
    out = []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            ov = len(sets[i] & sets[j]) / float(top_n)
            if ov >= threshold:
                out.append((i, j, round(ov, 3)))
    return out


def duplicate_topics(pairs: Sequence[tuple[int, int, float]], num_topics: int) -> int:
    """Topics that repeat another one: K minus the number of groups that overlapping pairs join
    (5 topics each said 4 times -> 15)."""
    parent = list(range(num_topics))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    return num_topics - len({find(i) for i in range(num_topics)})


def topic_usage(argmax: np.ndarray, num_topics: int) -> dict[str, Any]:
    """How the documents spread over the topics by argmax theta: topics used at all, and the
    effective number ``exp(entropy)`` of the argmax shares (K when every topic takes an equal share)."""
    argmax = np.asarray(argmax, np.int64)
    counts = np.bincount(argmax, minlength=num_topics).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return {"topics_used": 0, "effective_topics": 0.0, "largest_topic_share": 0.0}
    p = counts[counts > 0] / total
    return {"topics_used": int((counts > 0).sum()), "effective_topics": round(float(math.exp(-(p * np.log(p)).sum())), 3),
            "largest_topic_share": round(float(counts.max() / total), 4)}


def _contingency(a: Sequence[Any], b: Sequence[Any]) -> np.ndarray:
    _, ai = np.unique(np.asarray(a, dtype=object).astype(str), return_inverse=True)
    _, bi = np.unique(np.asarray(b, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), np.float64)
    np.add.at(table, (ai, bi), 1.0)
    return table


def label_agreement(labels: Sequence[Any], clusters: Sequence[Any]) -> dict[str, float]:
    """NMI (arithmetic mean normalisation, as scikit-learn's default) and adjusted Rand index of
    a clustering (argmax theta) against labels.

    >>> label_agreement(["a", "a", "b", "b"], [1, 1, 0, 0])
    {'nmi': 1.0, 'ari': 1.0}
    """
    if len(labels) != len(clusters):
        raise ValueError(f"{len(labels)} labels for {len(clusters)} documents")
    if len(labels) == 0:
        return {"nmi": float("nan"), "ari": float("nan")}
    c = _contingency(labels, clusters)
    n = c.sum()
    pa_, pb = c.sum(1) / n, c.sum(0) / n
    nz = c > 0
    pij = c[nz] / n
    mi = float((pij * np.log(pij / np.outer(pa_, pb)[nz])).sum())
    ha = float(-(pa_[pa_ > 0] * np.log(pa_[pa_ > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    nmi = 1.0 if ha == 0 and hb == 0 else (mi / ((ha + hb) / 2) if ha + hb > 0 else 0.0)
    comb = lambda x: x * (x - 1) / 2.0  # noqa: E731
    sum_ij, sum_a, sum_b, total = comb(c).sum(), comb(c.sum(1)).sum(), comb(c.sum(0)).sum(), comb(n)
    expected = sum_a * sum_b / total if total else 0.0
    denom = (sum_a + sum_b) / 2.0 - expected
    ari = 1.0 if denom == 0 else (sum_ij - expected) / denom
    return {"nmi": round(float(max(0.0, nmi)), 4), "ari": round(float(ari), 4)}


def redundancy_report(topics: Sequence[Sequence[str]], argmax: Optional[np.ndarray], *, top_n: int = 10,
                      labels: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """The ``redundancy`` (and ``labels``) part of ``metrics.json``, with a ``warning`` when topics
    repeat each other or the documents use few of them; the warning is also logged."""
    k = len(topics)
    pairs = overlapping_pairs(topics, top_n)
    red: dict[str, Any] = {"overlap_top_n": top_n, "overlap_threshold": OVERLAP_THRESHOLD,
                           "overlapping_pairs": [list(p) for p in pairs],
                           "duplicate_topics": duplicate_topics(pairs, k)}
    if argmax is not None:
        red.update(topic_usage(argmax, k))
    problems = []
    if red["duplicate_topics"]:
        problems.append(f"{red['duplicate_topics']} of {k} topics repeat another topic's top words "
                        f"({len(pairs)} pairs share >= {OVERLAP_THRESHOLD:.0%} of their top {top_n})")
    if argmax is not None and red["effective_topics"] < 0.5 * k:
        problems.append(f"documents use {red['topics_used']} of {k} topics by argmax theta "
                        f"(effective number {red['effective_topics']:.1f})")
    out: dict[str, Any] = {"redundancy": red}
    if problems:
        out["warning"] = "topics are redundant: " + "; ".join(problems) + \
            " (fewer topics, topics.min_steps or other embeddings may help)"
        logger.warning("topics: %s", out["warning"])
    if labels is not None and argmax is not None:
        known = [i for i, lab in enumerate(labels) if lab is not None]
        agree = label_agreement([labels[i] for i in known], np.asarray(argmax)[known])
        out["labels"] = {"documents": len(known), "classes": len({labels[i] for i in known}), **agree}
    return out
