"""Running on a Ray cluster: the cluster launcher config, the job specs users submit, and a real
two-node Ray cluster on 127.0.0.1 that a job is submitted to through the Jobs API.

The multi-node test starts `ray start --head` and a second `ray start --address` node that holds a
custom resource (``encoder_node``), submits ``embedjob run jobs/s3-backfill-cpu.yaml`` with
``ray job submit`` from a separate process (input and output on moto's S3 server), and checks that
the job succeeded, its outputs are complete, and the encoder actors ran on the second node. The
cluster is private to the test: its own ports, temp dir and auth token, and every process it
started is stopped at the end, pass or fail (never `ray stop`, which would stop every Ray on the
machine)."""

from __future__ import annotations

import atexit
import contextlib
import copy
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from embedjob.config import load_job
from embedjob.storage import Storage
from tests.conftest import SAMPLE_TEXTS

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the venv's ray and embedjob: nodes import the editable embedjob
JOB_SPECS = ("local.yaml", "s3-backfill-gpu.yaml", "s3-backfill-cpu.yaml")


# -- cluster.yaml and job specs ---------------------------------------------------------------
def _load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    cfg = _load_yaml(REPO / "cluster.yaml")
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # the launcher's own checks, with its AWS defaults

    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU", 1) > 0 and "GPU" not in head["resources"]
    assert head["min_workers"] == 0 and head["max_workers"] == 0
    gpu_groups = {name: t for name, t in cfg["available_node_types"].items()
                  if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert gpu_groups, "cluster.yaml has no GPU worker group"
    for name, t in gpu_groups.items():
        assert re.match(r"(g5|g6|g6e|p4d|p5)\.", t["node_config"]["InstanceType"]), name
        assert t["max_workers"] > t["min_workers"], f"{name} does not autoscale"
    assert any("embedjob" in c for c in cfg["setup_commands"]), "setup_commands do not install embedjob"
    # the dashboard is reached through `ray dashboard cluster.yaml` (SSH port-forwarding), never
    # opened to the internet: bound to localhost, and no ingress besides SSH
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    assert cfg["provider"]["security_group"]["IpPermissions"] == []  # the launcher adds SSH + intra-cluster only
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY", text, re.I)


@pytest.mark.parametrize("name", JOB_SPECS)
def test_job_specs_are_valid_and_in_the_readme(name):
    cfg = load_job(str(REPO / "jobs" / name))
    readme = (REPO / "README.md").read_text()
    if name != "local.yaml":
        assert cfg.input.url.startswith("s3://") and cfg.output.url.startswith("s3://")
        assert not cfg.input.storage_options.get("secret") and not cfg.output.storage_options.get("secret")
    line = (f"ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime-env.yaml"
            f" -- embedjob run jobs/{name}")
    assert line in readme, f"README has no submit line for jobs/{name}"
    gpu = load_job(str(REPO / "jobs" / "s3-backfill-gpu.yaml")).encode
    assert gpu.device == "cuda" and gpu.actors


def test_kuberay_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all((REPO / "jobs" / "kuberay-rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d.get("kind") == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert re.match(r"embedjob run \S*jobs/s3-backfill-gpu\.yaml", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["maxReplicas"] >= g["minReplicas"] for g in gpu_groups)
    text = (REPO / "jobs" / "kuberay-rayjob.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key:", text)


def test_plan_encoder_sizes_the_pool_from_the_cluster(caplog):
    from embedjob.cluster import plan_encoder
    from embedjob.config import build_config
    from embedjob.errors import JobError

    gpus = plan_encoder(build_config({}).encode, {"CPU": 32.0, "GPU": 4.0}, static=True)
    assert (gpus.device, gpus.actors, gpus.num_gpus) == ("cuda", 4, 1)
    with caplog.at_level("INFO", logger="embedjob.cluster"):
        cpu = plan_encoder(build_config({}).encode, {"CPU": 8.0}, static=True)
    assert (cpu.device, cpu.actors, cpu.num_gpus) == ("cpu", 4, 0)
    assert "no GPUs in the cluster, encoding with 4 CPU actor(s)" in caplog.text
    pinned = plan_encoder(build_config({"encode": {"resources": {"encoder_node": 1}}}).encode,
                          {"CPU": 8.0, "encoder_node": 1.0}, static=True)
    assert pinned.actors == 1 and pinned.resources == {"encoder_node": 1.0}
    with pytest.raises(JobError, match="encode.resources"):
        plan_encoder(build_config({"encode": {"resources": {"encoder_node": 1}}}).encode, {"CPU": 8.0}, static=True)
    with pytest.raises(JobError, match="encode.device=cuda"):
        plan_encoder(build_config({"encode": {"device": "cuda"}}).encode, {"CPU": 8.0}, static=True)
    waiting = plan_encoder(build_config({"encode": {"device": "cuda", "actors": 8}}).encode, {"CPU": 8.0}, static=True)
    assert (waiting.device, waiting.actors) == ("cuda", 8)  # for an autoscaler to add GPU nodes


# -- a real two-node Ray cluster on 127.0.0.1 -------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _safely(ready) -> bool:
    try:
        return bool(ready())
    except (OSError, ValueError, KeyError):
        return False


_PDEATHSIG = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
              "os.execv(sys.argv[1], sys.argv[1:])")


class LocalRayCluster:
    """`ray start --head` plus worker nodes, as separate processes on 127.0.0.1.

    Everything is private to this object: free ports, its own ``--temp-dir``, its own auth token
    (``RAY_AUTH_TOKEN``, not ``~/.ray/auth_token``) and a marker in the environment of every process
    it starts, so :meth:`stop` ends exactly those processes (other Ray clusters on the machine are
    left alone). Each ``ray start --block`` is told to exit when the test process dies."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="ejray-", dir="/tmp")  # short: Ray's socket paths have a limit
        self.marker = secrets.token_hex(8)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "EMBEDJOB_TEST_CLUSTER": self.marker,
        })
        self.gcs_port, self.dashboard_port = _free_ports(2)
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        atexit.register(self.stop)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        ports = _free_ports(6)
        args = args + [
            "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", self.tmp, "--disable-usage-stats",
            "--object-store-memory", str(100 * 1024 * 1024), "--min-worker-port", "0", "--max-worker-port", "0",
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
            "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
        ]
        log = Path(self.tmp) / f"{name}.out"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-c", _PDEATHSIG, str(VENV_BIN / "ray"), "start", *args],
                                    stdout=f, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                    start_new_session=True)
        self.procs.append((proc, log))

    def _wait(self, what: str, ready, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not _safely(ready):
            if time.time() > deadline or any(p.poll() is not None for p, _ in self.procs):
                raise RuntimeError(f"{what}: timed out or a node exited\n{self.logs()}")
            time.sleep(0.5)

    def start(self, head_cpus: int, workers: list[tuple[str, int, dict[str, float]]]) -> None:
        """Start the head (dashboard and Jobs API on 127.0.0.1), wait until it is fully up (its
        raylet registered: a worker node started earlier gives up after its own retries, which a
        loaded 2-core CI machine can outlast), then the worker nodes ``(name, cpus, custom
        resources)``; wait until all are up."""
        self._spawn("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", str(head_cpus),
                             "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(_free_ports(1)[0])])
        self._wait("GCS", lambda: _port_open(self.gcs_port))
        head_log = self.procs[0][1]
        self._wait("head", lambda: "Ray runtime started" in head_log.read_text(errors="replace"))
        for name, cpus, resources in workers:
            # a worker asks the GCS for the head's node info NUM_REDIS_GET_RETRIES times, 2 s apart
            self._spawn(name, ["--address", self.gcs_address, "--num-cpus", str(cpus), "--num-gpus", "0",
                               "--resources", json.dumps(resources)], env={"RAY_NUM_REDIS_GET_RETRIES": "150"})
        for _, log in self.procs[1:]:
            self._wait(log.stem, lambda log=log: "Ray runtime started" in log.read_text(errors="replace"))
        self._wait("dashboard", lambda: self._http_ok("/api/version"))
        self._wait("nodes", lambda: len(self.nodes()) == 1 + len(workers))

    def http_json(self, path: str):
        req = urllib.request.Request(self.dashboard_url + path,
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def _http_ok(self, path: str) -> bool:
        try:
            self.http_json(path)
            return True
        except OSError:
            return False

    def nodes(self) -> list[dict]:
        """Alive nodes with their ids and resources (the state API, as `ray list nodes` shows)."""
        data = self.http_json("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        return [n for n in data if n.get("state") == "ALIVE"]

    def wait_for_job(self, job_id: str, timeout: float) -> dict:
        """Poll the Jobs API until the job has ended; its details (status, message)."""
        deadline = time.time() + timeout
        while True:
            job = self.http_json(f"/api/jobs/{job_id}")
            if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
                return job
            time.sleep(1)

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster, from a separate process."""
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self, tail: int = 40) -> str:
        out = []
        for _, log in self.procs:
            with contextlib.suppress(OSError):
                lines = log.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {log.name}\n" + "\n".join(lines))
        # the nodes' own logs say why a node did not come up (GCS, raylet, dashboard)
        logs_dir = Path(self.tmp) / "session_latest" / "logs"
        for name in ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err", "dashboard.log"):
            with contextlib.suppress(OSError):
                lines = (logs_dir / name).read_text(errors="replace").splitlines()[-15:]
                out.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(out)

    def _own_pids(self) -> list[int]:
        """Processes started by this cluster: they carry its marker in their environment."""
        needle = f"EMBEDJOB_TEST_CLUSTER={self.marker}".encode()
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(d))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """Stop every process of this cluster: SIGTERM to each `ray start --block` (which stops its
        node's processes), SIGKILL to their process groups after a short grace, then SIGKILL to any
        process left that carries this cluster's marker (workers, the job's driver)."""
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for proc, _ in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for _ in range(10):
            left = self._own_pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.procs = []


def start_cluster(workers: list, env: "dict | None" = None) -> "LocalRayCluster":
    """A started :class:`LocalRayCluster` (head with 2 CPUs, then ``workers``), ``env`` added to every
    node's environment; a second, fresh cluster if the first did not come up (ports, a loaded machine)."""
    for attempt in (1, 2):
        cluster = LocalRayCluster()
        cluster.env.update(env or {})
        try:
            cluster.start(head_cpus=2, workers=workers)
            return cluster
        except RuntimeError:
            cluster.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node (2 CPUs, dashboard and Jobs API on 127.0.0.1) and a worker node with 2 CPUs and
    the custom resource ``encoder_node: 1``; stopped at the end, pass or fail."""
    cluster = start_cluster([("worker", 2, {"encoder_node": 1})])
    try:
        yield cluster
    finally:
        cluster.stop()


def test_job_submitted_to_a_multinode_cluster(ray_cluster, s3_server, tmp_path, tiny_model):
    import boto3

    cluster = ray_cluster
    bucket = "embedjob-cluster"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server}}
    store = Storage(f"s3://{bucket}", opts)
    texts = [f"{t} Item {i}." for i in range(8) for t in SAMPLE_TEXTS]  # 96 documents
    ids = [f"doc-{i:04d}" for i in range(len(texts))]
    for s in range(3):
        store.write_parquet(f"corpus/part-{s:05d}.parquet", pa.table({"id": ids[s::3], "text": texts[s::3]}))

    # the working dir the user submits: the repo's job specs (README: --working-dir .)
    workdir = tmp_path / "work"
    shutil.copytree(REPO / "jobs", workdir / "jobs")
    # credentials and endpoint as a cluster without an IAM role would get them: the job's environment
    runtime_env = _load_yaml(REPO / "jobs" / "runtime-env.yaml")
    runtime_env["env_vars"].update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_server})
    job_id = f"embedjob-test-{secrets.token_hex(4)}"
    submit = cluster.ray(
        "job", "submit", "--address", cluster.dashboard_url, "--submission-id", job_id, "--no-wait",
        "--working-dir", str(workdir), "--runtime-env-json", json.dumps(runtime_env),
        "--", "embedjob", "run", "jobs/s3-backfill-cpu.yaml",
        "--set", f"input.url=s3://{bucket}/corpus", "--set", f"output.url=s3://{bucket}/out",
        "--set", f"encode.model={tiny_model}", "--set", "encode.dtype=float32",
        "--set", "encode.resources.encoder_node=1", "--set", "encode.cpus_per_actor=1",
        "--set", "encode.threads_per_actor=1", "--set", "input.rows_per_block=16",
        "--set", "encode.rows_per_call=16",
        timeout=120,
    )
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}\n{cluster.logs()}"
    status = cluster.wait_for_job(job_id, timeout=400)
    logs = cluster.http_json(f"/api/jobs/{job_id}/logs")["logs"]  # what `ray job logs` prints
    assert status["status"] == "SUCCEEDED", f"job {status['status']}: {status.get('message')}\n{logs[-6000:]}"

    # outputs complete
    assert store.list("out/vectors") == [f"part-{s:05d}.parquet" for s in range(3)]
    got = []
    for s in range(3):
        t = pq.read_table(io.BytesIO(store.read_bytes(f"out/vectors/part-{s:05d}.parquet")))
        assert t.column("vector").null_count == 0
        got += t.column("id").to_pylist()
    assert sorted(got) == ids
    assert store.exists("out/vocab/dictionary.gensim")
    manifest = store.read_json("out/manifest.json")
    assert manifest["totals"] == {"shards": 3, "done": 3, "skipped_unchanged": 0, "kept_not_in_input": 0,
                                  "failed": 0, "committed_shards": 3, "rows_out": len(ids),
                                  "documents": {"encoded": len(ids), "reused": 0, "removed": 0}}
    assert manifest["status"] == "ok" and not store.exists("out/_lease.json")
    assert manifest["ray"]["mode"].startswith("cluster")
    assert "testing" not in store.read_text("out/manifest.json")

    # the encoder actors ran on the node that holds the resource they asked for
    nodes = cluster.nodes()
    holders = {n["node_id"] for n in nodes if n["resources_total"].get("encoder_node")}
    assert len(nodes) == 2 and len(holders) == 1
    assert not any(n["is_head_node"] for n in nodes if n["node_id"] in holders)  # the second node
    encode = manifest["stages"]["encode"]
    assert encode["actors"] == 1 and manifest["encoder"]["actors"]["resources"] == {"encoder_node": 1.0}
    assert set(encode["actor_nodes"]) == holders, f"{encode['actor_nodes']} vs {holders}"
    assert sum(encode["actor_nodes"].values()) == len(ids)

    # what `ray job logs` shows: the pool plan, per-stage progress lines and the final summary
    assert "encode: 1 CPU actor(s) x 1 threads (encode.device=cpu)" in logs, logs[-4000:]
    assert "each encoder actor asks for Ray resources {'encoder_node': 1.0}" in logs
    assert re.search(r"encode: 96/96 docs \(100\.0%\), \d+ tokens; [\d.]+ docs/s, \d+ tokens/s; ETA", logs)
    assert "encode: done, 96 docs" in logs
    assert "embedjob: 3 shard(s) encoded, 0 unchanged, 0 failed; 96 rows" in logs
