"""The gensim model every worker builds: the same vocabulary and initial weights everywhere, the
matrices that training changes (what workers share and sync), and the start from ``init_from``.

Plain functions on a gensim Word2Vec / FastText, testable without Ray.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from embedjob.errors import ConfigError, WordVectorsError
from embedjob.stages.word2vec.config import Word2VecConfig
from embedjob.wordvectors import read_keyed_vectors

logger = logging.getLogger(__name__)


def word_frequencies(dictionary, min_count: int = 1) -> dict[str, int]:
    """Corpus-wide word counts of a :func:`~embedjob.stages.vocab.build_vocabulary` Dictionary, in its
    deterministic id order (most frequent first, ties by word), words below ``min_count`` dropped
    (they can never enter gensim's vocabulary, so they need not travel to the workers)."""
    id2token = {i: w for w, i in dictionary.token2id.items()}
    return {id2token[i]: int(c) for i, c in sorted(dictionary.cfs.items()) if c >= min_count}


def new_model(cfg: Word2VecConfig, word_freq: dict[str, int], corpus_count: int, *, threads: int = 1):
    """A gensim Word2Vec / FastText with the vocabulary built from ``word_freq`` by gensim's rules and
    weights initialised from ``cfg.seed`` — identical wherever it is built with the same inputs."""
    from gensim.models import FastText, Word2Vec

    common = dict(
        vector_size=cfg.vector_size, window=cfg.window, min_count=cfg.min_count,
        max_final_vocab=cfg.max_final_vocab, sg=cfg.sg, hs=cfg.hs, negative=cfg.negative,
        ns_exponent=cfg.ns_exponent, cbow_mean=cfg.cbow_mean, sample=cfg.sample, alpha=cfg.alpha,
        min_alpha=cfg.min_alpha, epochs=cfg.epochs, seed=cfg.seed, workers=threads,
    )
    if cfg.model == "fasttext":
        model = FastText(min_n=cfg.min_n, max_n=cfg.max_n, bucket=cfg.bucket, **common)
    else:
        model = Word2Vec(**common)
    if not word_freq:
        raise ValueError(
            f"no word occurs at least word2vec.min_count={cfg.min_count} times in the token shards; "
            "lower word2vec.min_count or give more text"
        )
    model.build_vocab_from_freq(dict(word_freq), corpus_count=corpus_count)
    return model


def trainable_slots(model) -> list[tuple[Any, str]]:
    """``(owner, attribute)`` of each matrix that training changes, i.e. what the workers share or
    average: ``wv.vectors`` (Word2Vec) or ``wv.vectors_vocab`` + ``wv.vectors_ngrams`` (FastText),
    then ``syn1`` and/or ``syn1neg``."""
    from gensim.models import FastText

    slots: list[tuple[Any, str]] = []
    if isinstance(model, FastText):
        slots.append((model.wv, "vectors_vocab"))
        if model.wv.bucket:
            slots.append((model.wv, "vectors_ngrams"))
    else:
        slots.append((model.wv, "vectors"))
    if model.hs:
        slots.append((model, "syn1"))
    if model.negative:
        slots.append((model, "syn1neg"))
    return slots


def trainable_arrays(model) -> list[np.ndarray]:
    """The matrices that training changes (see :func:`trainable_slots`)."""
    return [getattr(owner, name) for owner, name in trainable_slots(model)]


def touched_rows(model, docs: list[list[str]]) -> list[Optional[np.ndarray]]:
    """For each of :func:`trainable_arrays`, the rows that training on ``docs`` can change, or None
    where any row can (the output layers: negative samples are drawn from the whole vocabulary).

    Word rows: the vocabulary words in ``docs``; FastText n-gram rows: those words' n-gram buckets.
    Rows outside these keep their synced values, so a sync only needs to exchange these rows."""
    from gensim.models import FastText

    index = model.wv.key_to_index
    present = np.fromiter({index[t] for d in docs for t in d if t in index}, dtype=np.int64)
    present.sort()
    rows: list[Optional[np.ndarray]] = [present]
    if isinstance(model, FastText) and model.wv.bucket:
        buckets = model.wv.buckets_word
        grams = [buckets[i] for i in present]
        rows.append(np.unique(np.concatenate(grams)).astype(np.int64) if grams else np.zeros(0, np.int64))
    if model.hs:
        rows.append(None)
    if model.negative:
        rows.append(None)
    return rows


def word_rows(model) -> np.ndarray:
    """The per-word input matrix (what init_from fills and init_lock freezes)."""
    from gensim.models import FastText

    return model.wv.vectors_vocab if isinstance(model, FastText) else model.wv.vectors


def apply_init(model, words: list[str], vectors: np.ndarray, lock: str) -> np.ndarray:
    """Copy ``vectors`` into the rows of ``words`` that are in the model's vocabulary; with
    ``lock='frozen'`` those rows get lock factor 0 (gensim leaves them unchanged). Returns the
    indices of the rows set."""
    from gensim.models import FastText

    index = model.wv.key_to_index
    pairs = [(index[w], j) for j, w in enumerate(words) if w in index]
    rows = np.array([p[0] for p in pairs], dtype=np.int64)
    if len(rows):
        word_rows(model)[rows] = vectors[[p[1] for p in pairs]]
    if isinstance(model, FastText):
        model.wv.adjust_vectors()
    if lock == "frozen" and len(rows):
        lockf = np.ones(len(index), dtype=np.float32)
        lockf[rows] = 0.0
        if isinstance(model, FastText):
            model.wv.vectors_vocab_lockf = lockf
        else:
            model.wv.vectors_lockf = lockf
    return rows


def global_alpha(cfg: Word2VecConfig, progress: float) -> float:
    """Learning rate after ``progress`` (0..1) of the whole training, gensim's linear decay."""
    return cfg.alpha - (cfg.alpha - cfg.min_alpha) * min(max(progress, 0.0), 1.0)


def load_init(cfg: Word2VecConfig, storage_options: dict[str, Any], word_freq: dict[str, int]):
    """``(words, vectors)`` of ``cfg.init_from`` restricted to the candidate vocabulary; an unreadable
    file, a pickle (unless ``init_trust_pickle``) or a dimension mismatch is a ``ConfigError``."""
    try:
        kv = read_keyed_vectors(cfg.init_from, cfg.init_storage_options or storage_options,
                                setting="word2vec.init_from", trust_pickle=cfg.init_trust_pickle,
                                trust_setting="word2vec.init_trust_pickle")
    except WordVectorsError as e:
        raise ConfigError(str(e)) from None
    if kv.vector_size != cfg.vector_size:
        raise ConfigError(
            f"word2vec.init_from={cfg.init_from!r} has {kv.vector_size}-dimensional vectors but "
            f"word2vec.vector_size is {cfg.vector_size}; they must match"
        )
    words = [w for w in kv.index_to_key if w in word_freq]
    vectors = np.stack([kv[w] for w in words]).astype(np.float32) if words else np.zeros((0, cfg.vector_size), np.float32)
    logger.info("word2vec: %d of %d words of %s are in the vocabulary", len(words), len(kv), cfg.init_from)
    return words, vectors

