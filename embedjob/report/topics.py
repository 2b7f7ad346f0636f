"""The topics section's numbers, from ``topics/``: each topic's top words, size and coherence; the
LDAvis intertopic distance map (Jensen-Shannon distances between topic-word distributions, scaled
to 2-D by classical MDS, as pyLDAvis does by default) and each topic's relevance bars (the topic's
estimated count of a word beside its corpus count, words ranked by relevance at the job's lambda)."""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np

from embedjob.layout import DICTIONARY_JSON, TOPIC_WORD, TOPICS_MODEL
from embedjob.stages.topics.metrics import relevance
from embedjob.stages.topics.read_back import read_topics
from embedjob.storage import Storage

BAR_WORDS = 12  # words in each topic's relevance bars


def _vocab(out: Storage) -> Optional[list[str]]:
    """The topic model's vocabulary (column order of ``topic_word.npy``), from ``model.pt`` as the
    topics stage reads it."""
    from embedjob.stages.topics.model import load_topic_model  # torch

    if not out.exists(TOPICS_MODEL):
        return None
    return load_topic_model(out.url(), out.storage_options).vocab or None


def _corpus_counts(out: Storage, vocab: list[str]) -> Optional[np.ndarray]:
    """Each word's count in the corpus, from the job's dictionary (the vocab stage's reader)."""
    from embedjob.stages.vocab import read_dictionary  # gensim

    if not out.exists(DICTIONARY_JSON):
        return None
    d = read_dictionary(out)
    return np.array([float(d.cfs.get(d.token2id.get(w, -1), 0)) for w in vocab])


def jsd_matrix(p: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (nats) between every pair of rows of ``p`` (distributions)."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, None)
    p = p / p.sum(axis=1, keepdims=True)
    k = len(p)
    out = np.zeros((k, k))
    logp = np.log(p)
    for i in range(k):
        m = 0.5 * (p[i][None, :] + p)
        logm = np.log(m)
        out[i] = 0.5 * (p[i] * (logp[i] - logm)).sum(axis=1) + 0.5 * (p * (logp - logm)).sum(axis=1)
    return np.maximum(out, 0.0)


def pcoa(d: np.ndarray) -> np.ndarray:
    """Classical MDS of a distance matrix to 2-D (pyLDAvis' ``js_PCoA``)."""
    n = len(d)
    if n < 2:
        return np.zeros((n, 2))
    j = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * j @ (d**2) @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:2]
    xy = vecs[:, order] * np.sqrt(np.maximum(vals[order], 0.0))
    return xy if xy.shape[1] == 2 else np.hstack([xy, np.zeros((n, 2 - xy.shape[1]))])


def topic_view(out: Storage, theta: Optional[np.ndarray], lam: float = 0.5) -> Optional[dict[str, Any]]:
    """Everything the topics section draws, or None when the output has no topics."""
    found = read_topics(out)
    if found is None:
        return None
    doc, metrics = found[0], found[1] or {}
    topics = doc.get("topics") or []
    k = len(topics)
    view: dict[str, Any] = {"model": doc.get("model"), "num_topics": k, "vocabulary": doc.get("vocabulary"),
                            "metrics": metrics, "topics": topics}
    if theta is not None and len(theta) and theta.shape[1] == k:
        ok = ~np.isnan(theta).any(axis=1)
        view["prevalence"] = (theta[ok].mean(axis=0) if ok.any() else np.full(k, 1.0 / max(k, 1))).tolist()
        dominant = theta[ok].argmax(axis=1) if ok.any() else np.zeros(0, int)
        view["dominant_share"] = (np.bincount(dominant, minlength=k) / max(len(dominant), 1)).tolist()
        view["sample_docs"] = int(ok.sum())
    else:
        view["prevalence"] = [1.0 / max(k, 1)] * k
    vocab = _vocab(out) if out.exists(TOPIC_WORD) else None
    if vocab is None or not k:
        return view
    tw = np.load(io.BytesIO(out.read_bytes(TOPIC_WORD)), allow_pickle=False).astype(np.float64)
    if tw.shape != (k, len(vocab)):
        return view
    view["xy"] = pcoa(np.sqrt(jsd_matrix(tw))).tolist() if k > 1 else [[0.0, 0.0]]
    counts = _corpus_counts(out, vocab)
    rel = relevance(np.log(np.clip(tw, 1e-30, None)), counts, lam)
    total = float(counts.sum()) if counts is not None else 1.0
    bars = []
    for i in range(k):
        top = np.argsort(-rel[i])[:BAR_WORDS]
        est = tw[i, top] * view["prevalence"][i] * total  # the topic's estimated count of each word
        bars.append([{"word": vocab[j], "topic": float(e), "corpus": float(counts[j]) if counts is not None else None}
                     for j, e in zip(top, est)])
    view["bars"] = bars
    view["lambda"] = lam
    return view
