"""`embedjob bench feed --widths 32,384,768`: what the static word vectors cost around the model at
each model width. The feed model (:func:`embedjob.bench.feed.build_feed_model`) is built at each
width, and the per-shard parts run in-process (:func:`embedjob.bench.feed.part_seconds`) with
static vectors on and off, interleaved round by round.

The Ray pipeline is not run. On CPU a real width's forward is 10-40 times the work around it, so
the pipeline's per-process figures would mostly carry per-second costs of a longer job, which a
GPU host does not pay. The in-process parts are the work each token brings, the model left out.

It reports, per width, CPU-seconds per million encoded tokens of each part, their total around
the model, and the static vectors' extra (on minus off). The static vectors' sums, staged parts and
commit merge are ``dim`` floats per (call, row run, word). So it also fits the extra's growth per
dimension (least squares over the widths), for the whole job and for the encoder actor's own
thread (static accumulation and Arrow in/out), the slopes :func:`embedjob.stages.encode.busy.feed_plan`
adds per dimension above 32.

Example::

    embedjob bench feed --widths 32,384 --shards 1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from embedjob.bench.feed import PART_NAMES, build_feed_model, input_shards, job_config, part_seconds
from embedjob.stages.read import discover_shards

ACTOR_PARTS = ("static", "encoder_io")  # what runs on the encoder actor's thread, the model left out


def run(args: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="embedjob-bench-feed-widths-")
    try:
        urls, inp = input_shards(args, work)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core for the Rust tokenizer, as in the job
        models = {dim: build_feed_model(os.path.join(work, f"model-{dim}"), dim) for dim in args.widths}
        shards = discover_shards(inp, {}, "id", "text")
        runs: dict[str, list[dict[str, float]]] = {}
        for r in range(args.rounds):  # widths and modes interleaved in each round
            for dim, model in models.items():
                for static in (True, False):
                    key = f"{dim} {'on' if static else 'off'}"
                    out = os.path.join(work, f"out-{r}-{dim}-{int(static)}")
                    cfg = job_config(inp, out, model, static, args.set or [])
                    sec, tokens, _ = part_seconds(cfg, shards, os.path.join(work, f"parts-{r}-{dim}-{int(static)}"))
                    runs.setdefault(key, []).append({k: v / max(tokens, 1) * 1e6 for k, v in sec.items()})
                    shutil.rmtree(out, ignore_errors=True)
        results = width_summary(runs, list(args.widths))
        results.update({"shards": len(urls), "rounds": args.rounds, **({"where": args.where} if args.where else {})})
        _report(results, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def width_summary(runs: dict[str, list[dict[str, float]]], widths: list[int]) -> dict[str, Any]:
    """Medians over rounds of each "<dim> on|off" run's parts (CPU-s per million tokens), the total
    around the model, the static vectors' extra per width (the whole job's, and the encoder actor's
    thread's), and the extras' least-squares slopes per dimension (None with one width)."""
    med = {key: {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]} for key, rounds in runs.items()}
    around = {key: sum(v for k, v in parts.items() if k != "model") for key, parts in med.items()}
    extra = {dim: around[f"{dim} on"] - around[f"{dim} off"] for dim in widths}
    actor = {dim: sum(med[f"{dim} on"][k] - med[f"{dim} off"][k] for k in ACTOR_PARTS) for dim in widths}

    def slope(values: dict[int, float]):
        if len(set(widths)) < 2:
            return None
        return float(np.polyfit(np.array(widths, float), np.array([values[d] for d in widths]), 1)[0])

    return {"widths": widths, "parts_s_per_mtok": med, "around_model_s_per_mtok": around,
            "static_extra_s_per_mtok": extra, "static_actor_extra_s_per_mtok": actor,
            "static_extra_per_dim": slope(extra), "static_actor_extra_per_dim": slope(actor)}


def _report(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=1))
        return
    widths, med = results["widths"], results["parts_s_per_mtok"]
    keys = [f"{d} {m}" for d in widths for m in ("on", "off")]
    print(f"bench feed --widths: {results['shards']} shard(s)"
          f"{' of the rows where ' + results['where'] if 'where' in results else ''}, {results['rounds']} round(s); "
          "the per-shard parts in-process (no Ray pipeline), static vectors on and off at each model width")
    print("CPU-seconds per million encoded tokens (median of rounds); columns: width, static vectors")
    print(f"  {'':<28}" + "".join(f"{k:>11}" for k in keys))
    for part in med[keys[0]]:
        print(f"  {PART_NAMES.get(part, part):<28}" + "".join(f"{med[k][part]:11.3f}" for k in keys))
    print(f"  {'= around the model':<28}" + "".join(f"{results['around_model_s_per_mtok'][k]:11.3f}" for k in keys))
    for dim in widths:
        print(f"  static vectors' extra at {dim} dims: {results['static_extra_s_per_mtok'][dim]:.3f} "
              f"(the encoder actor's thread: {results['static_actor_extra_s_per_mtok'][dim]:.3f})")
    if results["static_extra_per_dim"] is not None:
        print(f"  growth per dimension: {results['static_extra_per_dim']:.5f} CPU-s per million tokens "
              f"(the encoder actor's thread: {results['static_actor_extra_per_dim']:.5f})")
