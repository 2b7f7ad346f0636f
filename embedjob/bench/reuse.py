"""`embedjob bench reuse`: what a re-partitioned corpus costs a rerun with ``output.reuse: auto``.

The job runs on ``--shards`` shards of a corpus (``--limit`` documents of each, all by default),
then the same documents are cut into ``--into`` shards (contiguous cuts, as a lake's compaction
or split writes them) and the job runs again on the same output. Ray is started once, before both
runs, so neither pays for it. Printed: each run's wall time and CPU-seconds (this process and every
process under it: Ray's workers), documents encoded and reused, the lookup's time, and the
rerun's share of the first run's time. Per-shard stages and static word vectors (on, as in the job's
defaults; ``--no-static`` turns them off); Word2Vec, topics and index off.

Example::

    embedjob bench reuse --shards 4 --into 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.bench.corpus import DEFAULT_CORPUS
from embedjob.bench.proc_cpu import TreeCpu
from embedjob.config import build_config
from embedjob.pipeline import run_job

logger = logging.getLogger(__name__)


def write_cuts(table: pa.Table, folder: str, n: int) -> None:
    """``table`` cut into ``n`` contiguous Parquet shards under ``folder`` (its old files go)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    bounds = np.linspace(0, table.num_rows, n + 1).astype(int)
    for s in range(n):
        pq.write_table(table.slice(bounds[s], bounds[s + 1] - bounds[s]), os.path.join(folder, f"part-{s:05d}.parquet"))


def _corpus(path: str, shards: int, limit: int | None) -> pa.Table:
    files = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))[:shards]
    parts = []
    for f in files:
        t = pq.read_table(os.path.join(path, f), columns=["id", "text"])
        parts.append(t.slice(0, limit) if limit else t)
    return pa.concat_tables(parts)


def _run(data: dict[str, Any]) -> dict[str, Any]:
    t0 = time.time()
    with TreeCpu() as cpu:
        res = run_job(build_config(data))
    docs = res.manifest["totals"]["documents"] or {}
    return {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(cpu.seconds, 2), **docs,
            "lookup_seconds": res.manifest["stages"].get("reuse", {}).get("lookup_seconds")}


def run(args: argparse.Namespace) -> int:
    import ray

    work = args.workdir or tempfile.mkdtemp(prefix="bench-reuse-")
    table = _corpus(args.corpus or DEFAULT_CORPUS, args.shards, args.limit)
    inp, out = os.path.join(work, "in"), os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    data: dict[str, Any] = {"input": {"url": inp}, "output": {"url": out},
                            **{k: {"enabled": False} for k in ("word2vec", "topics", "index")},
                            "static": {"enabled": not args.no_static},
                            "encode": {"model": args.model, "dtype": "float32"}, "ray": {"num_cpus": args.cpus}}
    if not ray.is_initialized():
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    write_cuts(table, inp, args.shards)
    first = _run(data)
    write_cuts(table, inp, args.into)
    second = _run(data)
    result = {"documents": table.num_rows, "shards": args.shards, "into": args.into, "model": args.model,
              "static": not args.no_static,
              "first": first, "rerun": second, "rerun_share_of_first": round(second["seconds"] / first["seconds"], 4),
              "rerun_cpu_share_of_first": round(second["cpu_seconds"] / max(first["cpu_seconds"], 1e-9), 4),
              "workdir": work}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{table.num_rows} documents, {args.shards} shards -> {args.into} ({args.model})")
        for name in ("first", "rerun"):
            r = result[name]
            print(f"{name:>6}: {r['seconds']:8.1f} s wall, {r['cpu_seconds']:8.1f} CPU-s, "
                  f"encoded {r.get('encoded')}, reused {r.get('reused')}")
        print(f"rerun / first: {result['rerun_share_of_first']:.1%} wall, {result['rerun_cpu_share_of_first']:.1%} CPU")
    return 0
