"""Command line: ``embedjob run JOB.yaml [--set section.key=value ...] [--dry-run] [--force-unlock]`` and the
commands that read a finished job's output (``similar``, ``search``, ``topics``, ``report``), plus
``embedjob bench NAME`` and ``embedjob config`` (every setting with its help text)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from typing import Optional

logger = logging.getLogger("embedjob")

BENCHES = ("encode", "static", "word2vec", "topics", "index", "vectors", "windows", "faults")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    logging.getLogger("embedjob").setLevel(level)
    for noisy in ("gensim", "urllib3", "botocore", "s3fs", "aiobotocore", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in RAY_DATA_FAILURE_LOGGERS:
        lg = logging.getLogger(name)
        if not verbose and not any(isinstance(f, _ErrorsOffConsole) for f in lg.filters):
            lg.addFilter(_ErrorsOffConsole())


# Where Ray Data reports a failed dataset: the worker's traceback (~60 lines, terminal colours) and
# "Exception occurred in Ray Data or Ray Core internal code" for an error raised in a read task.
RAY_DATA_FAILURE_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")


class _ErrorsOffConsole(logging.Filter):
    """Keeps Ray Data's error reports off the console (embedjob prints the cause as one line); they
    still go to Ray Data's log file, as Ray Data's console handler drops records marked ``hide``.
    ``embedjob -v`` shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.hide = True
        return True


def _storage_options(pairs: Optional[list[str]]) -> dict:
    """``--storage-option key=value`` (dotted keys nest: client_kwargs.endpoint_url=...)."""
    from embedjob.config import apply_override

    opts: dict = {}
    for p in pairs or []:
        apply_override(opts, p)
    return opts


def cmd_run(args: argparse.Namespace) -> int:
    from embedjob.config import load_job
    from embedjob.pipeline import run_job
    from embedjob.sample_corpus import build_sample_corpus
    from embedjob.storage import StorageError, list_shards

    cfg = load_job(args.job, args.set + (["output.force_unlock=true"] if args.force_unlock else []))
    if cfg.input.create_sample_if_missing:
        try:
            list_shards(cfg.input.url, cfg.input.storage_options)
        except StorageError:
            if args.dry_run:
                import yaml

                from embedjob.redact import redact

                print(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False).rstrip())
                print(f"# input {cfg.input.url} holds no shards yet: a run builds the sample corpus there first")
                return 0
            logger.info("input %s holds no shards: building the sample corpus there (input.create_sample_if_missing)",
                        cfg.input.url)
            build_sample_corpus(cfg.input.url, cfg.input.storage_options)
    result = run_job(cfg, dry_run=args.dry_run)
    if result is None:
        return 0
    t = result.manifest["totals"]
    print(f"embedjob: {t['done']} shard(s) encoded, {t['skipped_unchanged']} unchanged, {t['failed']} failed; "
          f"{t['rows_out']} rows; output {result.output_url}")
    print(f"embedjob: report: {_report_url(result.output_url)}")  # the last line: where to look next
    if result.failed_shards:
        print(f"embedjob: {len(result.failed_shards)} shard(s) failed: {', '.join(result.failed_shards)} "
              "(see manifest.json)", file=sys.stderr)
        return 3
    return 0


def _report_url(output_url: str) -> str:
    from embedjob.layout import REPORT_HTML

    return f"{output_url.rstrip('/')}/{REPORT_HTML}"


def cmd_config(args: argparse.Namespace) -> int:
    from embedjob.config import config_help

    print("\n".join(config_help()))
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from embedjob.errors import TopicsError
    from embedjob.stages.topics.read_back import topics_report

    try:
        text = topics_report(args.output, storage_options=_storage_options(args.storage_option), top=args.top,
                             as_json=args.json)
    except TopicsError as e:  # no topics (yet) at that output: a message, exit 1
        print(e)
        return 1
    print(text)
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from embedjob.similar import similar_words

    rows = similar_words(args.output, args.word, kind=args.vectors, n=args.n,
                         storage_options=_storage_options(args.storage_option))
    for word, score in rows:
        print(f"{word}\t{score:.4f}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from embedjob.stages.index.search import search_report

    in_opts = None if args.input_storage_option is None else _storage_options(args.input_storage_option)
    text = search_report(args.output, args.query, k=args.k, storage_options=_storage_options(args.storage_option),
                         input_storage_options=in_opts, words=args.words, as_json=args.json, level=args.level)
    if text:
        print(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from embedjob.report import write_report
    from embedjob.storage import Storage

    in_opts = None if args.input_storage_option is None else _storage_options(args.input_storage_option)
    where = write_report(Storage(args.output, _storage_options(args.storage_option)), args.o,
                         label_column=args.label_column, input_storage_options=in_opts)
    print(f"embedjob: report written to {where}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # The bench modules import gensim, torch, Ray...: loaded only when a bench runs.
    name = "topics_suite" if args.bench == "topics" and getattr(args, "suite", False) else args.bench
    return int(importlib.import_module(f"embedjob.bench.{name}").run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedjob", description="Distributed batch embedding job on Ray: run a job, read its outputs, benchmark.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job spec on local Ray or the cluster at RAY_ADDRESS",
                       epilog="exit codes: 0 success; 2 an error, as one line (config, input, model, lease, a failed "
                       "stage, or Ray's own runtime failing; -v adds Ray's traceback); 3 some shards failed "
                       "(input.on_bad_shard: skip); 75 stopped by SIGTERM (preemption, `ray job stop`): committed "
                       "shards are kept, rerun the same command to continue; 130 interrupted (Ctrl-C)")
    r.add_argument("job", nargs="?", default=None, help="job spec YAML (default: all defaults)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting (repeatable; value parsed as YAML)")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and the shards, then exit")
    r.add_argument("--force-unlock", action="store_true",
                   help="take over the output's lease even while another run holds it (output.force_unlock)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="list every job setting with its default and help text")
    c.set_defaults(func=cmd_config)

    s = sub.add_parser("similar", help="nearest words from a finished job's word vectors")
    s.add_argument("output", help="the job's output URL")
    s.add_argument("--word", required=True)
    s.add_argument("--vectors", choices=("bert", "word2vec"), default="bert")
    s.add_argument("-n", type=int, default=10)
    s.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for the output (dotted keys nest)")
    s.set_defaults(func=cmd_similar)

    q = sub.add_parser("search", help="nearest documents to a query text (FAISS index of a finished job)",
                       description="Nearest documents to a query text in a finished job's FAISS index; "
                       "the query is encoded with the job's own model and settings (from manifest.json).")
    q.add_argument("output", help="the job's output URL (path, s3://...)")
    q.add_argument("query", help="query text (with --words NAME: a word)")
    q.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    q.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for the output (dotted keys nest: client_kwargs.endpoint_url=...)")
    q.add_argument("--input-storage-option", action="append", default=None, metavar="KEY=VALUE",
                   help="fsspec option for reading the input shards' text (default: the manifest's, "
                   "with the output's credentials when on the same store)")
    q.add_argument("--words", metavar="NAME", help="search the word index NAME (word2vec, bert) for words near QUERY")
    q.add_argument("--level", choices=("auto", "doc", "chunk"), default="auto",
                   help="rank documents by their best passage ('chunk': the job ran with encode.write_chunks, "
                   "the passage's text is shown) or by their document vector ('doc'); 'auto' = passages where "
                   "the job wrote them")
    q.add_argument("--json", action="store_true", help="print the hits as one JSON object")
    q.set_defaults(func=cmd_search)

    t = sub.add_parser("topics", help="print a finished job's topics with their coherence",
                       description="Print the topics of a job's topic model.")
    t.add_argument("output", help="job output URL (folder holding topics/)")
    t.add_argument("--storage-option", action="append", default=[], metavar="K=V",
                   help="fsspec option of the output storage (value parsed as YAML; dotted keys nest); repeatable")
    t.add_argument("--top", type=int, default=10, help="words printed per topic")
    t.add_argument("--json", action="store_true", help="print topics.json and metrics.json as one JSON object")
    t.set_defaults(func=cmd_topics)

    h = sub.add_parser("report", help="write a finished job's HTML report (report.html)",
                       description="Write one self-contained HTML page about a finished job: the run, throughput "
                       "and memory over time, topics, a map of sampled documents, word neighbours, indices. "
                       "It works offline (inline SVG, no script to fetch). Every run also writes it as "
                       "<output>/report.html.")
    h.add_argument("output", help="the job's output URL (path, s3://...)")
    h.add_argument("-o", metavar="FILE", default=None,
                   help="where to write the page (path or URL; default: <output>/report.html)")
    h.add_argument("--label-column", metavar="COLUMN", default=None,
                   help="colour the document map by this input column instead of the dominant topic")
    h.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for the output (dotted keys nest: client_kwargs.endpoint_url=...)")
    h.add_argument("--input-storage-option", action="append", default=None, metavar="KEY=VALUE",
                   help="fsspec option for reading the input shards (--label-column; default: the manifest's, "
                   "with the output's credentials when on the same store)")
    h.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHES)}",
                       description="Benchmarks of embedjob's stages beside their usual baselines.")
    b.set_defaults(func=cmd_bench)
    _add_bench_parsers(b.add_subparsers(dest="bench", metavar="NAME", required=True))
    return p

# The benchmarks' flags. Defaults that live in the bench modules (the shared corpus's path) or in a
# stage's config are None here and resolved by the bench's run(args): importing them would load gensim.
SHARED_CORPUS_HELP = "(default: the shared corpus, ../shared/corpus/mixed-en beside the repository)"


def _add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    """One sub-parser per benchmark (``embedjob bench NAME --help``)."""
    _add_bench_encode(sub)
    _add_bench_static(sub)
    _add_bench_word2vec(sub)
    _add_bench_topics(sub)
    _add_bench_index(sub)
    _add_bench_vectors(sub)
    _add_bench_windows(sub)
    _add_bench_faults(sub)


def _add_bench_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="the encoder against sentence-transformers and against itself on Ray",
                       description="`embedjob bench encode`: the encoder against sentence-transformers and "
                       "against itself on Ray.")
    p.add_argument("--corpus", default=None,
                   help="Parquet shards to take documents from (default: the shared corpus "
                   "../shared/corpus/mixed-en when present, else data/gensim-corpus)")
    p.add_argument("--limit", type=int, default=2000, help="documents to encode")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--batch-tokens", type=int, default=None, help="token budget per batch (default: encode.batch_tokens)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-pipeline", action="store_true", help="skip (c), the Ray pipeline run")
    p.add_argument("--batching", action="store_true",
                   help="only compare the encoder's packed and padded batches (encode.batching), interleaved")
    p.add_argument("--backends", action="store_true",
                   help="only compare, on CPU, sentence-transformers (default and best configuration) with the "
                   "encoder's torch and OpenVINO backends (encode.backend), interleaved")
    p.add_argument("--rounds", type=int, default=3,
                   help="--batching, --backends and the long-documents comparison: interleaved rounds (the best of each)")
    p.add_argument("--long-documents", choices=("windows", "truncate"), default=None,
                   help="encode.long_documents of the encoder and the pipeline run (default: the job default, "
                   "windows); both modes are also timed on the same documents (tokens encoded, time)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench_static(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("static", help="WordSim-353 of the job's BERT static word vectors beside gensim Word2Vec",
                       description="`embedjob bench static`: WordSim-353 Spearman correlation of the job's BERT "
                       "static word vectors, beside gensim Word2Vec trained on the same tokens, measured in one run.")
    p.add_argument("--corpus", default=None, help=f"Parquet corpus (id, text columns). {SHARED_CORPUS_HELP}")
    p.add_argument("--limit", type=int, default=50000, help="Documents to use (0 = all). Default 50000.")
    p.add_argument("--vectors", metavar="OUTPUT", default=None,
                   help="Score a finished job's output instead of running one (its static/ vectors and tokens/; "
                   "the job's own preprocessing from its manifest).")
    p.add_argument("--output", default=None,
                   help="Job output folder (kept; a rerun reuses committed shards). Default: a temporary folder.")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Job config override, e.g. static.layers=last4 or encode.max_length=128.")
    p.add_argument("--min-count", type=int, default=5, help="min_count of both vocabularies.")
    p.add_argument("--w2v-epochs", type=int, default=5)
    p.add_argument("--w2v-dim", type=int, default=100)
    p.add_argument("--w2v-workers", type=int, default=2)
    p.add_argument("--no-word2vec", action="store_true", help="Skip the Word2Vec baseline.")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")


def _add_bench_word2vec(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("word2vec", help="single-process gensim vs embedjob's Ray Train data-parallel trainer",
                       description="`embedjob bench word2vec`: single-process gensim vs embedjob's Ray Train "
                       "data-parallel trainer, on the same tokens, side by side in one run.")
    p.add_argument("--corpus", default=None, help=f"Parquet corpus with a 'text' column (any URL). {SHARED_CORPUS_HELP}")
    p.add_argument("--storage-option", action="append", default=[], metavar="K=V",
                   help="fsspec option of the corpus (repeatable; value parsed as JSON when possible).")
    p.add_argument("--workers", type=int, default=2, help="Ray workers for embedjob = threads for gensim.")
    p.add_argument("--threads-per-worker", type=int, default=1, help="gensim threads in each Ray worker.")
    p.add_argument("--model", choices=["word2vec", "fasttext"], default="word2vec")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--vector-size", type=int, default=100)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sg", type=int, choices=[0, 1], default=0)
    p.add_argument("--bucket", type=int, default=2_000_000, help="FastText n-gram buckets.")
    p.add_argument("--sync-every", type=float, default=None, help="default: word2vec.sync_every")
    p.add_argument("--ngram-sync-every", type=int, default=None, help="default: word2vec.ngram_sync_every")
    p.add_argument("--sync-mode", choices=["sum", "average"], default="sum",
                   help="How embedjob's workers combine at a sync (see word2vec.sync_mode).")
    p.add_argument("--no-corpus-file", action="store_true", help="embedjob workers train in iterable mode.")
    p.add_argument("--no-share-memory", action="store_true",
                   help="Every embedjob worker keeps its own model and syncs with all_reduce (word2vec.share_memory "
                   "false), as workers on different machines do.")
    p.add_argument("--gensim-mode", choices=["iterable", "corpus_file"], default="iterable",
                   help="How the single-process gensim baseline is fed (its usual iterable mode by default).")
    p.add_argument("--max-docs-per-shard", type=int, default=None, help="Use only the first N docs of each shard.")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "embedjob-bench-tokens"),
                   help="Folder caching the tokenised corpus.")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")


def _add_bench_topics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topics", help="embedjob's topic model beside gensim LdaMulticore: coherence, diversity, time",
                       description="`embedjob bench topics`: embedjob's topic model (ETM by default) beside gensim "
                       "``LdaMulticore`` with the same K on the same dictionary, measured in one run: NPMI and C_V "
                       "coherence (gensim ``CoherenceModel``, top 10 words, the same reference sample of the "
                       "corpus's tokens), topic diversity (top 25) and training wall time.")
    p.add_argument("--corpus", default=None, help=f"corpus URL (Parquet shards with id, text) {SHARED_CORPUS_HELP}")
    p.add_argument("--k", type=int, nargs="+", default=None, help="number of topics (several: one run each; default "
                   "20, with --suite the number of labels of each corpus, clamped to 5..20)")
    p.add_argument("--suite", action="store_true", help="several corpora cut from mixed-en (whole sample, its "
                   "sources, fortunes, kernel docs, KJV, Shakespeare, Austen), each against LdaMulticore with label "
                   "NMI/ARI, duplicate topics and the issue's targets (embedjob.bench.topics_suite)")
    p.add_argument("--corpora", nargs="+", default=None, help="--suite: these corpora only (default: all)")
    p.add_argument("--mixed-docs", type=int, default=None, help="--suite: documents of the 'mixed' corpus "
                   "(default 20000; the whole of mixed-en is 174k)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of the corpus (default: all)")
    p.add_argument("--workdir", default=None, help="folder for tokens, vectors and outputs, reused across runs "
                   "(default: a temporary folder, deleted)")
    p.add_argument("--embeddings", default=None, help="(default: word2vec; --suite: auto, the job's default) "
                   "auto, word2vec (trained here on the same tokens unless "
                   "WORKDIR/word2vec/vectors.bin exists), learned, or a vector file URL")
    p.add_argument("--w2v-dim", type=int, default=None,
                   help="Word2Vec dimensions (default: the job's word2vec.vector_size default)")
    p.add_argument("--w2v-epochs", type=int, default=None,
                   help="Word2Vec epochs (default: the job's word2vec.epochs default)")
    p.add_argument("--lda-passes", type=int, default=None, help="LdaMulticore passes (default: gensim's 1; --suite: "
                   "scaled to the corpus, about 60k documents seen, 1..20)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for both (Ray num_cpus, LDA processes)")
    p.add_argument("--set", action="append", default=[], metavar="topics.KEY=VALUE",
                   help="override a topics setting (value parsed as YAML); repeatable")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per K with seeds topics.seed, +1, ... (both models; topic models vary from seed to "
                   "seed): the summary gives the mean, min and max of each figure")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="recall@10 and queries/s of the ANN document index against exact search",
                       description="`embedjob bench index`: recall@10 of the ANN document index against exact "
                       "search, and the queries/s of each, measured side by side in one run.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vectors", metavar="OUTPUT_URL", help="a finished job output: index its vectors/*.parquet")
    src.add_argument("--corpus", metavar="URL", help="Parquet corpus (text column) to encode here")
    p.add_argument("--limit", type=int, default=None, help="use at most this many documents (--corpus: default 20000)")
    p.add_argument("--cache", default=os.path.join("output", "bench-cache"),
                   help="--corpus: folder caching the encoded vectors (default output/bench-cache)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="--corpus: model (as encode.model)")
    p.add_argument("--kind", default="hnsw", choices=("hnsw", "ivf_pq", "ivf_flat", "flat"))
    p.add_argument("--queries", type=int, default=1000, help="held-out query vectors (default 1000)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="queries per search call (default: all at once)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each search; the fastest counts")
    p.add_argument("--threads", type=int, default=None,
                   help="FAISS OpenMP threads of both timed searches (default: all cores; 1 is steadier on a "
                   "shared machine). The build always uses all cores.")
    p.add_argument("--set", action="append", default=[], metavar="index.KEY=VALUE", help="index config override")
    p.add_argument("--sweep", default=None,
                   help="comma-separated ef_search (hnsw) or nprobe (ivf) values to also measure, e.g. 16,32,64,128")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench_vectors(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vectors", help="bytes per vector and recall@10 of each output.vector_dtype; Lance write cost",
                       description="`embedjob bench vectors`: bytes per stored vector and recall@10 of the job's "
                       "search against float32 exact search for each output.vector_dtype, and the Lance sink's "
                       "write time as a share of encoding the same documents.")
    p.add_argument("--corpus", default=None, help="Parquet corpus (id, text) to encode (default: the shared mixed-en)")
    p.add_argument("--limit", type=int, default=22000, help="documents to encode (default 22000)")
    p.add_argument("--queries", type=int, default=1000, help="held-out query documents (default 1000)")
    p.add_argument("--shard-rows", type=int, default=2000,
                   help="rows per shard (int8 ranges are calibrated per shard; default 2000)")
    p.add_argument("--lance-index", default="ivf_pq", choices=("none", "ivf_pq", "ivf_hnsw_sq"),
                   help="Lance ANN index built on the float32 dataset, with its recall@10 (default ivf_pq)")
    p.add_argument("--cache", default=os.path.join("output", "bench-cache"),
                   help="folder caching the encoded vectors and their encode time (default output/bench-cache)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="model (as encode.model)")
    p.add_argument("--encode-sample", type=int, default=300,
                   help="documents encoded again beside the Lance writes, for a rate under the same load (default "
                   "300; 0: only the cached full encode)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench_windows(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("windows", help="kNN accuracy of labels with whole documents (windows, snapped) vs truncation",
                       description="`embedjob bench windows`: leave-one-out kNN accuracy of the label of long "
                       "documents of the shared corpus, truncated, in windows and in windows snapped to sentences, with tokens, time "
                       "and the share of window boundaries on a sentence boundary.")
    p.add_argument("--corpus", default=None, help="Parquet corpus with text, source and label columns "
                   "(default: the shared mixed-en)")
    p.add_argument("--sources", default="austen,kjv,kernel,shakespeare",
                   help="comma-separated, of austen, kjv, kernel, shakespeare")
    p.add_argument("--limit", type=int, default=300, help="documents sampled per source (default 300)")
    p.add_argument("--k", type=int, default=5, help="neighbours voting (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="model (as encode.model)")
    p.add_argument("--backend", default="torch", choices=("torch", "openvino"), help="as encode.backend")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench_faults(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("faults", help="soak: kill the job's Ray workers, actors and driver N times, rerun, compare",
                       description="`embedjob bench faults`: a multi-shard job (chunks and static vectors on) runs "
                       "once clean, then again while random Ray workers, encoder actors and the driver (SIGKILL or "
                       "SIGTERM) are killed, one per run, rerunning until done; reports kills, runs, exit codes "
                       "and the exactly-once checks against the clean run.")
    p.add_argument("--kills", type=int, default=20, help="kills to make (default 20)")
    p.add_argument("--docs", type=int, default=240, help="documents (of gensim's Lee corpus; default 240)")
    p.add_argument("--shards", type=int, default=6, help="input shards (default 6)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="model (as encode.model)")
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop making kills after this long (default 60)")
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds before a run is counted as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="folder for the corpus, outputs and runs.log (default: a new "
                   "temporary folder, kept)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from embedjob.errors import USER_ERRORS, Interrupted, one_line

    try:
        return args.func(args)
    except Interrupted as e:  # SIGTERM (a spot node reclaimed, `ray job stop`): preempt.py
        from embedjob.preempt import EXIT_INTERRUPTED, resume_hint

        print(f"embedjob: {one_line(str(e))}; {resume_hint(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        print(f"embedjob: error: {_ray_failure_line(e, args.verbose) or one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embedjob: interrupted; committed shards are kept, rerun to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - Ray's own failures as one line; anything else is a bug: raised
        line = _ray_failure_line(e, args.verbose)
        if line is None:
            raise
        print(f"embedjob: error: {line}", file=sys.stderr)
        return 2


def _ray_failure_line(e: BaseException, verbose: bool):
    """One line for a failure of Ray's runtime (ray_errors.py), Ray's traceback first with -v."""
    from embedjob.ray_errors import ray_failure_line

    line = ray_failure_line(e)
    if line is not None and verbose:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    return line


if __name__ == "__main__":
    sys.exit(main())
