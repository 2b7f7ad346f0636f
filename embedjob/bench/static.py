"""`embedjob bench static`: WordSim-353 Spearman correlation of the job's BERT static word vectors,
beside gensim Word2Vec trained on the same tokens, measured in one run.

The job pipeline itself runs (``run_job``: read -> preprocess -> encode with the static accumulator
-> commit -> ``run_static``) on the first ``--limit`` documents of ``--corpus`` (copied into shards
of the work folder), then gensim ``Word2Vec`` (``--w2v-epochs`` 5, 100 dims, 2 workers) is trained
on the job's ``tokens/``. Both are scored on gensim's ``wordsim353.tsv``: each pair's words go
through the job's preprocessing (lower-casing...) before lookup, and Spearman's rho is computed over
the pairs both vocabularies cover (``pairs_used``; each model's own coverage is reported too).

    embedjob bench static --limit 50000 --json
    embedjob bench static --output /tmp/bench-static --set static.layers=last4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from embedjob.bench.corpus import DEFAULT_CORPUS
from embedjob.config import apply_override, build_config
from embedjob.pipeline import run_job
from embedjob.stages.preprocess import build_filters
from embedjob.storage import Storage, list_shards
from embedjob.wordvectors import load_job_vectors

logger = logging.getLogger(__name__)



def wordsim_pairs(path: Optional[str] = None) -> list[tuple[str, str, float]]:
    """(word1, word2, human score) rows of WordSim-353 (gensim's test data by default)."""
    from gensim.test.utils import datapath

    rows = []
    with open(path or datapath("wordsim353.tsv"), encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            a, b, s = line.rstrip("\n").split("\t")[:3]
            rows.append((a, b, float(s)))
    return rows


def evaluate_pairs(kv, pairs: list[tuple[str, str, float]], normalize) -> dict[str, Any]:
    """Cosine similarity of every pair whose normalised words ``kv`` knows: {(a, b): cos}."""
    sims = {}
    for a, b, _ in pairs:
        na, nb = normalize(a), normalize(b)
        if na in kv.key_to_index and nb in kv.key_to_index:
            sims[(a, b)] = float(kv.similarity(na, nb))
    return sims


def spearman(pairs, sims: dict, keys) -> float:
    from scipy.stats import spearmanr

    human = {(a, b): s for a, b, s in pairs}
    keys = list(keys)
    if len(keys) < 3:
        return float("nan")
    return float(spearmanr([human[k] for k in keys], [sims[k] for k in keys]).correlation)


def subset_corpus(corpus: str, folder: str, limit: int) -> int:
    """Copy the first ``limit`` rows (0 = all) of the corpus's shards into ``folder``; returns rows."""
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    n = 0
    for url in list_shards(corpus):
        if limit and n >= limit:
            break
        with Storage(url).open("", "rb") as f:
            t = pq.ParquetFile(f).read()
        if limit:
            t = t.slice(0, limit - n)
        pq.write_table(t, os.path.join(folder, os.path.basename(url)))
        n += t.num_rows
    return n


def train_word2vec_baseline(token_folder: str, *, epochs: int, dim: int, min_count: int, workers: int, seed: int):
    import pyarrow.parquet as pq
    from gensim.models import Word2Vec

    docs = [d for d in pq.read_table(token_folder, columns=["tokens"]).column("tokens").to_pylist() if d]
    model = Word2Vec(sentences=docs, vector_size=dim, epochs=epochs, min_count=min_count, workers=workers,
                     seed=seed)
    return model.wv, len(docs)


def run(args: argparse.Namespace) -> int:
    """``embedjob bench static`` (flags in :mod:`embedjob.cli`)."""
    if args.corpus is None:
        args.corpus = DEFAULT_CORPUS
    work = tempfile.mkdtemp(prefix="embedjob-bench-static-")
    try:
        if args.vectors:
            result, cfg, docs = _score_output(args, work)
        else:
            result, cfg, docs = _run_and_score(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _report(args, result, cfg, docs)


def _score_output(args, work: str):
    """Score an existing job output (local path)."""
    out_dir = os.path.abspath(args.vectors)
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    cfg = build_config(manifest["config"], os.path.join(out_dir, "manifest.json"))
    docs = manifest["totals"]["rows_out"]
    enc = manifest["stages"].get("encode", {})
    encoder = {k: manifest["encoder"].get(k) for k in ("model", "dtype", "max_length", "device")}
    result = _score(args, cfg, out_dir, docs, encoder, None, enc.get("docs_per_second"))
    result["output"] = out_dir
    return result, cfg, docs


def _run_and_score(args, work: str):
    out_dir = os.path.abspath(args.output) if args.output else os.path.join(work, "output")
    inp = os.path.join(out_dir + ".input" if args.output else os.path.join(work, "input"))
    stamp = os.path.join(inp, "_subset.json")
    want = {"corpus": args.corpus, "limit": args.limit}
    if os.path.exists(stamp) and json.load(open(stamp)).get("subset") == want:
        docs = json.load(open(stamp))["documents"]  # reuse: unchanged shards are not encoded again
    else:
        shutil.rmtree(inp, ignore_errors=True)
        docs = subset_corpus(args.corpus, inp, args.limit)
        with open(stamp, "w") as f:
            json.dump({"subset": want, "documents": docs}, f)
    data: dict[str, Any] = {
        "name": "bench-static",
        "input": {"url": inp},
        "output": {"url": out_dir},
        "static": {"enabled": True, "min_count": args.min_count},
        "word2vec": {"enabled": False}, "topics": {"enabled": False}, "index": {"enabled": False},
    }
    for o in args.set:
        apply_override(data, o)
    cfg = build_config(data, "<bench static>")
    t0 = time.time()
    res = run_job(cfg)
    job_seconds = time.time() - t0
    enc = res.manifest["stages"].get("encode", {})
    encoder = {k: res.manifest["encoder"].get(k) for k in ("model", "dtype", "max_length", "device")}
    return _score(args, cfg, out_dir, docs, encoder, round(job_seconds, 1), enc.get("docs_per_second")), cfg, docs


def _score(args, cfg, out_dir: str, docs: int, encoder: dict, job_seconds, docs_per_second):
    """WordSim-353 of the output's BERT static vectors and of gensim Word2Vec on its tokens."""
    from gensim.parsing import preprocess_string

    kv = load_job_vectors(out_dir, {}, "bert")

    filters = build_filters(cfg.preprocess)

    def normalize(w: str) -> str:
        toks = preprocess_string(w, filters)
        return toks[0] if len(toks) == 1 else ""

    pairs = wordsim_pairs()
    bert_sims = evaluate_pairs(kv, pairs, normalize)
    result: dict[str, Any] = {
        "documents": docs,
        "corpus": args.corpus,
        "static": cfg.static.model_dump(mode="json"),
        "encoder": encoder,
        "job_seconds": job_seconds,
        "encode_docs_per_second": docs_per_second,
        "bert_words": len(kv),
        "wordsim_pairs": len(pairs),
        "bert_pairs": len(bert_sims),
        "bert_spearman_own_pairs": round(spearman(pairs, bert_sims, bert_sims), 4),
    }
    common = list(bert_sims)
    if not args.no_word2vec:
        t1 = time.time()
        wv, n_docs = train_word2vec_baseline(os.path.join(out_dir, "tokens"), epochs=args.w2v_epochs,
                                             dim=args.w2v_dim, min_count=args.min_count,
                                             workers=args.w2v_workers, seed=1)
        w2v_sims = evaluate_pairs(wv, pairs, normalize)
        common = [k for k in bert_sims if k in w2v_sims]
        result.update({
            "word2vec_seconds": round(time.time() - t1, 1),
            "word2vec_words": len(wv),
            "word2vec_pairs": len(w2v_sims),
            "word2vec_spearman_own_pairs": round(spearman(pairs, w2v_sims, w2v_sims), 4),
            "word2vec_spearman": round(spearman(pairs, w2v_sims, common), 4),
        })
    result["pairs_used"] = len(common)
    result["oov_ratio"] = round(1 - len(common) / max(len(pairs), 1), 4)
    result["bert_spearman"] = round(spearman(pairs, bert_sims, common), 4)
    return result


def _report(args, result: dict, cfg, docs: int) -> int:
    if args.json:
        print(json.dumps(result))
    else:
        print(f"WordSim-353 Spearman on {result['pairs_used']}/{result['wordsim_pairs']} pairs covered by both "
              f"({docs} documents of {args.corpus}):")
        print(f"  BERT static ({cfg.encode.model}, layers={cfg.static.layers}, pooling={cfg.static.word_pooling}): "
              f"{result['bert_spearman']:.4f}   [own coverage {result['bert_pairs']} pairs: "
              f"{result['bert_spearman_own_pairs']:.4f}; {result['bert_words']} words]")
        if "word2vec_spearman" in result:
            print(f"  gensim Word2Vec ({args.w2v_epochs} epochs, {args.w2v_dim} dims): {result['word2vec_spearman']:.4f}"
                  f"   [own coverage {result['word2vec_pairs']} pairs: {result['word2vec_spearman_own_pairs']:.4f}; "
                  f"{result['word2vec_words']} words]")
        if result.get("job_seconds") is not None:
            print(f"  job {result['job_seconds']}s ({result['encode_docs_per_second']} docs/s encoded)")
    return 0
