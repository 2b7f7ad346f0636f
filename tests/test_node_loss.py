"""A node lost mid-encode on a real two-node Ray cluster (tests/test_cluster.py's LocalRayCluster):
the worker node's raylet is killed while an encoder actor on it is mid-call; the job finishes on the
head node with every id exactly once, and the manifest and report count the lost node and the
retried block."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from embedjob.bench.faults import descendant_processes
from tests.conftest import ONLY_SHARD_STAGES, SAMPLE_TEXTS, write_shards
from tests.test_cluster import start_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def two_nodes(tmp_path):
    # encoder calls slow enough to be caught mid-block, each call's start recorded by pid (debug.py);
    # a dead node noticed within seconds
    cluster = start_cluster([("worker", 2, {})], {"EMBEDJOB_DEBUG_ENCODE_DELAY": "1.0",
                                                  "EMBEDJOB_DEBUG_ENCODE_CALLS_DIR": str(tmp_path / "calls"),
                                                  "RAY_health_check_period_ms": "1000",
                                                  "RAY_health_check_failure_threshold": "3"})
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_worker_node_lost_mid_encode_job_finishes_on_the_head(two_nodes, tmp_path, tiny_model):
    cluster = two_nodes
    texts = [f"{t} number {i}" for i in range(10) for t in SAMPLE_TEXTS[:6]]  # 60 docs
    ids = write_shards(tmp_path / "in", texts, n_shards=4)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"url": str(tmp_path / "in"), "rows_per_block": 4},
        "output": {"url": str(tmp_path / "out")},
        "encode": {"model": tiny_model, "dtype": "float32", "rows_per_call": 4, "actors": 2,
                   "cpus_per_actor": 0.5, "threads_per_actor": 1}, **ONLY_SHARD_STAGES,
    }))
    calls_dir = tmp_path / "calls"
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    worker_start = cluster.procs[1][0].pid
    killed = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and killed is None:
            if proc.poll() is not None:
                pytest.fail("job ended before the node was lost: " + proc.stderr.read()[-3000:])
            below = descendant_processes(worker_start)
            raylets = [p for p, c in below if c.split(" ")[0].endswith("/raylet")]
            working = [p for p, c in below if "EncodeActor" in c]
            calls = {int(f.name.split("-")[0]) for f in calls_dir.iterdir()} if calls_dir.exists() else set()
            if raylets and calls & set(working):  # an actor of the worker node is mid-call (1 s each)
                os.kill(raylets[0], signal.SIGKILL)  # the node's raylet: its workers and actors go with it
                killed = raylets[0]
            time.sleep(0.1)
        assert killed is not None, "no encoder actor ran on the worker node"
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == 0, err[-5000:]
    got = pq.read_table(tmp_path / "out" / "vectors", columns=["id"]).column("id").to_pylist()
    assert len(got) == len(ids) and sorted(got) == sorted(ids)  # every row exactly once
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    encode = manifest["stages"]["encode"]
    assert manifest["status"] == "ok" and len(encode["lost_nodes"]) == 1, encode
    # the worker's actor was mid-call when its node went (the calls folder said so): that block ran again
    assert encode["retried_blocks"] >= 1, encode
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Ray nodes lost / blocks retried" in html and f") / {encode['retried_blocks']}<" in html
