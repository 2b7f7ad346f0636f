"""`embedjob bench faults`: a soak of kills against a real job, compared with a clean run.

A multi-shard job with chunks (``encode.write_chunks``, short windows) and static word vectors on
runs once undisturbed (the reference), then again on another output while the soak kills, at
random moments, one of the job's own processes per run: the encoder actor, another Ray worker
(read, preprocess, write or commit task, the progress actor), the local raylet (Ray's core worker
then ends the driver from C++, which ``embedjob run``'s supervising parent reports), the command
with SIGKILL (its process group: the supervising parent, and with it the driver and its local Ray,
as a lost node does), or the command with SIGTERM (preemption, forwarded to the driver). After each run it
reruns; once ``--kills`` kills are spent it reruns undisturbed until a run ends 0. Every run's exit
code is recorded (0, 2, 3, 75 interrupted, or ``killed``), and the output is compared with the
reference: every id exactly once, vectors equal, every chunk exactly once and equal, static word
vectors equal. Prints one JSON object with ``--json``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from embedjob.bench.proc_cpu import descendants, process_cmdline
from embedjob.models import resolve_model_path
from embedjob.sample_corpus import _lee_docs
from embedjob.wordvectors import load_job_vectors

logger = logging.getLogger(__name__)

TARGETS = ("encoder-actor", "ray-worker", "raylet", "driver-sigkill", "driver-sigterm")
ALLOWED_EXITS = {0, 2, 3, 75}


def descendant_processes(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``root``."""
    return [(pid, process_cmdline(pid)) for pid in descendants(root)]


def _victim(driver: int, target: str) -> Optional[tuple[int, str]]:
    """(pid, command line) of a process of ``target``'s kind under ``driver``, if one runs now."""
    procs = descendant_processes(driver)
    if target == "encoder-actor":
        found = [(p, c) for p, c in procs if "EncodeActor" in c]
    elif target == "raylet":  # Ray's core worker then ends the driver from C++ (exit 1): supervise.py's case
        found = [(p, c) for p, c in procs if "raylet/raylet" in c.split(" ", 1)[0]]
    else:  # any other Ray worker process of this job
        found = [(p, c) for p, c in procs if c.startswith("ray::") and "EncodeActor" not in c and "IDLE" not in c]
    return random.choice(found) if found else None


def _child_groups(pid: int) -> set[int]:
    """Process groups of everything under ``pid`` (the supervised driver leads its own, and the
    local Ray it starts may lead others)."""
    groups = set()
    for child, _ in descendant_processes(pid):
        try:
            groups.add(os.getpgid(child))
        except ProcessLookupError:
            pass
    return groups - {os.getpgrp()}  # never this process's own group


def _build_corpus(folder: str, docs: int, shards: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _lee_docs()[:docs]
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        part = rows[s::shards]
        pq.write_table(pa.table({"id": [r["id"] for r in part], "text": [r["text"] for r in part]}),
                       os.path.join(folder, f"part-{s:05d}.parquet"))
    return len(rows)


def _spec(workdir: str, corpus: str, model: str) -> str:
    spec = {"input": {"url": corpus, "rows_per_block": 8},
            "encode": {"model": model, "dtype": "float32", "rows_per_call": 8, "actors": 1, "max_length": 48,
                       "window_overlap": 8, "write_chunks": True},
            "static": {"enabled": True, "min_count": 1},
            "word2vec": {"enabled": False}, "topics": {"enabled": False}, "index": {"enabled": False},
            "ray": {"num_cpus": 2}}
    path = os.path.join(workdir, "job.yaml")
    with open(path, "w") as f:
        json.dump(spec, f)
    return path


def _run(spec: str, output: str, *, overwrite: bool, kill: Optional[tuple[str, float]], timeout: float,
         log) -> dict[str, Any]:
    """One `embedjob run`; ``kill`` = (target, seconds after start). Returns what happened."""
    env = {**os.environ, "RAY_ADDRESS": "", "EMBEDJOB_DEBUG_ENCODE_DELAY": "0.05"}
    args = [sys.executable, "-m", "embedjob", "run", spec, "--set", f"output.url={output}",
            "--set", f"output.overwrite={'true' if overwrite else 'false'}", "--set", "output.lease_timeout_s=20"]
    t0 = time.time()
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)
    done: dict[str, Any] = {"kill": None}
    groups = {proc.pid}  # `embedjob run`'s process group, and its driver's own (supervise.py)
    looked = 0.0
    while proc.poll() is None and time.time() - t0 < timeout:
        if time.time() - t0 > 1 and time.time() - looked > 2:  # the driver's group, and what Ray starts later
            groups |= _child_groups(proc.pid)
            looked = time.time()
        if kill is not None and done["kill"] is None and time.time() - t0 >= kill[1]:
            target = kill[0]
            if target == "driver-sigkill":
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, as a lost head node
                done["kill"] = target
            elif target == "driver-sigterm":
                proc.send_signal(signal.SIGTERM)
                done["kill"] = target
            else:
                victim = _victim(proc.pid, target)
                if victim is not None:
                    try:
                        os.kill(victim[0], signal.SIGKILL)
                        done["kill"] = target
                        done["victim"] = victim[1].strip()[:80]  # which worker: read, write, progress, ...
                    except ProcessLookupError:
                        pass
        time.sleep(0.05)
    timed_out = proc.poll() is None
    if timed_out:
        groups |= _child_groups(proc.pid)  # what started since the first look
    for g in sorted(groups):  # what the driver left behind (a killed driver's Ray), or all of a run timed out
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    done["exit"] = "timeout" if timed_out else "killed" if proc.returncode < 0 else proc.returncode
    done["seconds"] = round(time.time() - t0, 1)
    return done


def compare(clean: str, faulty: str) -> dict[str, Any]:
    """Exactly-once and equality checks of ``faulty``'s outputs against ``clean``'s."""
    import numpy as np
    import pyarrow.parquet as pq

    def vectors(out: str, folder: str, key: tuple[str, ...]):
        t = pq.read_table(os.path.join(out, folder))
        keys = list(zip(*(t.column(k).to_pylist() for k in key)))
        vec = np.asarray(t.column("vector").to_pylist(), dtype=np.float32)
        return keys, vec

    checks: dict[str, Any] = {}
    for folder, key in (("vectors", ("id",)), ("chunks", ("id", "chunk"))):
        ka, va = vectors(clean, folder, key)
        kb, vb = vectors(faulty, folder, key)
        once = len(kb) == len(set(kb)) and sorted(kb) == sorted(ka)
        same = False
        if once:
            order_a = {k: i for i, k in enumerate(ka)}
            idx = np.array([order_a[k] for k in kb])
            same = bool(np.allclose(vb, va[idx], atol=1e-4))
        checks[folder] = {"rows": len(kb), "clean_rows": len(ka), "exactly_once": once, "equal": same}
    sa, sb = load_job_vectors(clean, None, "bert"), load_job_vectors(faulty, None, "bert")
    words = sorted(sa.key_to_index)
    same_words = words == sorted(sb.key_to_index)
    checks["static"] = {"words": len(sb.key_to_index), "same_words": same_words,
                        "equal": bool(same_words and np.allclose(sb[words], sa[words], atol=1e-4))}
    checks["ok"] = all(c["exactly_once"] and c["equal"] for c in (checks["vectors"], checks["chunks"])) \
        and checks["static"]["equal"]
    return checks


def run(args: argparse.Namespace) -> int:
    random.seed(args.seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="embedjob-soak-")
    corpus = os.path.join(workdir, "in")
    docs = _build_corpus(corpus, args.docs, args.shards)
    spec = _spec(workdir, corpus, resolve_model_path(args.model))
    log = open(os.path.join(workdir, "runs.log"), "ab")
    t_end = time.time() + args.max_minutes * 60
    clean = _run(spec, os.path.join(workdir, "clean"), overwrite=True, kill=None, timeout=args.run_timeout, log=log)
    if clean["exit"] != 0:
        print(f"bench faults: the clean run ended {clean['exit']} (see {workdir}/runs.log)", file=sys.stderr)
        return 1
    typical = clean["seconds"]
    faulty = os.path.join(workdir, "faulty")
    runs: list[dict[str, Any]] = []
    kills, complete = 0, False
    while kills < args.kills and time.time() < t_end:
        target = random.choice(TARGETS)
        at = random.uniform(0.2, 0.75) * typical  # a rerun has fewer shards left: earlier kills land more often
        r = _run(spec, faulty, overwrite=complete, kill=(target, at), timeout=args.run_timeout, log=log)
        r["target"] = target
        runs.append(r)
        kills += r["kill"] is not None
        complete = r["exit"] == 0  # a finished output: the next run recomputes it all, to be killed again
        if complete and r["kill"] is None:  # a whole run undisturbed: kill the next ones within its length
            typical = r["seconds"]  # (the clean run's length misleads once the machine's load changes)
        logger.info("soak run %d: %s at %.0fs -> exit %s (%d/%d kills)", len(runs), target, at, r["exit"], kills,
                    args.kills)
        with open(os.path.join(workdir, "soak-runs.json"), "w") as f:  # so far, should the soak be stopped
            json.dump(runs, f)
    final = None
    for _ in range(5):  # undisturbed until done
        final = _run(spec, faulty, overwrite=False, kill=None, timeout=args.run_timeout, log=log)
        runs.append({**final, "target": None})
        if final["exit"] == 0:
            break
    checks = compare(os.path.join(workdir, "clean"), faulty) if final and final["exit"] == 0 else {"ok": False}
    exits = [r["exit"] for r in runs]
    result = {"docs": docs, "shards": args.shards, "kills": kills, "runs": len(runs),
              "kills_by_target": {t: sum(1 for r in runs if r.get("kill") == t) for t in TARGETS},
              "exit_codes": {str(e): exits.count(e) for e in sorted(set(exits), key=str)},
              "unexpected_exits": [e for e in exits if e not in ALLOWED_EXITS and e != "killed"],
              "checks": checks, "clean_run_seconds": typical, "workdir": workdir,
              "runs_detail": runs}
    result["ok"] = bool(checks.get("ok")) and not result["unexpected_exits"] and kills >= args.kills
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"bench faults: {kills} kills over {len(runs)} runs; exit codes {result['exit_codes']}; "
              f"vectors {checks.get('vectors')}; chunks {checks.get('chunks')}; static {checks.get('static')}; "
              f"{'OK' if result['ok'] else 'FAILED'}")
    return 0 if result["ok"] else 1
