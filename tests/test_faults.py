"""Backfills and faults: resume after a killed driver, a killed encoder actor, reruns, added
shards, config changes, and the bad-shard policy (real local Ray, real files)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.pipeline import JobError, run_job
from embedjob.stages.lance_sink.write import write_shard_fragments
from embedjob.stages.read import InputError
from embedjob.storage import Storage
from tests.conftest import ONLY_SHARD_STAGES, SAMPLE_TEXTS, write_shards
from tests.helpers import kill_driver_when, small_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANCE = {"lance": True, "carry_columns": ["text"]}  # the killed-driver test checks the Lance sink too


@pytest.fixture()
def ray_slow(ray_local):
    """Local Ray whose workers sleep 0.1 s per encoder call, so an actor can be killed mid-run."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"EMBEDJOB_DEBUG_ENCODE_DELAY": "0.1", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def _encoder_actor_pids():
    """Encoder actor processes of *this* Ray instance: children of its raylet (other Ray instances
    may run on the same host), found through /proc."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if ppid == raylet and "EncodeActor" in cmd:
            pids.append(int(d))
    return pids


def _ids(out):
    return pq.read_table(os.path.join(out, "vectors"), columns=["id"]).column("id").to_pylist()


def _status(res):
    return {k: v["status"] for k, v in res.manifest["shards"].items()}


def test_sigkill_driver_mid_encode_then_resume(ray_local, tmp_path, tiny_model):
    texts = [f"{t} number {i}" for i in range(40) for t in SAMPLE_TEXTS[:4]]  # 160 docs
    ids = write_shards(tmp_path / "in", texts, n_shards=8)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"url": str(tmp_path / "in"), "rows_per_block": 4},
        "output": {"url": str(tmp_path / "out"), **LANCE},
        "encode": {"model": tiny_model, "dtype": "float32", "rows_per_call": 4, "actors": 1}, **ONLY_SHARD_STAGES,
        "ray": {"num_cpus": 2},
    }))
    env = {**os.environ, "RAY_ADDRESS": "", "EMBEDJOB_DEBUG_ENCODE_DELAY": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done_dir = tmp_path / "out" / "_done"
    kill_driver_when(proc, lambda: done_dir.exists() and len(list(done_dir.glob("part-*.json"))) >= 2)
    committed = sorted(p.stem for p in done_dir.glob("part-*.json"))
    assert 2 <= len(committed) < 8, committed
    # Lance fragments were written with the commits; a retried commit task would leave a second
    # set of the same shard's rows beside them: plant one (no version may ever list it)
    marker = json.loads((done_dir / f"{committed[0]}.json").read_text())
    vec = pq.read_table(tmp_path / "out" / "vectors" / f"{committed[0]}.parquet")
    write_shard_fragments(Storage(str(tmp_path / "out")), committed[0], vec, pa.array(range(vec.num_rows)),
                          {"carry_columns": ["text"], "input_url": marker["input"]["url"]})
    res = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, output=LANCE,
                       input={"rows_per_block": 4}, encode={"rows_per_call": 4, "actors": 1}))
    status = _status(res)
    assert sorted(k for k, v in status.items() if v == "skipped-unchanged") == committed
    assert sorted(k for k, v in status.items() if v == "done") == sorted(set(status) - set(committed))
    got = _ids(tmp_path / "out")
    assert len(got) == len(ids) and sorted(got) == sorted(ids)  # every row exactly once
    assert not any((tmp_path / "out" / "_tmp").glob("*/*.arrow"))
    lance_ids = lance.dataset(str(tmp_path / "out" / "lance" / "docs.lance")).to_table(columns=["id"])
    assert sorted(lance_ids.column("id").to_pylist()) == sorted(ids)  # and in Lance, each id exactly once


def test_killed_encoder_actor_is_restarted_exactly_once(ray_slow, tmp_path, tiny_model):
    texts = [f"{t} item {i}" for i in range(30) for t in SAMPLE_TEXTS[:4]]  # 120 docs
    ids = write_shards(tmp_path / "in", texts, n_shards=3)
    # windows of 12 tokens and chunks: a retried block must not leave a window's chunk twice either
    cfg = small_job(tmp_path / "in", tmp_path / "out", tiny_model, input={"rows_per_block": 4},
               encode={"rows_per_call": 4, "actors": 1, "max_restarts": 2, "max_task_retries": 3,
                       "max_length": 12, "window_overlap": 2, "write_chunks": True})
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("res", run_job(cfg)))
    t.start()
    killed = None
    deadline = time.time() + 180
    while time.time() < deadline and killed is None and t.is_alive():
        parts = list((tmp_path / "out" / "_tmp").glob("*/*.arrow")) if (tmp_path / "out" / "_tmp").exists() else []
        if parts:
            for pid in _encoder_actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.05)
    t.join(timeout=300)
    assert killed is not None, "no encoder actor was found alive mid-run"
    res = result["res"]
    assert res.ok
    got = _ids(tmp_path / "out")
    assert len(got) == len(ids) and sorted(got) == sorted(ids)
    chunks = pq.read_table(tmp_path / "out" / "chunks").select(["id", "chunk"]).to_pylist()
    by_id: dict = {}
    for c in chunks:
        by_id.setdefault(c["id"], []).append(c["chunk"])
    assert sorted(by_id) == sorted(ids)
    assert all(sorted(cs) == list(range(len(cs))) for cs in by_id.values())  # each window's chunk exactly once
    assert len(chunks) == res.manifest["stages"]["encode"]["windows"] > len(ids)


def test_rerun_unchanged_then_two_new_shards_then_config_change(ray_local, tmp_path, tiny_model):
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=3)
    cfg = small_job(tmp_path / "in", tmp_path / "out", tiny_model)
    run_job(cfg)
    again = run_job(cfg)
    assert set(_status(again).values()) == {"skipped-unchanged"}
    assert again.manifest["stages"]["encode"]["documents"] == 0
    for name in ("part-00010", "part-00011"):
        pq.write_table(pa.table({"id": [f"{name}-a", f"{name}-b"], "text": ["new text", "more new text"]}),
                       tmp_path / "in" / f"{name}.parquet")
    grown = run_job(cfg)
    assert sorted(k for k, v in _status(grown).items() if v == "done") == ["part-00010", "part-00011"]
    assert grown.manifest["stages"]["encode"]["documents"] == 4
    assert grown.manifest["stages"]["vocab"]["status"] == "done"  # recomputed from per-shard outputs
    # an encoder change re-encodes every shard but leaves token-based stages alone
    changed = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, encode={"pooling": "cls"}))
    assert set(_status(changed).values()) == {"done"}
    assert changed.manifest["stages"]["vocab"]["status"] == "skipped-unchanged"
    # a preprocessing change recomputes the vocabulary too
    pre = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, encode={"pooling": "cls"},
                       preprocess={"min_token_length": 2}))
    assert pre.manifest["stages"]["vocab"]["status"] == "done"
    forced = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, encode={"pooling": "cls"},
                          preprocess={"min_token_length": 2}, output={"overwrite": True}))
    assert set(_status(forced).values()) == {"done"}
    assert len(_ids(tmp_path / "out")) == len(SAMPLE_TEXTS) + 4


def _corrupt_data_pages(path):
    """Keep the footer (so the launch check passes) but break the column data."""
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    for i in range(8, len(data) - footer_len - 8):
        data[i] = 0xFF
    path.write_bytes(bytes(data))


def test_bad_shard_skip_is_recorded_and_fail_stops(ray_local, tmp_path, tiny_model):
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=3)
    _corrupt_data_pages(tmp_path / "in" / "part-00001.parquet")
    res = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, input={"on_bad_shard": "skip"}))
    assert not res.ok and res.failed_shards == ["part-00001"]
    st = res.manifest["shards"]["part-00001"]
    assert st["status"] == "failed" and "part-00001.parquet" in st["reason"]
    assert _status(res)["part-00000"] == "done" and _status(res)["part-00002"] == "done"
    with pytest.raises((InputError, JobError), match="part-00001.parquet"):
        run_job(small_job(tmp_path / "in", tmp_path / "out2", tiny_model))


def test_cli_exit_code_when_shards_were_skipped(tmp_path, tiny_model):
    write_shards(tmp_path / "in", SAMPLE_TEXTS[:4], n_shards=2)
    (tmp_path / "in" / "part-00002.parquet").write_bytes(b"garbage")
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"input": {"url": str(tmp_path / "in"), "on_bad_shard": "skip"},
                                "output": {"url": str(tmp_path / "out")},
                                "encode": {"model": tiny_model}, "ray": {"num_cpus": 2},
                                **ONLY_SHARD_STAGES}))
    p = subprocess.run([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "RAY_ADDRESS": ""}, timeout=300)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "part-00002" in p.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["shards"]["part-00002"]["status"] == "failed" and m["totals"]["done"] == 2
