"""The README's local-cluster commands, run as a user runs them on a fresh clone.

The commands are read from the README's block marked ``readme-cluster-commands`` (so the README and
this test cannot drift apart) and run in one bash, in a copy of the checkout's files (what a clone
has) with ``.venv`` pointing at this venv, from a PATH without the venv's ``bin/`` and a private
HOME (so ``~/.ray/auth_token`` is this test's own). Three changes keep the cluster private, and
nothing else is changed: port 8265 becomes a free port, ``ray start --head`` gets the private
ports and temp dir of :class:`tests.test_cluster.LocalRayCluster`, and ``ray stop`` (which stops
every Ray on the machine) becomes ``LocalRayCluster.stop`` (this cluster's processes only). The
input is a small corpus at ``data/gensim-corpus`` (what the default job leaves there), so the run
is quick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SAMPLE_TEXTS
from tests.test_cluster import REPO, VENV_BIN, LocalRayCluster, _free_ports

MARKER = "<!-- readme-cluster-commands"
README_PORT = "8265"


def readme_cluster_commands() -> list[str]:
    """The command lines of the README's marked block, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert MARKER in text, "README.md has no block marked readme-cluster-commands"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S)
    return [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]


def private_script(lines: list[str], cluster: LocalRayCluster) -> str:
    """The README lines with the three private-cluster changes (see the module docstring)."""
    out = []
    ports = _free_ports(7)
    private = (f" --port {cluster.gcs_port} --num-cpus 2 --num-gpus 0 --node-ip-address 127.0.0.1"
               f" --temp-dir {cluster.tmp} --disable-usage-stats --object-store-memory {100 * 1024 * 1024}"
               f" --min-worker-port 0 --max-worker-port 0 --node-manager-port {ports[0]}"
               f" --object-manager-port {ports[1]} --dashboard-agent-listen-port {ports[2]}"
               f" --dashboard-agent-grpc-port {ports[3]} --runtime-env-agent-port {ports[4]}"
               f" --metrics-export-port {ports[5]} --ray-client-server-port {ports[6]}")
    for line in lines:
        if line.strip() == "ray stop":
            continue  # LocalRayCluster.stop, after the script
        if README_PORT in line:
            line = line.replace(f"--dashboard-port {README_PORT}", f"--dashboard-port {cluster.dashboard_port}")
            line = line.replace(f"http://127.0.0.1:{README_PORT}", cluster.dashboard_url)
            assert README_PORT not in line, line
        if line.startswith("ray start --head"):
            line += private
        out.append(line)
    return "\n".join(["set -e", *out])


def _fresh_clone(dest: Path) -> None:
    """The checkout's tracked and not-ignored files (a clone's), and ``.venv`` -> this venv."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(VENV_BIN.parent)


# slow: the default suite keeps under 30 min on CI's 2 cores; test_cluster checks the job specs and a multi-node job
@pytest.mark.slow
def test_readme_cluster_commands_run_as_written(tmp_path):
    lines = readme_cluster_commands()
    assert lines[-1] == "ray stop" and sum(line.startswith("ray job submit") for line in lines) == 1
    repo = tmp_path / "repo"
    _fresh_clone(repo)
    corpus = repo / "data" / "gensim-corpus"  # what the default job leaves there, smaller
    corpus.mkdir(parents=True)
    texts = [f"{t} Item {i}." for i in range(8) for t in SAMPLE_TEXTS]
    for s in range(2):
        pq.write_table(pa.table({"id": [f"d{i:03d}" for i in range(s, len(texts), 2)], "text": texts[s::2]}),
                       corpus / f"part-{s:05d}.parquet")
    home = tmp_path / "home"
    home.mkdir()
    cluster = LocalRayCluster()
    try:
        env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                      if p and Path(p).resolve() != VENV_BIN.resolve())
        env["HOME"] = str(home)
        assert not shutil.which("embedjob", path=env["PATH"]), "the venv's bin/ must not be on PATH before the README's lines"
        run = subprocess.run(["bash", "-c", private_script(lines, cluster)], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=500)
        logs = run.stdout + run.stderr
        assert run.returncode == 0, f"README cluster commands failed ({run.returncode}):\n{logs[-8000:]}\n{cluster.logs()}"

        # token authentication was on, with the token the README's lines made in ~/.ray/auth_token
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert token and token not in logs
        try:
            urllib.request.urlopen(cluster.dashboard_url + "/api/version", timeout=10)
            raise AssertionError("the dashboard answered a request without the token")
        except urllib.error.HTTPError as e:
            assert e.code in (401, 403)
        cluster.env["RAY_AUTH_TOKEN"] = token
        jobs = cluster.http_json("/api/jobs/")
        assert [j["status"] for j in jobs] == ["SUCCEEDED"], jobs
    finally:
        cluster.stop()

    out = repo / "output" / "local"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["ray"]["mode"].startswith("cluster")
    assert manifest["totals"]["rows_out"] == len(texts)
    assert all(manifest["stages"][name]["status"] == "done" for name in ("vocab", "static", "word2vec", "topics", "index"))
    assert re.search(r"encode: \d+/96 docs", logs)
    assert logs.rstrip().splitlines()[-1].endswith(f"{out}/report.html") or f"report: {out}/report.html" in logs
