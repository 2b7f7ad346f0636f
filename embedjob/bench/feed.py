"""`embedjob bench feed`: can the CPUs around the model feed it? The per-shard stages of a job
(read -> preprocess -> tokenize -> encode -> staged write -> commit) run with a near-free model (a
1-layer, 32-dim random BERT with MiniLM's tokenizer, built offline), so what is measured is the
work around the model, which a GPU host's CPUs must do for every token the GPU encodes.

It reports, for static vectors on and off:

* the pipeline's encoded tokens per CPU-second (``per_core``): the job's own Ray Data pipeline
  (:func:`embedjob.pipeline.run_shard_stages`) over ``--shards`` shards, its CPU time read from
  ``/proc`` for the driver and every process under it (Ray's daemons and workers), so that other
  load on a shared machine does not count;
* the raw fast tokenizer's tokens/s on one core, on the same texts, in the same run (best of
  ``TOKENIZER_ROUNDS`` passes per round);
* feed efficiency: their ratio, with and without the model's own CPU (on a GPU host the model runs
  on the GPU, so ``feed`` leaves its forward pass out, as the encoder actors timed it in the same
  run: ``encoder_model_cpu_s``; ``with model`` keeps it);
* CPU-seconds per million encoded tokens of each part, run in-process, one block after another
  on the same shards: read, gensim preprocess, tokenize, static alignment, window plan, static
  accumulation, model, write, commit; "Ray Data and the rest" is the pipeline's CPU minus them;
* the job's fixed start-up CPU (a run over the first ``STARTUP_DOCS`` documents of one shard: worker
  processes and their imports, the model's load, Ray Data's actors), and the pipeline's CPU per
  token with it taken out (``steady``): what a long backfill pays per token, and so what sizes a
  GPU host's cores;
* that CPU by process (driver, encoder actors, task workers, progress actor, Ray Data's own actors,
  Ray's node daemons; :func:`process_role`), start-up out, and the feed efficiency without Ray's
  daemons and Ray Data's actors, which cost CPU per second rather than per token.

Example::

    embedjob bench feed --shards 4 --static both
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np

from embedjob.bench.corpus import DEFAULT_CORPUS
from embedjob.bench.proc_cpu import TreeCpu, wait_quiet
from embedjob.cluster import init_ray, plan_encoder
from embedjob.config import apply_override, build_config
from embedjob.models import model_fingerprint, resolve_model_path
from embedjob.pipeline import run_shard_stages, shard_stage_hash
from embedjob.stages.encode import resolve_encoder_settings
from embedjob.stages.encode.actor import EncodeActor
from embedjob.stages.encode.windows import plan_for
from embedjob.stages.preprocess import Preprocessor, preprocess_texts
from embedjob.stages.read import discover_shards, read_shard_blocks
from embedjob.stages.static.config import static_actor_settings
from embedjob.stages.write import BlockWriter, commit_shard
from embedjob.storage import Storage, list_shards

logger = logging.getLogger(__name__)

# Documents of the start-up run: the job's fixed CPU (worker processes and their imports, the model's
# load, Ray Data's own actors) over a few blocks, subtracted to give the per-token cost of a long run.
STARTUP_DOCS = 300

PARTS = ("read", "preprocess", "tokenize", "align", "window_plan", "static", "model", "encoder_io", "write",
         "commit")
PART_NAMES = {"read": "read (Parquet)", "preprocess": "gensim preprocess", "tokenize": "tokenize",
              "align": "static alignment (words)", "window_plan": "window plan",
              "static": "static accumulation", "model": "model (1 layer)",
              "encoder_io": "encoder actor Arrow in/out",
              "write": "Arrow/Parquet staged write", "commit": "commit", "rest": "Ray Data and the rest"}


# -- the near-free model ----------------------------------------------------------------------------
def build_feed_model(root: str, dim: int = 32) -> str:
    """A 1-layer, ``dim``-wide random BERT (32 by default: near free) with MiniLM's tokenizer and
    sentence-transformers files (max length 256, mean pooling, normalised), saved offline under
    ``root``. A real model's width (384 for MiniLM) sizes what grows with it: the static vectors'
    sums, their staged parts and the commit's merge."""
    if dim < 2 or dim % 2:
        raise ValueError(f"bench feed: --dim {dim}: an even number of at least 2 (the model has 2 attention heads)")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    minilm = resolve_model_path("all-MiniLM-L6-v2")
    path = os.path.join(root, "feed-model")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=2 * dim, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    for name in ("sentence_bert_config.json", "modules.json", "1_Pooling", "2_Normalize"):
        src = os.path.join(minilm, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(path, name), dirs_exist_ok=True)
        elif os.path.exists(src):
            shutil.copy(src, path)
    with open(os.path.join(path, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    pooling["word_embedding_dimension"] = dim
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump(pooling, f)
    return path


def job_config(input_url: str, output_url: str, model: str, static: bool, overrides: list[str]):
    """The job config the bench runs: defaults, the feed model, static vectors on or off, the rest of
    the corpus-wide stages off (they run after the per-shard stages, not measured here)."""
    d = {"input": {"url": input_url}, "output": {"url": output_url, "overwrite": True},
         "encode": {"model": model, "dtype": "float32", "threads_per_actor": 1},
         "static": {"enabled": static}, "word2vec": {"enabled": False}, "topics": {"enabled": False},
         "index": {"enabled": False}}
    for assignment in overrides:
        apply_override(d, assignment)
    return build_config(d, "bench feed")


# -- the raw tokenizer --------------------------------------------------------------------------------
# Best of this many passes per round: one pass varied 1.2-2.0 CPU-s per million tokens on a shared
# machine, and the efficiency is measured against it (the best pass is the tokenizer's own cost).
TOKENIZER_ROUNDS = 3


def raw_tokenizer_rate(model: str, texts: list[str], rounds: int = 2) -> float:
    """Tokens per CPU-second of the model's fast tokenizer alone (the Rust ``encode_batch``, one
    thread, special tokens added, no truncation), best of ``rounds``."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(model, use_fast=True).backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    best = 0.0
    for _ in range(rounds):
        c0, n = time.thread_time(), 0
        for i in range(0, len(texts), 1000):
            n += sum(len(e.ids) for e in backend.encode_batch(texts[i:i + 1000]))
        best = max(best, n / max(time.thread_time() - c0, 1e-9))
    return best


# -- the parts, in-process ----------------------------------------------------------------------------
class _Clock:
    """CPU seconds per part (this thread's CPU time)."""

    def __init__(self) -> None:
        self.s = dict.fromkeys(PARTS, 0.0)

    def run(self, part: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        c = time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            self.s[part] += time.thread_time() - c

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *a, **kw: self.run(part, fn, *a, **kw)


def part_seconds(cfg, shards, out_url: str) -> tuple[dict[str, float], int, dict[str, Any]]:
    """CPU seconds of each part over ``shards``, in this process, block by block as the pipeline
    cuts them (the encoder takes ``encode.rows_per_call`` rows); the encoded tokens; and the chunk
    cache's counts of the tokenize part (chunks, new ones, restarts; empty when the tokenizer
    cannot use it)."""
    import pyarrow as pa

    inp, clock = cfg.input, _Clock()
    clock.s["hook"] = 0.0
    out = Storage(out_url)
    enc = resolve_encoder_settings(cfg.encode)
    static = static_actor_settings(cfg.static, cfg.encode.model, out) if cfg.static.enabled else None
    pre = Preprocessor(cfg.preprocess, inp.text_column, enc, static, inp.on_empty_text, inp.id_column)
    actor = EncodeActor(enc, cfg.encode.batch_tokens_for("cpu"), cfg.encode.max_batch_docs, 1, static)
    tok = actor.encoder.tokenizer
    encoder = actor.encoder
    encoder.encode_ids = clock.wrap("model", encoder.encode_ids)
    if actor.static is not None:
        acc = actor.static
        acc.hook_for, acc.attach = clock.wrap("static", acc.hook_for), clock.wrap("static", acc.attach)
        acc._hook = clock.wrap("hook", acc._hook)  # inside the model's clock: moved from model to static below
    writer = BlockWriter(out_url, {}, inp.id_column)
    tokens = 0
    for s in shards:
        blocks = list(clock.run("read", lambda: list(read_shard_blocks(s, {}, inp.id_column, inp.text_column,
                                                                    inp.rows_per_block))))
        done = []
        for b in blocks:
            texts = b.column(inp.text_column).to_pylist()
            clock.run("preprocess", preprocess_texts, texts, cfg.preprocess, pre.chain)
            clock.run("tokenize", tok.encode_flat, [t for t in texts if t and t.strip()], words=static is not None)
            c = time.thread_time()
            done.append(pre(b))  # preprocess, tokenize, align: the remainder is the alignment (or columns)
            clock.s["align"] += time.thread_time() - c
        table = pa.concat_tables(done)
        for i in range(0, table.num_rows, cfg.encode.rows_per_call):
            batch = table.slice(i, cfg.encode.rows_per_call)
            ids = [np.asarray(x, dtype=np.int32) for x in batch.column("_input_ids").to_pylist() if x]
            plan = clock.run("window_plan", plan_for, enc, ids, tok.sentence_end_ids)
            tokens += int(plan.n_tokens.sum())
            res = clock.run("encoder_io", actor, batch)
            clock.run("write", writer, res)
        clock.run("commit", commit_shard, out_url, {}, s.key, s.num_rows, inp.on_empty_text, {}, enc.dim,
                  {"vector_dtype": cfg.output.vector_dtype})
    sec = clock.s
    sec["align"] -= sec["preprocess"] + sec["tokenize"]  # what pre() did beyond gensim and the tokenizer
    hook = sec.pop("hook")
    sec["encoder_io"] -= sec["model"] + sec["static"]  # the actor call beyond the encoder and accumulator
    sec["model"] -= sec["window_plan"] + hook  # encode_ids plans the windows again and runs the hook
    sec["static"] += hook
    cache = tok.chunk_cache(static is not None)
    return sec, tokens, dict(cache.stats) if cache is not None else {}


# -- the pipeline, on Ray ----------------------------------------------------------------------------
def pipeline_run(cfg, shards) -> dict[str, Any]:
    """The job's per-shard stages over ``shards`` on Ray: encoded tokens, wall and CPU seconds
    (measured once the process tree is quiet: :func:`wait_quiet`)."""
    out = Storage(cfg.output.url, cfg.output.storage_options)
    encoder = resolve_encoder_settings(cfg.encode)
    encoder.model_fingerprint = model_fingerprint(encoder.model_path)
    plan = plan_encoder(cfg.encode, init_ray(cfg.ray)["resources"], static=cfg.static.enabled)
    settled = wait_quiet()
    t0 = time.time()
    with TreeCpu() as cpu:
        processed, failures, stats = run_shard_stages(cfg, out, shards, encoder, plan, shard_stage_hash(cfg, encoder))
    if failures:
        raise RuntimeError(f"bench feed: shards failed: {failures}")
    return {"encoded_tokens": int(stats["encoded_tokens"]), "documents": int(stats["documents"]),
            "wall_s": round(time.time() - t0, 2), "cpu_s": round(cpu.seconds, 2), "settled_s": round(settled, 1),
            "model_cpu_s": round(float(stats.get("encoder_model_cpu_s", 0.0)), 3), "cpu_by_role": cpu.by_role(),
            **({"encoder_busy": stats["encoder_busy"]} if "encoder_busy" in stats else {})}


def subset_shards(urls: list[str], where: str, n: int, folder: str) -> list[str]:
    """``--where COLUMN=V1,V2``: the rows of all ``urls`` whose COLUMN is one of the values, in
    corpus order, cut into ``n`` Parquet shards of equal size in ``folder``; their paths."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    column, _, values = where.partition("=")
    wanted = [v for v in values.split(",") if v]
    if not column or not wanted:
        raise ValueError(f"bench feed: --where {where!r}: expected COLUMN=V1,V2,...")
    parts = []
    for u in urls:
        t = pq.read_table(u)
        if column not in t.column_names:
            raise ValueError(f"bench feed: --where: shard {u} has no column {column!r} (it has {t.column_names})")
        parts.append(t.filter(pc.is_in(t.column(column).cast(pa.string()), value_set=pa.array(wanted))))
    table = pa.concat_tables(parts)
    if not table.num_rows:
        raise ValueError(f"bench feed: --where {where!r}: no row of the corpus's {len(urls)} shard(s) matches")
    out, step = [], -(-table.num_rows // n)
    for k in range(n):
        piece = table.slice(k * step, step)
        if piece.num_rows:
            out.append(os.path.join(folder, f"part-{k:05d}.parquet"))
            pq.write_table(piece, out[-1])
    logger.info("bench feed: %s: %d rows in %d shard(s)", where, table.num_rows, len(out))
    return out


def input_shards(args: argparse.Namespace, work: str) -> tuple[list[str], str]:
    """The bench's input under ``work``: ``--shards`` shards of ``--corpus`` (links), or the ``--where``
    subset cut into that many; (their paths, the input folder)."""
    corpus = args.corpus or DEFAULT_CORPUS
    inp = os.path.join(work, "input")
    os.makedirs(inp)
    if args.where:
        return subset_shards(list_shards(corpus), args.where, args.shards, inp), inp
    urls = list_shards(corpus)[: args.shards]
    for u in urls:
        os.symlink(os.path.abspath(u), os.path.join(inp, os.path.basename(u)))
    return urls, inp


def run(args: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="embedjob-bench-feed-")
    try:
        urls, inp = input_shards(args, work)
        # one core for the Rust tokenizer, as in the job's workers (init_ray sets it for them): with its
        # thread pool the raw rate would count only the calling thread's CPU
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        model = build_feed_model(work, args.dim)
        modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.static]
        shards = discover_shards(inp, {}, "id", "text")
        import pyarrow.parquet as pq

        small = os.path.join(work, "small")  # the start-up run: the first STARTUP_DOCS documents of one shard
        os.makedirs(small)
        first = pq.read_table(urls[0])
        pq.write_table(first.slice(0, min(STARTUP_DOCS, max(1, first.num_rows // 4))),
                       os.path.join(small, "part-00000.parquet"))
        small_shards = discover_shards(small, {}, "id", "text")

        texts = [t for u in urls for t in pq.read_table(u, columns=["text"]).column("text").to_pylist()
                 if t and t.strip()]
        results: dict[str, Any] = {"shards": len(urls), "documents": len(texts), "rounds": args.rounds, "dim": args.dim,
                                   "modes": {},
                                   **({"where": args.where} if args.where else {})}
        # Ray's worker pool warmed once, not measured: otherwise the first run of each round alone pays
        # for starting Ray's idle workers, which later runs (and a long job) reuse
        pipeline_run(job_config(small, os.path.join(work, "warm-up"), model, True, args.set or []), small_shards)
        for r in range(args.rounds):  # modes interleaved round by round; the tokenizer measured in each
            tok_rate = raw_tokenizer_rate(model, texts, rounds=TOKENIZER_ROUNDS)
            for static in modes:
                key = "static on" if static else "static off"
                cfg = job_config(inp, os.path.join(work, f"out-{key[-3:].strip()}"), model, static, args.set or [])
                pipe = pipeline_run(cfg, shards)
                start = pipeline_run(job_config(small, os.path.join(work, f"small-{key[-3:].strip()}"), model, static,
                                                args.set or []), small_shards)
                pipe["startup"] = {k: start[k] for k in ("encoded_tokens", "cpu_s", "wall_s", "model_cpu_s", "cpu_by_role")}
                parts, tokens, chunks = part_seconds(cfg, shards, os.path.join(work, f"parts-{key[-3:].strip()}"))
                results["modes"].setdefault(key, []).append({**_summary(pipe, parts, tokens, tok_rate),
                                                             "chunk_cache": chunks})
        _report(results, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _summary(pipe: dict[str, Any], parts: dict[str, float], part_tokens: int, tok_rate: float) -> dict[str, Any]:
    """One round of one mode: rates, efficiencies and the per-part table (CPU s per million tokens)."""
    tokens = pipe["encoded_tokens"]
    per_mtok = {k: v / max(part_tokens, 1) * 1e6 for k, v in parts.items()}
    pipe_per_mtok = pipe["cpu_s"] / max(tokens, 1) * 1e6
    per_mtok["rest"] = pipe_per_mtok - sum(per_mtok.values())
    # The model's forward is left out as the encoder actors measured it in this very run (their
    # thread's CPU inside the forward, one torch thread): the in-process "model" part is a separate
    # run, and subtracting it moved the efficiency by up to a third between rounds of the same code.
    def model_cpu(run: dict[str, Any]) -> float:  # the in-process part's rate: an encoder that did not time it
        return run.get("model_cpu_s") or per_mtok["model"] * run["encoded_tokens"] / 1e6

    model_per_mtok = model_cpu(pipe) / max(tokens, 1) * 1e6
    feed_per_mtok = pipe_per_mtok - model_per_mtok
    per_core = tokens / max(pipe["cpu_s"], 1e-9)
    steady = {}
    if "startup" in pipe:  # the job's fixed start-up (workers, model load, Ray Data's actors) taken out
        st = pipe["startup"]
        d_tok = max(tokens - st["encoded_tokens"], 1)
        marginal = (pipe["cpu_s"] - st["cpu_s"]) / d_tok * 1e6
        feed_cpu = (pipe["cpu_s"] - model_cpu(pipe)) - (st["cpu_s"] - model_cpu(st))
        steady = {"startup_cpu_s": st["cpu_s"], "steady_s_per_mtok": round(marginal, 3),
                  "steady_feed_s_per_mtok": round(feed_cpu / d_tok * 1e6, 3),
                  "steady_feed_efficiency": round(d_tok / max(feed_cpu, 1e-9) / tok_rate, 3)}
        if "cpu_by_role" in pipe and "cpu_by_role" in st:  # which processes grow with the tokens
            by_role = {k: (pipe["cpu_by_role"][k] - st["cpu_by_role"].get(k, 0.0)) / d_tok * 1e6
                       for k in pipe["cpu_by_role"]}
            by_role["encoder actors"] -= (model_cpu(pipe) - model_cpu(st)) / d_tok * 1e6  # the model left out
            steady["steady_role_s_per_mtok"] = {k: round(v, 3) for k, v in by_role.items()}
            # every token passes through one encoder actor, whose calls run on one thread: the most one
            # actor can hand a GPU, whatever the CPUs around it (encode.actors_per_gpu)
            steady["actor_max_tokens_per_s"] = round(1e6 / max(by_role["encoder actors"], 1e-9))
            # Ray's node daemons and Ray Data's own actors cost CPU per second, not per token: on this
            # host's few cores they weigh more per token than on a GPU host that moves several times the
            # tokens per second for the same cost
            fixed = by_role["Ray's daemons"] + by_role["Ray Data's actors"]
            steady["steady_feed_efficiency_job_processes"] = round(
                1e6 / max(feed_cpu / d_tok * 1e6 - fixed, 1e-9) / tok_rate, 3)
    return {**pipe, **steady, "per_core": round(per_core), "tokenizer_per_core": round(tok_rate),
            "efficiency_with_model": round(per_core / tok_rate, 3),
            "feed_efficiency": round(1e6 / feed_per_mtok / tok_rate, 3),
            "tokenizer_s_per_mtok": round(1e6 / tok_rate, 3), "pipeline_s_per_mtok": round(pipe_per_mtok, 3),
            "pipeline_model_s_per_mtok": round(model_per_mtok, 3), "feed_s_per_mtok": round(feed_per_mtok, 3),
            "parts_s_per_mtok": {k: round(v, 3) for k, v in per_mtok.items()}}


def _report(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=1))
        return
    print(f"bench feed: {results['shards']} shard(s)"
          f"{' of the rows where ' + results['where'] if 'where' in results else ''}, {results['documents']} documents, "
          f"{results['rounds']} round(s), a {results['dim']}-dim model; CPU seconds of the job's processes (shared machines: other load does not count)")
    for key, rounds in results["modes"].items():
        print(f"\n{key}")
        print("  round  tokens     pipeline tok/s/core  tokenizer tok/s/core  feed efficiency  with model  busy")
        for i, r in enumerate(rounds):
            print(f"  {i:<5}  {r['encoded_tokens']:<9}  {r['per_core']:<19}  {r['tokenizer_per_core']:<20}  "
                  f"{r['feed_efficiency']:<15}  {r['efficiency_with_model']:<10}  {r.get('encoder_busy', '-')}")
        print("  CPU-seconds per million encoded tokens (median of rounds):")
        names = list(rounds[0]["parts_s_per_mtok"])
        for k in names:
            v = float(np.median([r["parts_s_per_mtok"][k] for r in rounds]))
            print(f"    {PART_NAMES.get(k, k):<28} {v:8.3f}")
        print(f"    {'= pipeline':<28} {float(np.median([r['pipeline_s_per_mtok'] for r in rounds])):8.3f}")
        print(f"    {'model, timed in the pipeline':<28} "
              f"{float(np.median([r['pipeline_model_s_per_mtok'] for r in rounds])):8.3f}   "
              f"around it {float(np.median([r['feed_s_per_mtok'] for r in rounds])):.3f}")
        if "steady_s_per_mtok" in rounds[0]:
            med = {k: float(np.median([r[k] for r in rounds]))
                   for k in ("startup_cpu_s", "steady_s_per_mtok", "steady_feed_efficiency")}
            print(f"    {'start-up (CPU s, fixed)':<28} {med['startup_cpu_s']:8.3f}")
            print(f"    {'pipeline, start-up out':<28} {med['steady_s_per_mtok']:8.3f}   "
                  f"around the model {float(np.median([r['steady_feed_s_per_mtok'] for r in rounds])):.3f}, "
                  f"feed efficiency {med['steady_feed_efficiency']:.3f} (rounds: "
                  f"{', '.join(format(r['steady_feed_efficiency'], '.3f') for r in rounds)})")
        if "steady_role_s_per_mtok" in rounds[0]:
            print("  start-up out, by process (CPU s per million tokens, the model left out of the encoder's):")
            for k in rounds[0]["steady_role_s_per_mtok"]:
                v = float(np.median([r["steady_role_s_per_mtok"][k] for r in rounds]))
                print(f"    {k:<28} {v:8.3f}")
            cap = float(np.median([r["actor_max_tokens_per_s"] for r in rounds]))
            print(f"    {'one encoder actor feeds':<28} {cap / 1e6:8.2f}M tokens/s at most (its own thread, the model "
                  "left out: encode.actors_per_gpu)")
            print(f"    {'feed efficiency, Ray out':<28} "
                  f"{float(np.median([r['steady_feed_efficiency_job_processes'] for r in rounds])):8.3f}   "
                  "(Ray's daemons and Ray Data's actors out: a per-second cost)")
        print(f"    {'(tokenizer alone)':<28} {float(np.median([r['tokenizer_s_per_mtok'] for r in rounds])):8.3f}")
        c = rounds[-1].get("chunk_cache") or {}
        print(f"  chunk cache of the in-process tokenize part, over these shards from empty: {c['chunks']} chunks, "
              f"{c['new_chunks']} new ({100 * c['new_chunks'] / max(c['chunks'], 1):.1f}%), {c['resets']} restart(s)"
              if c else "  chunk cache: not used (the model's tokenizer cannot be cut into chunks)")
