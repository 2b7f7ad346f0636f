"""``embedjob bench topics --suite``: the topic model against gensim ``LdaMulticore`` on several
corpora of different size and kind, all cut from the shared mixed-en corpus, in one run.

Corpora (``--corpora``; each a seeded sample, its rows shuffled, written as input shards with
``id``, ``text``, ``label`` and tokenised as the job would):

========== =============================================== ========== =========================
name       what                                            documents  label
========== =============================================== ========== =========================
mixed      mixed-en, all sources (``--mixed-docs``)        20,000     source
sources    every source, at most 400 documents each        ~3,000     source
fortunes   Debian fortunes, the 8 largest categories        ~3,000     category
kernel     Linux kernel docs, the 8 largest folders         ~1,900     top-level folder
kjv        King James Bible chapters                        1,189      book
shakespeare Shakespeare chunks                              2,705      play
austen     Jane Austen chapters                             275        novel
========== =============================================== ========== =========================

For each corpus, K (``--k``, default: the number of labels, clamped to 5..20) and seed: embedjob's
stage (``run_topics``, its default settings unless ``--set``; ``label_column: label``) and
``LdaMulticore`` on the same filtered dictionary, its input shuffled (seeded) and its passes scaled to
the corpus (``lda_passes``: about 60k documents seen, 1..20 passes) so that a small corpus gets a
fair number of updates from it too. Both are scored the same way: NPMI and C_V (the same reference
texts), diversity (top 25), duplicate topics (top-10 overlap >= 0.5), label NMI / ARI of argmax theta
(LDA: of its variational gamma), training seconds (ETM: BoW + TorchTrainer fit; LDA: doc2bow + fit).
Word2Vec for ``--embeddings word2vec|auto`` is trained here on the corpus's tokens with the job's
``word2vec`` defaults, as the job's word2vec stage would (its seconds apart).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import numpy as np

from embedjob.storage import Storage, list_shards

logger = logging.getLogger(__name__)

# name -> (source filter, largest labels kept, per-label cap, total cap)
CORPORA: dict[str, dict[str, Any]] = {
    "mixed": {"sources": None, "label": "source", "docs": 20000},
    "sources": {"sources": None, "label": "source", "per_label": 400},
    "fortunes": {"sources": ["fortunes"], "labels": 8, "docs": 3000},
    "kernel": {"sources": ["linux_kernel_docs"], "labels": 8},
    "kjv": {"sources": ["kjv_chapters"]},
    "shakespeare": {"sources": ["shakespeare_chunks"]},
    "austen": {"sources": ["austen_chapters"]},
}
SHARDS = 4


def lda_passes(docs: int) -> int:
    """LdaMulticore passes giving it about 60k documents seen (1 on big corpora, at most 20)."""
    return int(min(20, max(1, math.ceil(60000 / max(docs, 1)))))


def build_corpus(name: str, table, folder: str, seed: int, mixed_docs: Optional[int]) -> dict[str, Any]:
    """Write the corpus ``name`` (rows of the mixed-en ``table``) to ``folder/input`` as shuffled
    shards (``id``, ``text``, ``label``) and its tokens to ``folder/tokens``; returns its description."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from embedjob.bench.corpus import tokenize_shard

    spec = CORPORA[name]
    rng = np.random.default_rng(seed)
    t = table
    if spec["sources"]:
        t = t.filter(pc.is_in(t.column("source"), value_set=pa.array(spec["sources"])))
    labels = t.column(spec.get("label", "label")).to_numpy(zero_copy_only=False).astype(object)
    keep = np.array([lab is not None for lab in labels])
    if spec.get("labels"):
        names, counts = np.unique(labels[keep].astype(str), return_counts=True)
        top = set(names[np.argsort(-counts)[:spec["labels"]]])
        keep &= np.array([lab in top for lab in labels])
    idx = np.flatnonzero(keep)
    if spec.get("per_label"):
        idx = np.concatenate([rng.permutation(idx[labels[idx] == lab])[:spec["per_label"]]
                              for lab in sorted(set(labels[idx]))])
    cap = mixed_docs if name == "mixed" and mixed_docs else spec.get("docs")
    idx = rng.permutation(idx)[:cap]
    sub = pa.table({"id": t.column("id").take(pa.array(idx)), "text": t.column("text").take(pa.array(idx)),
                    "label": pa.array(labels[idx].tolist(), pa.string())})
    inputs, tokens = {}, []
    for d in ("input", "tokens"):
        os.makedirs(os.path.join(folder, d), exist_ok=True)
    for s in range(SHARDS):
        key = f"part-{s:05d}"
        path = os.path.join(folder, "input", key + ".parquet")
        pq.write_table(sub.slice(len(idx) * s // SHARDS, len(idx) * (s + 1) // SHARDS - len(idx) * s // SHARDS), path)
        dest = os.path.join(folder, "tokens", key + ".parquet")
        tokenize_shard(path, dest)
        inputs[key], tokens = path, tokens + [dest]
    return {"name": name, "documents": len(idx), "classes": len(set(labels[idx])), "inputs": inputs,
            "tokens": tokens}


def _read_mixed(corpus: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables(pq.read_table(u, columns=["id", "text", "source", "label"]) for u in list_shards(corpus))


def run_lda(docs: list[list[str]], dictionary, k: int, *, cpus: int, passes: int, seed: int):
    """LdaMulticore on the documents in a seeded shuffled order; returns (top 25 words by probability,
    argmax of gamma per document in the given order, seconds)."""
    from gensim.models import LdaMulticore

    t = time.time()
    order = np.random.default_rng(seed).permutation(len(docs))
    corpus = [dictionary.doc2bow(docs[i]) for i in order]
    lda = LdaMulticore(corpus=corpus, id2word=dictionary, num_topics=k, workers=max(1, cpus - 1), passes=passes,
                       random_state=seed)
    seconds = time.time() - t
    gamma, _ = lda.inference([dictionary.doc2bow(d) for d in docs])
    topics = [[w for w, _ in lda.show_topic(i, topn=25)] for i in range(k)]
    return topics, gamma.argmax(1), seconds


def _one(args: argparse.Namespace, corpus: dict[str, Any], base, k: int, seed: int, folder: str,
         w2v_seconds: float) -> dict[str, Any]:
    """embedjob's stage and LdaMulticore on one corpus for one K and seed."""
    import pyarrow.parquet as pq

    from embedjob.bench.topics import read_tokens
    from embedjob.stages.topics import TopicsConfig
    from embedjob.stages.topics.bow import filter_dictionary
    from embedjob.stages.topics.metrics import evaluate_topics, reference_texts
    from embedjob.stages.topics.quality import redundancy_report
    from embedjob.stages.topics.stage import load_job_dictionary, run_topics

    out = Storage(folder)
    tc = TopicsConfig(**{**base.model_dump(), "num_topics": k, "seed": seed, "resume": False,
                         "embeddings": args.embeddings, "label_column": "label"})
    etm = run_topics(tc, out, corpus["tokens"], input_urls=corpus["inputs"])
    m = out.read_json("topics/metrics.json")
    docs = read_tokens(corpus["tokens"])
    labels = [lab for u in corpus["inputs"].values() for lab in pq.read_table(u, columns=["label"]).column(0).to_pylist()]
    dictionary = filter_dictionary(load_job_dictionary(out, corpus["tokens"]), tc)
    passes = args.lda_passes or lda_passes(len(docs))
    lda_topics, lda_argmax, lda_seconds = run_lda(docs, dictionary, k, cpus=args.cpus, passes=passes, seed=seed)
    texts = reference_texts(corpus["tokens"], {}, tc.coherence_docs, tc.seed)
    lda = evaluate_topics(lda_topics, texts, dictionary, tc)
    lda.update(redundancy_report(lda_topics, lda_argmax, top_n=tc.top_n, labels=labels))
    red = m["redundancy"]
    return {
        "corpus": corpus["name"], "documents": corpus["documents"], "classes": corpus["classes"], "k": k,
        "seed": seed, "vocabulary": etm["vocabulary"], "embeddings": args.embeddings,
        "rho": m.get("embeddings"), "etm_epochs": etm["epochs"], "etm_steps": etm.get("steps"),
        "etm_batch_size": etm["batch_size"], "lda_passes": passes, "cpus": args.cpus,
        "etm_npmi": etm["npmi"], "lda_npmi": lda.get("npmi"), "etm_cv": etm["c_v"], "lda_cv": lda.get("c_v"),
        "etm_diversity": etm["diversity"], "lda_diversity": lda["diversity"],
        "etm_nmi": m["labels"]["nmi"], "lda_nmi": lda["labels"]["nmi"],
        "etm_ari": m["labels"]["ari"], "lda_ari": lda["labels"]["ari"],
        "etm_duplicates": red["duplicate_topics"], "lda_duplicates": lda["redundancy"]["duplicate_topics"],
        "etm_effective_topics": red.get("effective_topics"),
        "lda_effective_topics": lda["redundancy"].get("effective_topics"),
        "etm_seconds": round(etm["train_seconds"], 3), "lda_seconds": round(lda_seconds, 3),
        "w2v_seconds": round(w2v_seconds, 3), "etm_warning": m.get("warning"),
        "etm_top_words": [t["words"][:8] for t in out.read_json("topics/topics.json")["topics"]],
    }


FIGURES = ("npmi", "cv", "diversity", "nmi", "ari", "duplicates", "seconds")


def summarize_suite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per corpus and K: the mean over seeds of every figure of both models, and which targets the
    ETM meets (NMI, NPMI >= LDA's; diversity >= max(LDA's, 0.8); no duplicates; time <= 1.5x LDA's)."""
    out = []
    for key in sorted({(r["corpus"], r["k"]) for r in rows}, key=lambda x: (CORPUS_ORDER.get(x[0], 99), x[1])):
        rs = [r for r in rows if (r["corpus"], r["k"]) == key]
        s: dict[str, Any] = {"corpus": key[0], "k": key[1], "seeds": len(rs), "documents": rs[0]["documents"],
                             "classes": rs[0]["classes"]}
        for f in FIGURES:
            for model in ("etm", "lda"):
                vals = [float(r[f"{model}_{f}"]) for r in rs if r.get(f"{model}_{f}") is not None]
                s[f"{model}_{f}"] = round(float(np.mean(vals)), 4) if vals else None
        s["targets"] = {
            "nmi": s["etm_nmi"] >= s["lda_nmi"], "npmi": s["etm_npmi"] >= s["lda_npmi"],
            "diversity": s["etm_diversity"] >= max(s["lda_diversity"], 0.8), "no_duplicates": s["etm_duplicates"] == 0,
            "time": s["etm_seconds"] <= 1.5 * s["lda_seconds"],
        }
        out.append(s)
    return out


CORPUS_ORDER = {n: i for i, n in enumerate(CORPORA)}


def format_table(summary: list[dict[str, Any]]) -> str:
    head = (f"{'corpus':12s} {'docs':>6s} {'K':>3s} | {'NPMI etm/lda':>15s} | {'C_V etm/lda':>13s} | "
            f"{'divers. etm/lda':>15s} | {'NMI etm/lda':>13s} | {'ARI etm/lda':>13s} | {'dup':>7s} | "
            f"{'seconds etm/lda':>15s} | targets missed")
    lines = [head, "-" * len(head)]
    for s in summary:
        missed = [t for t, ok in s["targets"].items() if not ok]
        lines.append(
            f"{s['corpus']:12s} {s['documents']:6d} {s['k']:3d} | {s['etm_npmi']:7.3f}/{s['lda_npmi']:7.3f} | "
            f"{s['etm_cv']:6.3f}/{s['lda_cv']:6.3f} | {s['etm_diversity']:7.3f}/{s['lda_diversity']:7.3f} | "
            f"{s['etm_nmi']:6.3f}/{s['lda_nmi']:6.3f} | {s['etm_ari']:6.3f}/{s['lda_ari']:6.3f} | "
            f"{s['etm_duplicates']:3.1f}/{s['lda_duplicates']:3.1f} | {s['etm_seconds']:7.1f}/{s['lda_seconds']:7.1f} | "
            f"{', '.join(missed) or '-'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``embedjob bench topics --suite`` (flags in :mod:`embedjob.cli`)."""
    import ray

    from embedjob.bench.corpus import DEFAULT_CORPUS
    from embedjob.bench.topics import _topics_config, read_tokens, train_word2vec
    from embedjob.stages.word2vec import Word2VecConfig

    args.embeddings = args.embeddings or "auto"
    names = args.corpora or list(CORPORA)
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        raise SystemExit(f"embedjob bench topics: unknown corpora {unknown}; valid: {', '.join(CORPORA)}")
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    workdir = args.workdir or tempfile.mkdtemp(prefix="embedjob-bench-topics-suite-")
    base = _topics_config(args.set)
    rows: list[dict[str, Any]] = []
    try:
        table = _read_mixed(DEFAULT_CORPUS if args.corpus is None else args.corpus)
        for name in names:
            folder = os.path.join(workdir, name)
            shutil.rmtree(folder, ignore_errors=True)
            corpus = build_corpus(name, table, folder, seed=0, mixed_docs=args.mixed_docs)
            w2v_seconds = 0.0
            if args.embeddings in ("word2vec", "auto"):
                w2v = Word2VecConfig()
                w2v_seconds = train_word2vec(read_tokens(corpus["tokens"]), os.path.join(folder, "word2vec"),
                                             cpus=args.cpus, dim=args.w2v_dim or w2v.vector_size,
                                             epochs=args.w2v_epochs or w2v.epochs, min_count=base.no_below)
            ks = args.k or [min(20, max(5, corpus["classes"]))]
            for k in ks:
                for i in range(max(1, args.seeds)):
                    row = _one(args, corpus, base, k, base.seed + i, folder, w2v_seconds)
                    rows.append(row)
                    logger.info("bench: %s K=%d seed %d: NPMI %.3f/%.3f diversity %.3f/%.3f NMI %.3f/%.3f "
                                "dup %d/%d seconds %.1f/%.1f (etm/lda)", name, k, row["seed"], row["etm_npmi"],
                                row["lda_npmi"], row["etm_diversity"], row["lda_diversity"], row["etm_nmi"],
                                row["lda_nmi"], row["etm_duplicates"], row["lda_duplicates"], row["etm_seconds"],
                                row["lda_seconds"])
    finally:
        if started_ray:
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize_suite(rows)
    if args.json:
        print(json.dumps({"runs": rows, "summary": summary}))
    else:
        print(format_table(summary))
    return 0
