"""`embedjob run` under its supervising parent (supervise.py): a driver that Ray's C++ core worker ends
with exit 1 (no Python error: injected here with os._exit(1) by EMBEDJOB_DEBUG_RAY_FAILURE=driver-exit*)
gives one line and exit 2; the driver's own exit codes and output pass through; SIGTERM sent to the
command's whole process group reaches the driver once (75, not the second SIGTERM's 130), and a rerun
continues. The console command is run as users run it (`python -m embedjob`, real processes)."""

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
HOOK = "EMBEDJOB_DEBUG_RAY_FAILURE"
ABRUPT = "embedjob: error: the driver ended abruptly (exit 1, no Python error"


def _embedjob(*args, env=None, timeout=300):
    env = {**os.environ, "RAY_ADDRESS": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "embedjob", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _spec(tmp_path, model, n_docs=16, n_shards=2, **encode):
    texts = [f"{t} number {i}" for i in range(n_docs // 4) for t in SAMPLE_TEXTS[:4]]
    ids = write_shards(tmp_path / "in", texts, n_shards=n_shards)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"url": str(tmp_path / "in"), "rows_per_block": 4}, "output": {"url": str(tmp_path / "out")},
        "encode": {"model": model, "dtype": "float32", "rows_per_call": 4, "actors": 1, **encode},
        **ONLY_SHARD_STAGES, "ray": {"num_cpus": 2}}))
    return spec, ids


def test_the_driver_ending_without_python_gives_one_line_and_exit_2_and_codes_pass_through(tmp_path, tiny_model):
    spec, _ = _spec(tmp_path, tiny_model)
    # Ray's core worker ending the driver mid-run (os._exit(1) as the first block is written)
    out = _embedjob("run", str(spec), env={HOOK: "driver-exit"})
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("embedjob: ")]
    assert len(errors) == 1 and errors[0].startswith(ABRUPT), out.stderr[-3000:]
    assert f"rerun the same command to continue where it stopped: embedjob run {spec}" in errors[0]
    assert "Ray's logs: " in errors[0] and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == errors[0]
    # without the parent, a driver so ended (here as it registers with its raylet, where ray.init is called)
    # ends 1 with nothing said: what the supervisor is for
    bare = _embedjob("run", str(spec), env={HOOK: "driver-exit-init", "EMBEDJOB_NO_SUPERVISOR": "1"})
    assert bare.returncode == 1 and "embedjob: error" not in bare.stderr, bare.stderr[-3000:]
    # the driver's own exit codes and output pass through untouched
    dry = _embedjob("run", str(spec), "--dry-run")
    assert dry.returncode == 0 and "Traceback" not in dry.stderr, dry.stderr[-3000:]
    assert str(tmp_path / "in") in dry.stdout
    bad = _embedjob("run", str(spec), "--set", "encode.rows_per_call=0")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("embedjob: error: ") and "abruptly" not in bad.stderr
    assert _embedjob("run", str(tmp_path / "missing.yaml")).returncode == 2


@pytest.mark.slow  # three job starts (~3 min on the loaded 2-core machine); the soak (bench faults) meets these too
def test_group_sigterm_reaches_the_driver_once_a_dead_driver_is_named_and_a_rerun_completes(
        ray_local, tmp_path, tiny_model):
    spec, ids = _spec(tmp_path, tiny_model, n_docs=48, n_shards=4)
    env = {**os.environ, "RAY_ADDRESS": "", "EMBEDJOB_DEBUG_ENCODE_DELAY": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    done_dir = tmp_path / "out" / "_done"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (done_dir.exists() and list(done_dir.glob("part-*.json"))):
            if proc.poll() is not None:
                pytest.fail("job ended before SIGTERM: " + proc.stderr.read()[-2000:])
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a terminal's Ctrl-C or a job runner does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]  # once: a second SIGTERM would have ended it 130
    assert err.strip().splitlines()[-1].startswith("embedjob: interrupted by SIGTERM") and "Traceback" not in err
    committed = sorted(p.stem for p in done_dir.glob("part-*.json"))
    assert 1 <= len(committed) < 4

    # Ray's core worker ends the driver mid-run: one line, exit 2; with -v the driver's Ray log first
    out = _embedjob("-v", "run", str(spec), env={HOOK: "driver-exit"})
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(ABRUPT), out.stderr[-3000:]
    assert "--- the last lines of " in out.stderr and "python-core-driver-" in out.stderr
    assert "Traceback" not in out.stderr

    res = run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, input={"rows_per_block": 4},
                            encode={"rows_per_call": 4, "actors": 1}))
    assert res.manifest["status"] == "ok"
    got = pq.read_table(tmp_path / "out" / "vectors", columns=["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(ids)  # every row exactly once


def test_a_killed_parent_takes_its_driver_with_it(tmp_path):
    """The driver follows its supervising parent (PR_SET_PDEATHSIG): SIGKILL to the parent alone ends both."""
    pidfile = tmp_path / "driver.pid"
    driver = ("import os, sys, time\n"
              "from embedjob.supervise import _follow_parent\n"
              "_follow_parent(int(sys.argv[1]))\n"
              f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
              "time.sleep(120)\n")
    parent = ("import os, subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {driver!r}, str(os.getpid())], start_new_session=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
