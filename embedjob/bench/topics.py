"""`embedjob bench topics`: embedjob's topic model (ETM by default) beside gensim ``LdaMulticore``
with the same K on the same dictionary, measured in one run: NPMI and C_V coherence (gensim
``CoherenceModel``, top 10 words, the same reference sample of the corpus's tokens), topic
diversity (top 25) and training wall time. ``--suite`` runs :mod:`embedjob.bench.topics_suite` instead
(several corpora with labels, label NMI/ARI and duplicate topics).

Steps, on the first ``--limit`` documents of ``--corpus``:

1. tokens: the job's preprocessing (``embedjob.stages.preprocess.preprocess_texts`` with the default
   ``PreprocessConfig`` = gensim ``preprocess_string`` default filters), one Ray task per shard,
   written as the job's ``tokens/<shard>.parquet``; the corpus-wide Dictionary (``build_vocabulary``)
   as the job's ``vocab/dictionary.json`` (``write_dictionary``);
2. rho (``--embeddings word2vec``): a gensim ``Word2Vec`` trained on the same tokens stands in for
   the job's word2vec stage (its time is reported apart, ``w2v_seconds``); ``learned`` trains rho
   with the model; any other value is a vector file URL;
3. ``run_topics`` (Ray Train, ``--cpus`` CPUs split as workers x threads) for each K; then
   ``LdaMulticore`` (``workers = cpus - 1``, i.e. ``cpus`` processes with its master, ``--lda-passes``)
   on the same filtered dictionary. ``etm_seconds`` = BoW build + training (the TorchTrainer fit);
   ``lda_seconds`` = doc2bow + LdaMulticore fit. Theta and coherence are not timed for either.
   LDA is scored twice: with its ``show_topic`` words (by probability, gensim's usual view) and
   with its words chosen by the same relevance ranking as embedjob's (``topics.ranking_lambda``).

    embedjob bench topics --k 20 --limit 20000 --json
    embedjob bench topics --k 20 50 --workdir /tmp/bench-topics --set topics.epochs=30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from embedjob.bench.corpus import DEFAULT_CORPUS, tokenize_shard
from embedjob.config import apply_override
from embedjob.layout import DICTIONARY_JSON
from embedjob.stages.topics import TopicsConfig
from embedjob.stages.topics.bow import corpus_word_counts, filter_dictionary, vocab_list
from embedjob.stages.topics.metrics import evaluate_topics, reference_texts, relevance, top_words
from embedjob.stages.vocab import build_vocabulary, read_dictionary, write_dictionary
from embedjob.stages.word2vec import Word2VecConfig
from embedjob.storage import Storage, list_shards, shard_key
from embedjob.wordvectors import job_vectors_file, write_keyed_vectors


def prepare_tokens(corpus: str, workdir: str, limit: Optional[int]) -> list[str]:
    """Token shards of the corpus in ``workdir/tokens`` (reused when made with the same corpus/limit)."""
    import pyarrow.parquet as pq
    import ray

    marker = os.path.join(workdir, "tokens", "_bench.json")
    want = {"corpus": corpus, "limit": limit}
    if os.path.exists(marker) and json.load(open(marker)) == {**want, "urls": json.load(open(marker)).get("urls")}:
        return json.load(open(marker))["urls"]
    os.makedirs(os.path.join(workdir, "tokens"), exist_ok=True)
    jobs, left = [], limit
    for url in list_shards(corpus):
        if left is not None and left <= 0:
            break
        with Storage(url).open("", "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        take = n if left is None else min(n, left)
        jobs.append((url, os.path.join(workdir, "tokens", shard_key(url, corpus) + ".parquet"), take))
        if left is not None:
            left -= take
    task = ray.remote(num_cpus=1)(tokenize_shard)
    ray.get([task.remote(u, d, limit=t) for u, d, t in jobs])
    urls = [d for _, d, _ in jobs]
    json.dump({**want, "urls": urls}, open(marker, "w"))
    return urls


def read_tokens(urls: list[str]) -> list[list[str]]:
    import pyarrow.parquet as pq

    out: list[list[str]] = []
    for u in urls:
        out.extend(pq.read_table(u, columns=["tokens"]).column("tokens").to_pylist())
    return out


def train_word2vec(docs: list[list[str]], folder: str, *, cpus: int, dim: int, epochs: int, min_count: int) -> float:
    """Train gensim Word2Vec on ``docs`` and write its vectors to ``folder`` as the job's word2vec
    stage does (``vectors.bin`` and companions); returns the training seconds."""
    from gensim.models import Word2Vec

    t = time.time()
    w2v = Word2Vec(sentences=[d for d in docs if d], vector_size=dim, window=5, min_count=min_count, sg=0,
                   workers=cpus, epochs=epochs, seed=0)
    seconds = time.time() - t
    write_keyed_vectors(w2v.wv, Storage(folder))
    return seconds


def run_lda(docs: list[list[str]], dictionary, k: int, *, cpus: int, passes: int, seed: int):
    """LdaMulticore fit; returns (top 25 words by probability as ``show_topic`` gives them, the (K, V)
    topic-word matrix in dictionary id order, seconds)."""
    from gensim.models import LdaMulticore

    t = time.time()
    corpus = [dictionary.doc2bow(d) for d in docs]
    lda = LdaMulticore(corpus=corpus, id2word=dictionary, num_topics=k, workers=max(1, cpus - 1), passes=passes,
                       random_state=seed)
    seconds = time.time() - t
    topics = [[w for w, _ in lda.show_topic(i, topn=25)] for i in range(k)]
    return topics, lda.get_topics(), seconds


def run(args: argparse.Namespace) -> int:
    """``embedjob bench topics`` (flags in :mod:`embedjob.cli`)."""
    import ray

    args.k, args.lda_passes = args.k or [20], args.lda_passes or 1
    args.embeddings = args.embeddings or "word2vec"
    corpus = DEFAULT_CORPUS if args.corpus is None else args.corpus
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    workdir = args.workdir or tempfile.mkdtemp(prefix="embedjob-bench-topics-")
    results: list[dict[str, Any]] = []
    try:
        t = time.time()
        urls = prepare_tokens(corpus, workdir, args.limit)
        token_seconds = time.time() - t
        out = Storage(workdir)
        full_dict = _corpus_dictionary(out, urls)
        docs = read_tokens(urls)
        base = _topics_config(args.set)
        w2v_seconds = _word2vec_rho(args, base, docs, out, workdir)
        for k, seed in [(k, base.seed + i) for k in args.k for i in range(max(1, args.seeds))]:
            tc = base.model_copy(update={"num_topics": k, "embeddings": args.embeddings, "resume": False,
                                         "seed": seed})
            tc = TopicsConfig(**tc.model_dump())
            row = _one_run(args, tc, out, urls, docs, full_dict, w2v_seconds=w2v_seconds,
                           token_seconds=token_seconds)
            results.append(row)
            w2v_seconds = 0.0
            if not args.json:
                _print_row(row, tc)
    finally:
        if started_ray:
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(results)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"runs": results, "summary": summary}))
    elif args.seeds > 1:
        _print_summary(summary)
    return 0


def _corpus_dictionary(out, urls: list[str]):
    """The corpus-wide Dictionary of the token shards, as the job's vocab/dictionary.json (rebuilt
    when the shards changed)."""
    if not out.exists(DICTIONARY_JSON) or not out.exists("vocab/_bench.json") or \
            out.read_json("vocab/_bench.json") != {"urls": urls}:
        write_dictionary(out, build_vocabulary(urls))
        out.write_json("vocab/_bench.json", {"urls": urls})
    return read_dictionary(out)


def _topics_config(overrides: list[str]):
    """The enabled TopicsConfig with ``--set`` overrides (``topics.`` prefix optional)."""
    data: dict[str, Any] = {}
    for o in overrides:
        apply_override(data, o if o.startswith("topics.") else f"topics.{o}")
    return TopicsConfig(**{"enabled": True, **data.get("topics", {})})


def _word2vec_rho(args: argparse.Namespace, base, docs: list[list[str]], out, workdir: str) -> float:
    """Train the Word2Vec rho when ``--embeddings word2vec`` and the workdir has none; its seconds (0 if not)."""
    if args.embeddings != "word2vec" or out.exists(job_vectors_file("word2vec")):
        return 0.0
    w2v = Word2VecConfig()
    dim = w2v.vector_size if args.w2v_dim is None else args.w2v_dim
    epochs = w2v.epochs if args.w2v_epochs is None else args.w2v_epochs
    return train_word2vec(docs, os.path.join(workdir, "word2vec"), cpus=args.cpus, dim=dim, epochs=epochs,
                          min_count=base.no_below)


def _one_run(args: argparse.Namespace, tc, out, urls: list[str], docs: list[list[str]], full_dict, *,
             w2v_seconds: float, token_seconds: float) -> dict[str, Any]:
    """embedjob's topic model and LdaMulticore for one K and seed, both scored on the same reference texts."""
    import numpy as np

    from embedjob.stages.topics.stage import run_topics

    etm = run_topics(tc, out, urls)
    dictionary = filter_dictionary(full_dict, tc)
    lda_topics, lda_tw, lda_seconds = run_lda(docs, dictionary, tc.num_topics, cpus=args.cpus,
                                              passes=args.lda_passes, seed=tc.seed)
    texts = reference_texts(urls, {}, tc.coherence_docs, tc.seed)
    lda = evaluate_topics(lda_topics, texts, dictionary, tc)
    # LDA's words chosen the way embedjob chooses its own (same relevance lambda), for a like-for-like view
    lda_rel_topics = top_words(relevance(np.log(np.maximum(lda_tw, 1e-30)), corpus_word_counts(dictionary),
                                         tc.ranking_lambda),
                               vocab_list(dictionary), 25)
    lda_rel = evaluate_topics(lda_rel_topics, texts, dictionary, tc)
    etm_topics = [t["words"] for t in out.read_json("topics/topics.json")["topics"]]
    return {
        "k": tc.num_topics, "seed": tc.seed, "documents": len(docs), "vocabulary": len(dictionary),
        "model": tc.model, "embeddings": etm.get("embeddings"), "cpus": args.cpus,
        "etm_npmi": etm["npmi"], "lda_npmi": lda.get("npmi"),
        "etm_cv": etm["c_v"], "lda_cv": lda.get("c_v"),
        "etm_diversity": etm["diversity"], "lda_diversity": lda["diversity"],
        "ranking_lambda": tc.ranking_lambda, "lda_relevance_npmi": lda_rel.get("npmi"),
        "lda_relevance_cv": lda_rel.get("c_v"), "lda_relevance_diversity": lda_rel["diversity"],
        "etm_seconds": round(etm["train_seconds"], 3),
        "lda_seconds": round(lda_seconds, 3),
        "etm_epoch_seconds": etm.get("epoch_seconds"), "etm_workers": etm["workers"],
        "etm_threads_per_worker": etm["threads_per_worker"], "etm_epochs": tc.epochs,
        "lda_passes": args.lda_passes, "w2v_seconds": round(w2v_seconds, 3),
        "token_seconds": round(token_seconds, 3), "reference_docs": len(texts),
        "seconds_ratio_etm_over_lda": round(etm["train_seconds"] / max(lda_seconds, 1e-9), 3),
        "etm_top_words": [t[:10] for t in etm_topics], "lda_top_words": [t[:10] for t in lda_topics],
    }


def _print_row(row: dict[str, Any], tc) -> None:
    print(f"K={row['k']}  docs={row['documents']}  vocabulary={row['vocabulary']}  cpus={row['cpus']}  "
          f"rho={row['embeddings']}")
    print(f"  {'':8s} {'NPMI':>8s} {'C_V':>8s} {'divers.':>8s} {'seconds':>9s}")
    print(f"  {tc.model:8s} {row['etm_npmi']:8.4f} {row['etm_cv']:8.4f} {row['etm_diversity']:8.3f} "
          f"{row['etm_seconds']:9.1f}")
    print(f"  {'lda':8s} {row['lda_npmi']:8.4f} {row['lda_cv']:8.4f} {row['lda_diversity']:8.3f} "
          f"{row['lda_seconds']:9.1f}")
    print(f"  {'lda rel.':8s} {row['lda_relevance_npmi']:8.4f} {row['lda_relevance_cv']:8.4f} "
          f"{row['lda_relevance_diversity']:8.3f}    (LDA's words by relevance, lambda={tc.ranking_lambda})")
    print(f"  time ratio {tc.model}/lda: {row['seconds_ratio_etm_over_lda']:.2f}")


def _print_summary(summary: list[dict[str, Any]]) -> None:
    for row in summary:
        print(f"K={row['k']} over {row['seeds']} seeds (mean [min, max]):")
        for key in SUMMARY_KEYS:
            m = row[key]
            if m is not None:
                print(f"  {key:16s} {m['mean']:9.4f} [{m['min']:.4f}, {m['max']:.4f}]")
        print(f"  ETM >= LDA in NPMI {row['etm_npmi_ge_lda']}/{row['seeds']}, diversity "
              f"{row['etm_diversity_ge_lda']}/{row['seeds']}, time {row['etm_time_le_lda']}/{row['seeds']}")


SUMMARY_KEYS = ("etm_npmi", "lda_npmi", "etm_diversity", "lda_diversity", "etm_seconds", "lda_seconds")


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per K: mean, min and max of each figure over the seeds, and in how many runs the ETM met each target."""
    out = []
    for k in sorted({r["k"] for r in results}):
        rows = [r for r in results if r["k"] == k]
        row: dict[str, Any] = {"k": k, "seeds": len(rows)}
        for key in SUMMARY_KEYS:
            vals = [float(r[key]) for r in rows if r.get(key) is not None]
            row[key] = {"mean": round(sum(vals) / len(vals), 4), "min": round(min(vals), 4),
                        "max": round(max(vals), 4)} if vals else None
        row["etm_npmi_ge_lda"] = sum(1 for r in rows if r["etm_npmi"] is not None and r["lda_npmi"] is not None
                                     and r["etm_npmi"] >= r["lda_npmi"])
        row["etm_diversity_ge_lda"] = sum(1 for r in rows if r["etm_diversity"] >= r["lda_diversity"])
        row["etm_time_le_lda"] = sum(1 for r in rows if r["etm_seconds"] <= r["lda_seconds"])
        out.append(row)
    return out
