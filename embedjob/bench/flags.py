"""The flags of every `embedjob bench NAME` (argparse sub-parsers, built by :func:`add_bench_parsers`
for the CLI). Importing this module loads no bench module and no heavy library: each bench's
``run(args)`` is imported only when that bench runs (``cli.cmd_bench``)."""

from __future__ import annotations

import argparse
import os
import tempfile

BENCHES = ("encode", "static", "word2vec", "topics", "index", "vectors", "windows", "dedup", "feed", "faults", "reuse")

# The benchmarks' flags. Defaults that live in the bench modules (the shared corpus's path) or in a
# stage's config are None here and resolved by the bench's run(args): importing them would load gensim.
SHARED_CORPUS_HELP = "(default: the shared corpus, ../shared/corpus/mixed-en beside the repository)"


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    """One sub-parser per benchmark (``embedjob bench NAME --help``)."""
    _add_bench_encode(sub)
    _add_bench_static(sub)
    _add_bench_word2vec(sub)
    _add_bench_topics(sub)
    _add_bench_index(sub)
    _add_bench_vectors(sub)
    _add_bench_windows(sub)
    _add_bench_dedup(sub)
    _add_bench_feed(sub)
    _add_bench_faults(sub)
    _add_bench_reuse(sub)


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
                   help="rows per shard (default 2000)")
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


def _add_bench_dedup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="recall, precision, seconds and peak memory of the dedup stage against documents",
                       description="`embedjob bench dedup`: the dedup stage on 20k, 87k and all vectors of a corpus: "
                       "recall and precision against brute force on sampled documents, seconds and peak memory.")
    p.add_argument("--vectors", metavar="OUTPUT_URL", help="a finished job output: its vectors/*.parquet")
    p.add_argument("--corpus", default=None, help="Parquet corpus (id, text) to encode " + SHARED_CORPUS_HELP)
    p.add_argument("--encode", default="minilm", choices=("minilm", "token-mean"),
                   help="--corpus: 'minilm' (the model, truncated to --max-length tokens) or 'token-mean' (the mean "
                   "of the model's input word-piece embeddings: seconds for the whole corpus)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per document (default 32 minilm, 128 token-mean)")
    p.add_argument("--backend", default="openvino", choices=("torch", "openvino"), help="--encode minilm: as encode.backend")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="model (as encode.model)")
    p.add_argument("--cache", default=os.path.join("output", "bench-cache"),
                   help="folder caching the encoded vectors, shard by shard (default output/bench-cache)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many documents")
    p.add_argument("--sizes", default=None, help="comma-separated document counts (default 20000,87000,all)")
    p.add_argument("--modes", default="auto", help="comma-separated dedup.mode values to run at each size "
                   "(auto, exact, partitioned; default auto)")
    p.add_argument("--threshold", type=float, default=0.9, help="dedup.threshold (default 0.9)")
    p.add_argument("--queries", type=int, default=2000, help="documents sampled for the brute-force truth (default 2000)")
    p.add_argument("--shard-rows", type=int, default=10900, help="rows per vector shard written (default 10900)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="dedup.KEY=VALUE", help="dedup config override")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench_feed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("feed", help="can the CPUs feed the encoder: pipeline vs raw tokenizer tokens/s, CPU per part",
                       description="`embedjob bench feed`: the job's per-shard stages with a near-free model (1 layer, "
                       "32 dims, MiniLM's tokenizer) over N shards: encoded tokens per CPU-second against the raw fast "
                       "tokenizer's on one core (feed efficiency), and CPU-seconds per million tokens of each part.")
    p.add_argument("--corpus", default=None, help="Parquet corpus with id and text columns (default: the shared mixed-en)")
    p.add_argument("--shards", type=int, default=4, help="shards of the corpus to run (default 4)")
    p.add_argument("--static", default="both", choices=("both", "on", "off"), help="static word vectors (default both)")
    p.add_argument("--where", default=None, metavar="COLUMN=V1,V2,...",
                   help="a labelled subset: the rows of all the corpus's shards whose COLUMN is one of the values "
                   "(e.g. source=gcide_entries,dslabs_tweets), cut into --shards shards of equal size")
    p.add_argument("--rounds", type=int, default=2, help="rounds, the modes interleaved in each (default 2)")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--dim", type=_model_width, default=32,
                       help="the model's width (default 32: near free); a real model's (384: MiniLM) sizes the static "
                       "vectors' sums, staged parts and commit merge, which grow with it")
    width.add_argument("--widths", type=_model_widths, default=None, metavar="D1,D2,...",
                       help="instead of the pipeline run: the per-shard parts in-process, static vectors on and off, at "
                       "each of these model widths (e.g. 32,384,768), and the static vectors' extra CPU per dimension")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="job config override (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _model_widths(text: str) -> list[int]:
    """``--widths``: one or more distinct widths, each as ``--dim``."""
    widths = [_model_width(w.strip()) for w in text.split(",") if w.strip()]
    if not widths or len(set(widths)) != len(widths):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct even widths, comma-separated (e.g. 32,384)")
    return widths


def _model_width(text: str) -> int:
    """``--dim``: an even width of at least 2 (the feed model has 2 attention heads)."""
    try:
        dim = int(text)
    except ValueError:
        dim = 0
    if dim < 2 or dim % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: an even number of at least 2 (the model has 2 attention heads)")
    return dim


def _add_bench_faults(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("faults", help="soak: kill the job's Ray workers, actors and driver N times, rerun, compare",
                       description="`embedjob bench faults`: a multi-shard job (chunks and static vectors on) runs "
                       "once clean, then again while random Ray workers, encoder actors, the raylet and the driver (SIGKILL or "
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


def _add_bench_reuse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reuse", help="a re-partitioned corpus rerun with output.reuse: time against the first run",
                       description="`embedjob bench reuse`: the job on N shards of a corpus, then the same documents "
                       "cut into M shards and the job again on the same output: each run's time and CPU-seconds, "
                       "documents encoded and reused, the rerun's share of the first run's time.")
    p.add_argument("--corpus", default=None, help=f"Parquet shards with id and text {SHARED_CORPUS_HELP}")
    p.add_argument("--shards", type=int, default=4, help="shards of the corpus for the first run (default 4)")
    p.add_argument("--into", type=int, default=8, help="shards the same documents are cut into for the rerun (default 8)")
    p.add_argument("--limit", type=int, default=None, help="documents taken from each shard (default: all)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="model (as encode.model)")
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs (default 2)")
    p.add_argument("--workdir", default=None, help="folder for the shards and the output (default: a new temporary one)")
    p.add_argument("--no-static", action="store_true",
                   help="static word vectors off (default on, as in the job: the rerun carries the old shards' parts)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
