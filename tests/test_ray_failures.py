"""When Ray's own runtime fails under a job: exit 2 and one line naming what failed and where Ray's
logs are, never Ray's traceback (unless -v). A startup timeout, a worker that cannot register and a
node marked dead (which one machine cannot provoke on demand) are Ray's own exceptions raised where
Ray raises them (EMBEDJOB_DEBUG_RAY_FAILURE). A raylet killed under the driver of a local Ray often ends the
driver from Ray's C++ core worker (exit 1, no Python exception to catch: `embedjob run`'s supervising
parent names it, tests/test_supervise.py); its LocalRayletDiedError, when it reaches Python, is named
(first test)."""

import json
import os

import pytest

from embedjob.cli import main
from embedjob.errors import JobError
from embedjob.ray_errors import ray_failure, ray_failure_line
from tests.conftest import ONLY_SHARD_STAGES, SAMPLE_TEXTS, write_shards
from tests.helpers import small_job_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = "EMBEDJOB_DEBUG_RAY_FAILURE"


def test_ray_failure_kinds_are_named_through_wrappers():
    import ray.exceptions

    dead = ray.exceptions.NodeDiedError("The node with node id: abc and address: 10.0.0.2 has been marked dead "
                                        "because the detector has missed too many heartbeats from it.")
    try:
        try:
            raise dead
        except Exception as e:
            raise JobError("encode stage failed (2 shard(s) committed before the failure): RemoteError: ...") from e
    except JobError as wrapped:
        assert ray_failure(wrapped).startswith("a Ray node was marked dead (The node with node id: abc")
    assert ray_failure(ray.exceptions.LocalRayletDiedError()).startswith("the raylet is gone")
    assert ray_failure(Exception("The current node timed out during startup. This could happen ...")).startswith(
        "Ray's local node timed out during startup")
    assert ray_failure(ValueError("encode.batch_tokens must be >= 64")) is None
    # embedjob's own errors may quote anything: only the errors they were raised from count
    assert ray_failure(JobError("shard s3://b/x.parquet: Failed to connect to GCS-like text has been marked dead")) is None
    line = ray_failure_line(ray.exceptions.LocalRayletDiedError())
    assert "Ray's logs: " in line and "\n" not in line


def _spec(tmp_path, model, **encode):
    write_shards(tmp_path / "in", SAMPLE_TEXTS * 4, n_shards=4)
    spec = tmp_path / "job.yaml"
    data = small_job_data(tmp_path / "in", tmp_path / "out", model, input={"rows_per_block": 4},
                          encode={"rows_per_call": 4, "actors": 1, **encode})
    data["ray"] = {"num_cpus": 2}
    spec.write_text(json.dumps({**data, **ONLY_SHARD_STAGES}))
    return spec


@pytest.mark.parametrize("kind, what", [("startup-timeout", "Ray's local node timed out during startup"),
                                        ("register-worker", "a Ray worker could not register with its raylet")])
def test_ray_start_failures_give_one_line_and_exit_2(tmp_path, tiny_model, capsys, monkeypatch, kind, what):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    spec = _spec(tmp_path, tiny_model)
    monkeypatch.setenv(HOOK, kind)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"embedjob: error: Ray's runtime failed: {what}")
    assert "Ray's logs: " in err and "Traceback" not in err
    assert main(["-v", "run", str(spec)]) == 2  # -v: Ray's traceback as well, then the same line
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        f"embedjob: error: Ray's runtime failed: {what}")


def test_node_marked_dead_under_the_stream_gives_one_line(ray_local, tmp_path, tiny_model, capsys, monkeypatch):
    spec = _spec(tmp_path, tiny_model)
    monkeypatch.setenv(HOOK, "node-died")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("embedjob: error: Ray's runtime failed: a Ray node was marked dead (The node with node id")
    assert "Ray's logs: " in last and "Traceback" not in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "marked dead" in manifest["error"]


def test_a_local_ray_waits_longer_before_marking_its_own_node_dead(tmp_path):
    """A local Ray's GCS gives its one raylet 20 missed health checks, not Ray's 5 (a busy raylet, not a dead
    one: marked dead, it ends the driver with exit 1); a value the user set is kept."""
    import subprocess
    import sys

    code = ("import os, ray\n"
            "from embedjob.config import JobConfig\n"
            "from embedjob.cluster import init_ray\n"
            "from embedjob.bench.faults import descendant_processes\n"
            f"init_ray(JobConfig.model_validate({{'input': {{'url': {str(tmp_path)!r}}}, "
            f"'output': {{'url': {str(tmp_path / 'out')!r}}}, 'ray': {{'num_cpus': 1}}}}).ray)\n"
            "gcs = [p for p, c in descendant_processes(os.getpid()) if 'gcs_server' in c]\n"
            "env = open(f'/proc/{gcs[0]}/environ', 'rb').read().decode().split(chr(0))\n"
            "print([e for e in env if e.startswith('RAY_health_check_failure_threshold=')])\n"
            "ray.shutdown()\n")
    for preset, want in ((None, "20"), ("7", "7")):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_health_check_failure_threshold")}
        if preset:
            env["RAY_health_check_failure_threshold"] = preset
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"['RAY_health_check_failure_threshold={want}']" in out.stdout, out.stdout
