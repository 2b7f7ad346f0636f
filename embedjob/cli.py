"""Command line: ``embedjob run JOB.yaml [--set section.key=value ...] [--dry-run] [--force-unlock]`` and the
commands that read a finished job's output (``similar``, ``search``, ``topics``, ``report``), plus
``embedjob bench NAME`` and ``embedjob config`` (every setting with its help text)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional

from embedjob.bench.flags import BENCHES, add_bench_parsers  # the flags only: no bench module is loaded
from embedjob.errors import USER_ERRORS, Interrupted, TopicsError, one_line
from embedjob.layout import REPORT_HTML
from embedjob.preempt import EXIT_INTERRUPTED, resume_hint
from embedjob.ray_errors import ray_failure_line
from embedjob.report import write_report
from embedjob.storage import Storage
from embedjob.supervise import console

logger = logging.getLogger("embedjob")


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

    cfg = load_job(args.job, args.set + (["output.force_unlock=true"] if args.force_unlock else []))
    result = run_job(cfg, dry_run=args.dry_run)  # the sample corpus too, where input.create_sample_if_missing
    if isinstance(result, str):  # --dry-run: what would be read and written
        print(result)
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
    return f"{output_url.rstrip('/')}/{REPORT_HTML}"


def cmd_config(args: argparse.Namespace) -> int:
    from embedjob.config import config_help

    print("\n".join(config_help()))
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
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
    in_opts = None if args.input_storage_option is None else _storage_options(args.input_storage_option)
    where = write_report(Storage(args.output, _storage_options(args.storage_option)), args.o,
                         label_column=args.label_column, input_storage_options=in_opts)
    print(f"embedjob: report written to {where}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # The bench modules import gensim, torch, Ray...: loaded only when a bench runs.
    name = "topics_suite" if args.bench == "topics" and getattr(args, "suite", False) else args.bench
    name = "feed_width" if name == "feed" and getattr(args, "widths", None) else name
    return int(importlib.import_module(f"embedjob.bench.{name}").run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedjob", description="Distributed batch embedding job on Ray: run a job, read its outputs, benchmark.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job spec on local Ray or the cluster at RAY_ADDRESS",
                       epilog="exit codes: 0 success; 2 an error, as one line (config, input, model, lease, a failed "
                       "stage, or Ray's own runtime failing, also when Ray ends the driver process from C++; -v adds Ray's "
                       "traceback or log); 3 some shards failed "
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
    add_bench_parsers(b.add_subparsers(dest="bench", metavar="NAME", required=True))
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """The ``embedjob`` command. Called with no arguments (the console command, ``python -m embedjob``),
    ``embedjob run`` runs its driver in a child process under a supervising parent (supervise.py);
    ``main([...])`` runs in this process."""
    if argv is None:
        return console(_main, sys.argv[1:])
    return _main(argv)


def _main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except Interrupted as e:  # SIGTERM (a spot node reclaimed, `ray job stop`): preempt.py
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
    line = ray_failure_line(e)
    if line is not None and verbose:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    return line


if __name__ == "__main__":
    sys.exit(main())
