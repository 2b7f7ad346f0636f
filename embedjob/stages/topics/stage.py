"""The topic model stage, ``run_topics``: the filtered dictionary, rho, training, top words, theta
for every document and coherence, then ``<out>/topics/`` written (results only once all of them
succeeded; theta staged under ``topics/_staging/`` first)."""

from __future__ import annotations

import io
import logging
import time
import uuid
from typing import Any, Optional

import numpy as np
import torch

from embedjob.errors import NothingToDo, TopicsError
from embedjob.layout import (
    DICTIONARY_JSON,
    THETA_DIR,
    TOPIC_WORD,
    TOPICS_JSON,
    TOPICS_METRICS,
    TOPICS_MODEL,
    TOPICS_STAGING,
    shard_file,
    shard_key_of,
)
from embedjob.stages.topics.bow import corpus_word_counts, filter_dictionary, vocab_list
from embedjob.stages.topics.config import TopicsConfig, model_kwargs
from embedjob.stages.topics.embeddings import choose_embeddings, resolve_embeddings
from embedjob.stages.topics.metrics import (
    evaluate_topics,
    reference_texts,
    relevance,
    top_words,
)
from embedjob.stages.topics.model import model_bytes
from embedjob.stages.topics.quality import redundancy_report
from embedjob.stages.topics.theta import check_label_column, theta_pass
from embedjob.stages.topics.train import train_topic_model
from embedjob.stages.vocab import build_vocabulary, read_dictionary
from embedjob.storage import Storage, StorageError

logger = logging.getLogger(__name__)


def load_job_dictionary(out, token_urls: list[str]):
    """The job's dictionary, ``<out>/vocab/dictionary.json`` (:func:`embedjob.stages.vocab.read_dictionary`;
    never the pickled ``dictionary.gensim``), or, when there is none (an output written before it
    existed, or no vocab stage), built from the token shards."""
    if out.exists(DICTIONARY_JSON):
        try:
            return read_dictionary(out)
        except StorageError as e:
            raise TopicsError(str(e)) from None
    logger.info("topics: no %s; counting the vocabulary from the token shards", out.url(DICTIONARY_JSON))
    return build_vocabulary(token_urls, out.storage_options)


def run_topics(tc: TopicsConfig, out: Storage, token_urls: list[str], *,
               input_urls: Optional[dict[str, Optional[str]]] = None, id_column: str = "id",
               input_storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train the topic model on the job's token shards and write ``<out>/topics/``; returns stats.

    ``input_urls`` (token shard key -> input file, read with ``input_storage_options``; ``id_column``
    names the documents there) is where ``topics.label_column`` is read from.
    Results are written only after training, theta and metrics all succeeded; theta files are
    staged under ``topics/_staging/`` first.
    """
    input_storage_options = input_storage_options or {}
    if not token_urls:
        raise TopicsError("topics: no token shard to train on")
    t0 = time.time()
    if tc.label_column:
        check_label_column(tc.label_column, token_urls, input_urls, input_storage_options)
    full = load_job_dictionary(out, token_urls)
    if full.num_pos == 0:
        raise NothingToDo(f"nothing to train on: the {len(token_urls)} token shard(s) hold no token "
                          "(every text empty or null, or every word dropped by preprocessing)")
    tc = tc.model_copy(update={"embeddings": choose_embeddings(tc, out, int(full.num_pos))})
    dictionary = filter_dictionary(full, tc)
    vocab = vocab_list(dictionary)
    logger.info("topics: %s, K=%d, vocabulary %d words after filter_extremes", tc.model, tc.num_topics, len(vocab))
    rho, missing, emb_stats = resolve_embeddings(tc, out, vocab)
    word_counts = corpus_word_counts(dictionary)
    model, train_stats = train_topic_model(tc, out, token_urls, vocab, rho, missing, word_counts)
    kwargs = model_kwargs(tc, len(vocab), rho.shape[1] if rho is not None else tc.embedding_dim, int(missing.sum()))
    with torch.no_grad():
        log_tw = model.log_topic_word().double().numpy()
    tw = np.exp(log_tw)
    topics = top_words(relevance(log_tw, word_counts, tc.ranking_lambda), vocab,
                       max(tc.topics_json_top_n, tc.diversity_top_n, tc.top_n))
    blob = model_bytes(model, kwargs, vocab, tc)

    staging = f"{TOPICS_STAGING}/{uuid.uuid4().hex[:12]}"
    try:
        t = time.time()
        theta_stats = theta_pass(blob, vocab, out, token_urls, staging, actors=train_stats["workers"],
                                 threads=train_stats["threads_per_worker"], label_column=tc.label_column,
                                 id_column=id_column, input_urls=input_urls,
                                 input_storage_options=input_storage_options)
        argmax, labels = theta_stats.pop("_argmax"), theta_stats.pop("_labels")
        theta_stats["theta_seconds"] = round(time.time() - t, 3)
        texts = reference_texts(token_urls, out.storage_options, tc.coherence_docs, tc.seed)
        metrics = evaluate_topics(topics, texts, dictionary, tc)
        metrics.update(redundancy_report(topics, argmax, top_n=tc.top_n, labels=labels))
        if labels is not None:
            metrics["labels"]["column"] = tc.label_column
        metrics.update({"model": tc.model, "training": train_stats, "vocabulary": len(vocab), **emb_stats})
        # commit: theta, matrices, topics, model, metrics last
        _commit_theta(out, staging, [shard_key_of(u) for u in token_urls])
    finally:
        out.delete(staging, recursive=True)
    _write_results(out, tc, vocab, tw, topics, blob, metrics)
    stats = {"model": tc.model, "num_topics": tc.num_topics, "vocabulary": len(vocab), **train_stats, **theta_stats,
             "npmi": metrics.get("npmi"), "c_v": metrics.get("c_v"), "diversity": metrics["diversity"],
             "coherence_seconds": metrics["seconds"], "total_seconds": round(time.time() - t0, 3), **emb_stats,
             "duplicate_topics": metrics["redundancy"]["duplicate_topics"],
             "effective_topics": metrics["redundancy"].get("effective_topics"),
             "label_nmi": metrics.get("labels", {}).get("nmi"), "label_ari": metrics.get("labels", {}).get("ari")}
    if "warning" in metrics:
        stats["warning"] = metrics["warning"]
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    logger.info("topics: NPMI %s, C_V %s, diversity %.3f, %d duplicate topics, effective topics %s%s", f(stats["npmi"]),
                f(stats["c_v"]), stats["diversity"], stats["duplicate_topics"], f(stats["effective_topics"]),
                "" if stats["label_nmi"] is None else f", label NMI {f(stats['label_nmi'])} ARI {f(stats['label_ari'])}")
    return stats


def _commit_theta(out: Storage, staging: str, keys: list[str]) -> None:
    """Staged theta files to ``topics/theta/``; theta of shards no longer in the job is deleted."""
    for k in keys:
        out.write_bytes(shard_file(THETA_DIR, k), out.read_bytes(shard_file(staging, k)))
    for name in out.list(THETA_DIR, suffix=".parquet"):
        if name[: -len(".parquet")] not in set(keys):
            out.delete(f"{THETA_DIR}/{name}")


def _write_results(out: Storage, tc: TopicsConfig, vocab: list[str], tw: np.ndarray, topics: list[list[str]],
                   blob: bytes, metrics: dict[str, Any]) -> None:
    """``topic_word.npy``, ``topics.json``, ``model.pt``, then ``metrics.json``, in that order."""
    buf = io.BytesIO()
    np.save(buf, tw.astype(np.float32))
    out.write_bytes(TOPIC_WORD, buf.getvalue())
    npmi = metrics["coherence"].get("c_npmi", {}).get("per_topic", [])
    cv = metrics["coherence"].get("c_v", {}).get("per_topic", [])
    word_index = {w: i for i, w in enumerate(vocab)}
    out.write_json(TOPICS_JSON, {
        "model": tc.model, "num_topics": tc.num_topics, "vocabulary": len(vocab),
        "topics": [{"topic": i, "words": words[: tc.topics_json_top_n],
                    "weights": [round(float(tw[i, word_index[w]]), 6) for w in words[: tc.topics_json_top_n]],
                    **({"npmi": npmi[i]} if i < len(npmi) else {}), **({"c_v": cv[i]} if i < len(cv) else {})}
                   for i, words in enumerate(topics)],
    })
    out.write_bytes(TOPICS_MODEL, blob)
    out.write_json(TOPICS_METRICS, metrics)
