"""`embedjob bench word2vec`: single-process gensim vs embedjob's Ray Train data-parallel trainer,
on the same tokens, side by side in one run.

Both train the same model (Word2Vec or FastText, same hyper-parameters): gensim in one process
with ``workers=N`` threads, embedjob with ``N`` Ray Train workers. Printed: training words/s of
each and their ratio (``speed_ratio`` = embedjob / gensim), wall time of each end to end,
analogy accuracy (gensim's questions-words.txt, ``restrict_vocab=30000``) and WordSim-353
Spearman of each, and the differences (embedjob minus gensim)::

    embedjob bench word2vec --corpus ../shared/corpus/mixed-en --workers 2 --json

The corpus is tokenised once (gensim filters without stemming, so the evaluation words match)
into token shards cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Optional

from embedjob.bench.corpus import DEFAULT_CORPUS, tokenize_shard
from embedjob.stages.word2vec import Word2VecConfig
from embedjob.stages.word2vec.segments import write_line_sentences
from embedjob.stages.word2vec.stage import train_word2vec
from embedjob.storage import list_shards

logger = logging.getLogger(__name__)

# gensim's default filters minus stemming: analogy and WordSim words must stay whole words.
BENCH_FILTERS = ["strip_tags", "strip_punctuation", "strip_multiple_whitespaces", "strip_numeric",
                 "remove_stopwords", "strip_short"]


def _tokenize_shard(args: tuple[str, dict, str, Optional[int]]) -> tuple[str, int, int]:
    url, opts, dest, max_docs = args
    docs, tokens = tokenize_shard(url, dest, filters=BENCH_FILTERS, limit=max_docs, storage_options=opts)
    return dest, docs, tokens


def tokenize_corpus(corpus: str, opts: dict, cache: str, *, max_docs_per_shard: Optional[int] = None,
                    processes: int = 2) -> list[str]:
    """Token shards of ``corpus`` (one per input shard), cached under ``cache``."""
    from multiprocessing import get_context

    shards = list_shards(corpus, opts)
    key = hashlib.sha1(json.dumps([shards, BENCH_FILTERS, max_docs_per_shard]).encode()).hexdigest()[:12]
    folder = os.path.join(cache, key)
    os.makedirs(folder, exist_ok=True)
    dests = [os.path.join(folder, f"{i:05d}.parquet") for i in range(len(shards))]
    todo = [(s, opts, d, max_docs_per_shard) for s, d in zip(shards, dests) if not os.path.exists(d)]
    if todo:
        t = time.time()
        # spawn, not fork: a fork of a process with Ray's threads and embedjob's SIGTERM handler can
        # leave a worker blocked on the pool's queue lock that terminate() then waits on forever
        with get_context("spawn").Pool(processes) as pool:
            for _ in pool.imap_unordered(_tokenize_shard, todo):
                pass
        logger.info("tokenised %d shards in %.1fs into %s", len(todo), time.time() - t, folder)
    return dests


def evaluate(kv) -> dict[str, float]:
    """Analogy accuracy (questions-words.txt, restrict_vocab 30000) and WordSim-353 Spearman."""
    from gensim.test.utils import datapath

    acc, _ = kv.evaluate_word_analogies(datapath("questions-words.txt"), restrict_vocab=30000)
    _, spearman, oov = kv.evaluate_word_pairs(datapath("wordsim353.tsv"), restrict_vocab=300000)
    return {"analogy": round(100.0 * float(acc), 2), "wordsim_spearman": round(float(spearman[0]), 4),
            "wordsim_oov_percent": round(float(oov), 1)}


def run_gensim(token_files: list[str], cfg, threads: int, mode: str) -> tuple[Any, dict[str, Any]]:
    """Single-process gensim with ``threads`` worker threads on the same tokens."""
    import pyarrow.parquet as pq
    from gensim.models import FastText, Word2Vec

    docs = []
    for f in token_files:
        docs.extend(d for d in pq.read_table(f, columns=["tokens"]).column("tokens").to_pylist() if d)
    common = dict(vector_size=cfg.vector_size, window=cfg.window, min_count=cfg.min_count,
                  max_final_vocab=cfg.max_final_vocab, sg=cfg.sg, hs=cfg.hs, negative=cfg.negative,
                  sample=cfg.sample, alpha=cfg.alpha, min_alpha=cfg.min_alpha, epochs=cfg.epochs,
                  seed=cfg.seed, workers=threads)
    model = (FastText(min_n=cfg.min_n, max_n=cfg.max_n, bucket=cfg.bucket, **common)
             if cfg.model == "fasttext" else Word2Vec(**common))
    # Both sides do the same work: gensim computes the training loss when embedjob does (its report
    # needs it; Word2Vec only, gensim's FastText has no loss).
    loss = bool(cfg.compute_loss) and cfg.model == "word2vec"
    with tempfile.TemporaryDirectory(prefix="embedjob-bench-") as tmp:
        t0 = time.time()
        if mode == "corpus_file":
            path = os.path.join(tmp, "corpus.txt")
            write_line_sentences(docs, path)
            del docs
            model.build_vocab(corpus_file=path)
            t1 = time.time()
            eff, raw = model.train(corpus_file=path, total_words=model.corpus_total_words, epochs=cfg.epochs,
                                   compute_loss=loss)
        else:
            model.build_vocab(docs)
            t1 = time.time()
            eff, raw = model.train(docs, total_examples=model.corpus_count, epochs=cfg.epochs, compute_loss=loss)
        t2 = time.time()
    return model.wv, {"effective_words": int(eff), "train_seconds": round(t2 - t1, 3),
                      "total_seconds": round(t2 - t0, 3), "words_per_s": round(eff / (t2 - t1), 1),
                      "vocabulary": len(model.wv), "threads": threads, "mode": mode}


def run(args: argparse.Namespace) -> int:
    """``embedjob bench word2vec`` (flags in :mod:`embedjob.cli`)."""
    corpus = DEFAULT_CORPUS if args.corpus is None else args.corpus
    cfg = _bench_config(args)
    files = tokenize_corpus(corpus, _storage_options(args.storage_option), args.cache,
                            max_docs_per_shard=args.max_docs_per_shard)

    gensim_kv, g = run_gensim(files, cfg, args.workers * args.threads_per_worker, args.gensim_mode)
    g.update(evaluate(gensim_kv))
    del gensim_kv

    e, rep = _run_embedjob(files, cfg, args)
    out = {
        "model": args.model, "corpus": corpus, "documents": rep["documents"],
        "tokens_per_epoch": rep["tokens_per_epoch"], "epochs": args.epochs, "vector_size": args.vector_size,
        "workers": args.workers, "cpus": os.cpu_count(),
        "gensim": g, "embedjob": e,
        "speed_ratio": round(e["words_per_s"] / g["words_per_s"], 3),
        "end_to_end_ratio": round(g["total_seconds"] / e["total_seconds"], 3),
        "analogy_delta": round(e["analogy"] - g["analogy"], 2),
        "wordsim_delta": round(e["wordsim_spearman"] - g["wordsim_spearman"], 4),
    }
    if args.json:
        print(json.dumps(out))
        return 0
    _print_report(args, out, g, e)
    return 0


def _storage_options(pairs: list[str]) -> dict[str, Any]:
    """``--storage-option K=V`` pairs; a value is parsed as JSON when it can be."""
    opts: dict[str, Any] = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def _bench_config(args: argparse.Namespace):
    """The Word2VecConfig both sides train with."""
    return Word2VecConfig(model=args.model, epochs=args.epochs, vector_size=args.vector_size,
                          min_count=args.min_count, sg=args.sg, bucket=args.bucket, workers=args.workers,
                          threads_per_worker=args.threads_per_worker, sync_mode=args.sync_mode,
                          **({"sync_every": args.sync_every} if args.sync_every else {}),
                          **({"ngram_sync_every": args.ngram_sync_every} if args.ngram_sync_every else {}),
                          use_corpus_file=not args.no_corpus_file, share_memory=not args.no_share_memory)


def _run_embedjob(files: list[str], cfg, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """embedjob's Ray Train trainer on a fresh local Ray: (its figures, evaluation included; its report)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=max(os.cpu_count() or 1, args.workers * args.threads_per_worker),
             include_dashboard=False, log_to_driver=False)
    try:
        t = time.time()
        kv, rep = train_word2vec(files, cfg, {})
        wall = time.time() - t
    finally:
        ray.shutdown()
    e = {"effective_words": rep["effective_words"], "train_seconds": rep["train_seconds"],
         "total_seconds": round(wall, 3), "words_per_s": rep["words_per_s"], "vocabulary": rep["vocabulary"],
         "workers": args.workers, "threads_per_worker": args.threads_per_worker,
         "sync_seconds": rep["sync_seconds"], "synced_row_fraction": rep.get("synced_row_fraction"),
         "sync_wait_seconds": rep.get("sync_wait_seconds"), "loss": [x["loss"] for x in rep["epochs"]],
         "corpus_file": cfg.use_corpus_file, "sync_mode": cfg.sync_mode,
         "shared_memory_groups": rep.get("shared_memory_groups"), "syncs_per_epoch": rep.get("syncs_per_epoch")}
    e.update(evaluate(kv))
    return e, rep


def _print_report(args: argparse.Namespace, out: dict[str, Any], g: dict[str, Any], e: dict[str, Any]) -> None:
    print(f"{args.model}: {out['documents']} docs, {out['tokens_per_epoch']} tokens/epoch, {args.epochs} epochs, "
          f"{args.vector_size} dims, {os.cpu_count()} CPUs")
    print(f"{'':28}{'gensim (' + str(g['threads']) + ' threads)':>24}{'embedjob (' + str(args.workers) + ' Ray workers)':>28}")
    rows = [("train words/s", g["words_per_s"], e["words_per_s"], ".0f"),
            ("train seconds", g["train_seconds"], e["train_seconds"], ".1f"),
            ("end-to-end seconds", g["total_seconds"], e["total_seconds"], ".1f"),
            ("vocabulary", g["vocabulary"], e["vocabulary"], "d"),
            ("analogy accuracy %", g["analogy"], e["analogy"], ".2f"),
            ("WordSim-353 Spearman", g["wordsim_spearman"], e["wordsim_spearman"], ".4f")]
    for name, a, b, fmt in rows:
        print(f"{name:28}{format(a, fmt):>24}{format(b, fmt):>28}")
    print(f"speed_ratio (train words/s, embedjob/gensim): {out['speed_ratio']:.3f}   "
          f"end-to-end ratio: {out['end_to_end_ratio']:.3f}")
    print(f"analogy_delta (embedjob - gensim): {out['analogy_delta']:+.2f} points   "
          f"wordsim_delta: {out['wordsim_delta']:+.4f}")
