"""The ETM's word embeddings rho: rows of the vocabulary's words from the job's (or a given)
word vectors, with random rows for the missing words."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from embedjob.errors import TopicsError
from embedjob.stages.topics.config import AUTO_WORD2VEC_MIN_TOKENS, TopicsConfig
from embedjob.wordvectors import (
    VECTOR_FOLDERS,
    WordVectorsError,
    job_vectors_file,
    load_job_vectors,
    read_keyed_vectors,
)

logger = logging.getLogger(__name__)

def embedding_matrix(kv, vocab: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rho (V, E) float32, missing mask (V,))``: rows of vocabulary words from ``kv``; missing
    words get N(mean, std) rows with the known rows' per-dimension mean and spread (the model learns
    them further)."""
    dim = kv.vector_size
    rho = np.zeros((len(vocab), dim), np.float32)
    missing = np.ones(len(vocab), bool)
    for i, w in enumerate(vocab):
        idx = kv.key_to_index.get(w)
        if idx is not None:
            rho[i] = kv.vectors[idx]
            missing[i] = False
    known = rho[~missing]
    if len(known) == 0:
        raise TopicsError("topics.embeddings: none of the vocabulary's words is in the given vectors "
                          "(were they trained on other tokens?)")
    rng = np.random.default_rng(seed)
    mean, std = known.mean(0), known.std(0) + 1e-6
    rho[missing] = (mean + rng.standard_normal((int(missing.sum()), dim)) * std).astype(np.float32)
    return rho, missing


def choose_embeddings(cfg: TopicsConfig, out, corpus_tokens: Optional[int] = None) -> str:
    """``topics.embeddings`` with 'auto' resolved: the job's word2vec vectors when the corpus has at
    least ``AUTO_WORD2VEC_MIN_TOKENS`` tokens (or its size is unknown), else the job's BERT static
    vectors, else 'learned' (a small corpus's Word2Vec is worse than none: README, Benchmarks)."""
    if cfg.embeddings != "auto" or cfg.model != "etm":
        return cfg.embeddings
    have = {name: out.exists(job_vectors_file(name)) for name in ("word2vec", "bert")}
    big = corpus_tokens is None or corpus_tokens >= AUTO_WORD2VEC_MIN_TOKENS
    if have["word2vec"] and big:
        choice, why = "word2vec", "the job's Word2Vec"
    elif have["bert"]:
        choice, why = "bert", "BERT static vectors" + ("" if big else f" ({corpus_tokens:,} tokens: too few for Word2Vec)")
    else:
        choice, why = "learned", "learned with the model (" + (
            f"{corpus_tokens:,} tokens are too few for Word2Vec and the job wrote no BERT static vectors)"
            if have["word2vec"] else "the job wrote no word vectors)")
    logger.info("topics: embeddings=auto: %s", why)
    return choice


def resolve_embeddings(cfg: TopicsConfig, out, vocab: list[str]) -> tuple[Optional[np.ndarray], np.ndarray, dict]:
    """rho for the ETM per ``topics.embeddings`` ('auto' resolved by :func:`choose_embeddings`)
    plus stats for the record."""
    if cfg.embeddings == "auto":
        cfg = cfg.model_copy(update={"embeddings": choose_embeddings(cfg, out)})
    if cfg.model != "etm" or cfg.embeddings == "learned":
        return None, np.zeros(len(vocab), bool), {"embeddings": "learned" if cfg.model == "etm" else None}
    try:
        if cfg.embeddings in VECTOR_FOLDERS:
            rel = job_vectors_file(cfg.embeddings)
            if not out.exists(rel):
                stage = VECTOR_FOLDERS[cfg.embeddings]
                raise TopicsError(
                    f"topics.embeddings={cfg.embeddings!r} needs {out.url(rel)!r}, which does not exist: enable the "
                    f"{stage} stage ({stage}.enabled=true), or set topics.embeddings to 'learned' or a vector file URL"
                )
            url = out.url(rel)
            kv = load_job_vectors(out.url(), out.storage_options, cfg.embeddings)
        else:
            url = cfg.embeddings
            kv = read_keyed_vectors(url, out.storage_options, setting="topics.embeddings",
                                    trust_pickle=cfg.embeddings_trust_pickle,
                                    trust_setting="topics.embeddings_trust_pickle")
    except WordVectorsError as e:
        raise TopicsError(str(e)) from None
    if len(kv) == 0:  # e.g. the static stage kept no word (none reached static.min_count)
        raise TopicsError(f"topics.embeddings={cfg.embeddings!r}: {url!r} holds no word vectors (see the stats of the "
                          "stage that wrote it); set topics.embeddings to 'learned' or to another vector file")
    rho, missing = embedding_matrix(kv, vocab, cfg.seed)
    logger.info("topics: rho from %s: %d words, dim %d, %d vocabulary words missing (learned)",
                url, len(vocab), rho.shape[1], int(missing.sum()))
    return rho, missing, {"embeddings": url, "embedding_dim": int(rho.shape[1]), "missing_words": int(missing.sum())}
