"""Preemption: `embedjob run` sent SIGTERM mid-encode (what a spot node's shutdown or `ray job stop`
sends) commits the shards already written, writes the manifest as interrupted, exits 75 with one
line saying how to resume, and a rerun continues where it stopped (every id exactly once)."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from embedjob.pipeline import run_job
from embedjob.preempt import EXIT_INTERRUPTED
from tests.conftest import ONLY_SHARD_STAGES, SAMPLE_TEXTS, write_shards
from tests.helpers import small_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_commits_what_is_done_exits_75_and_a_rerun_continues(ray_local, tmp_path, tiny_model):
    texts = [f"{t} number {i}" for i in range(40) for t in SAMPLE_TEXTS[:4]]  # 160 docs
    ids = write_shards(tmp_path / "in", texts, n_shards=8)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"url": str(tmp_path / "in"), "rows_per_block": 4},
        "output": {"url": str(tmp_path / "out")},
        "encode": {"model": tiny_model, "dtype": "float32", "rows_per_call": 4, "actors": 1}, **ONLY_SHARD_STAGES,
        "ray": {"num_cpus": 2},
    }))
    env = {**os.environ, "RAY_ADDRESS": "", "EMBEDJOB_DEBUG_ENCODE_DELAY": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    done_dir = tmp_path / "out" / "_done"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if done_dir.exists() and len(list(done_dir.glob("part-*.json"))) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("job ended before SIGTERM: " + proc.stderr.read()[-2000:])
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the driver only, as `ray job stop` or a node's shutdown does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("embedjob: interrupted by SIGTERM") and "rerun the same command" in last, err[-3000:]
    assert f"embedjob run {spec}" in last
    assert "Traceback" not in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    committed = sorted(p.stem for p in done_dir.glob("part-*.json"))
    assert manifest["status"] == "interrupted"
    assert sorted(k for k, v in manifest["shards"].items() if v["status"] == "done") == committed
    assert 2 <= len(committed) < 8 and manifest["totals"]["interrupted"] == 8 - len(committed)
    assert not (tmp_path / "out" / "_lease.json").exists()  # released: the rerun starts at once

    res = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, input={"rows_per_block": 4},
                            encode={"rows_per_call": 4, "actors": 1}))
    status = {k: v["status"] for k, v in res.manifest["shards"].items()}
    assert sorted(k for k, v in status.items() if v == "skipped-unchanged") == committed
    assert sorted(k for k, v in status.items() if v == "done") == sorted(set(status) - set(committed))
    got = pq.read_table(tmp_path / "out" / "vectors", columns=["id"]).column("id").to_pylist()
    assert len(got) == len(ids) and sorted(got) == sorted(ids)  # every row exactly once


@pytest.mark.slow  # two job starts (~45 s on the loaded 2-core machine); the soak (bench faults) meets this case too
def test_sigterm_while_ray_starts_exits_75_with_one_line(tmp_path, tiny_model):
    """SIGTERM while ``ray.init`` runs (Ray's own handler turns it into ``sys.exit(15)``) is an interrupted
    run too: exit 75, the one line, nothing written; the rerun does the whole job."""
    from embedjob.bench.faults import descendant_processes

    texts = [f"{t} number {i}" for i in range(4) for t in SAMPLE_TEXTS[:4]]
    ids = write_shards(tmp_path / "in", texts, n_shards=2)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")},
        "encode": {"model": tiny_model, "dtype": "float32", "actors": 1}, **ONLY_SHARD_STAGES,
        "ray": {"num_cpus": 2},
    }))
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # ray.init has started Ray's GCS: it is mid-start
            if any("gcs_server" in c for _, c in descendant_processes(proc.pid)):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before Ray started: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what a driver stopped mid-start may leave of its Ray
            except ProcessLookupError:
                pass
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("embedjob: interrupted by SIGTERM") and "rerun the same command" in last, err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "_done").exists() or not list((tmp_path / "out" / "_done").glob("part-*.json"))
    rerun = subprocess.run([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got = pq.read_table(tmp_path / "out" / "vectors", columns=["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids)
