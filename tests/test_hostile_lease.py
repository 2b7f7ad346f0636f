"""One writer at a time on an output: the lease in ``<output>/_lease.json`` (embedjob/lease.py).

What these tests promise:

* a second ``embedjob run`` on an output another run is writing exits 2 at once, naming the
  holder, and writes nothing (checked against a real concurrent run in a subprocess, on S3 too);
* a lease whose heartbeat is older than ``output.lease_timeout_s`` (a killed driver), or whose
  process is gone from this host, is taken over with a warning and the run succeeds;
* ``--force-unlock`` takes over a live lease; the run that lost it stops before its manifest;
* acquire / refuse / takeover / release behave the same on local disks and on S3 (moto);
* of several runs racing for a free output, exactly one gets it (local and S3), because the
  storage's create-if-absent, replace-if-unchanged and delete-if-unchanged writes hold under races.
"""

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from embedjob.cli import main
from embedjob.config import build_config
from embedjob.layout import LEASE_FILE
from embedjob.lease import LeaseError, OutputLease
from embedjob.pipeline import run_job
from embedjob.storage import Storage
from tests.conftest import ONLY_SHARD_STAGES, SAMPLE_TEXTS, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(tmp_path, out, model, **output):
    """A small job spec file (tiny model, corpus-wide model stages off) writing to ``out``."""
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "input": {"url": str(tmp_path / "in"), "rows_per_block": 4},
        "output": {"url": str(out), **output},
        "encode": {"model": model, "dtype": "float32", "rows_per_call": 4, "actors": 1},
        "ray": {"num_cpus": 2}, **ONLY_SHARD_STAGES,
    }))
    return str(spec)


def _cfg(tmp_path, out, model, **output):
    data = {"input": {"url": str(tmp_path / "in")}, "output": {"url": str(out), **output},
            **{k: dict(v) for k, v in ONLY_SHARD_STAGES.items()},
            "encode": {"model": model, "dtype": "float32", "rows_per_call": 8}}
    return build_config(data)


def _stale_lease(run_id="dead0run", age_s=600.0):
    """A lease as a killed driver on another host leaves it: last heartbeat ``age_s`` ago."""
    t = time.time() - age_s
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return {"kind": "embedjob output lease", "run_id": run_id, "host": "gone-host", "pid": 4242,
            "started_at": stamp, "started_epoch": t, "heartbeat_at": stamp, "heartbeat_epoch": t,
            "timeout_s": 1.0}


@pytest.fixture()
def no_ray_work(monkeypatch):
    """Fails the test if the job gets as far as starting Ray."""
    def refuse(cfg):
        raise AssertionError("the run went on to start Ray")
    monkeypatch.setattr("embedjob.pipeline.init_ray", refuse)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_second_run_exits_2_at_once_while_a_real_run_writes(tmp_path, tiny_model, capsys, no_ray_work):
    """While `embedjob run` writes an output (a real run in a subprocess), a second run on it exits 2
    at once naming the holder's host, pid and run id, writes nothing and leaves the lease alone; the
    first run then finishes, records its run id in the manifest and removes the lease."""
    texts = [f"{t} number {i}" for i in range(10) for t in SAMPLE_TEXTS[:4]]
    write_shards(tmp_path / "in", texts, n_shards=4)
    out = tmp_path / "out"
    spec = _spec(tmp_path, out, tiny_model)
    env = {**os.environ, "RAY_ADDRESS": "", "EMBEDJOB_DEBUG_ENCODE_DELAY": "0.1"}
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, "-m", "embedjob", "run", spec], cwd=ROOT, env=env,
                                 stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (out / LEASE_FILE).exists():
            assert first.poll() is None, "first run ended early: " + log.read_text()[-2000:]
            assert time.time() < deadline, "first run never took the lease"
            time.sleep(0.05)
        holder = json.loads((out / LEASE_FILE).read_text())
        t0 = time.time()
        code = main(["run", spec])
        err = capsys.readouterr().err
        assert first.poll() is None, "the first run was not running during the second one"
        assert code == 2 and time.time() - t0 < 30
        line = next(ln for ln in err.splitlines() if ln.startswith("embedjob: error:"))
        assert "being written by another run" in line and "--force-unlock" in line
        assert holder["run_id"] in line and f"pid {holder['pid']}" in line and holder["host"] in line
        # the holder is the driver: `embedjob run` itself supervises it as its child (supervise.py)
        assert holder["pid"] in (first.pid, *_children(first.pid))
        assert json.loads((out / LEASE_FILE).read_text())["run_id"] == holder["run_id"]
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, log.read_text()[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run_id"] == holder["run_id"] and manifest["totals"]["done"] == 4
    assert not (out / LEASE_FILE).exists()


def test_stale_lease_is_taken_over_with_a_warning(ray_local, tmp_path, tiny_model, caplog):
    """A lease whose heartbeat is older than output.lease_timeout_s (its driver was killed) is taken
    over with a warning naming the old holder, and the run succeeds and releases the lease."""
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_FILE).write_text(json.dumps(_stale_lease(age_s=60)))
    with caplog.at_level(logging.WARNING, logger="embedjob.lease"):
        res = run_job(_cfg(tmp_path, out, tiny_model, lease_timeout_s=5))
    assert res.ok and res.manifest["totals"]["done"] == 2
    warning = next(r.getMessage() for r in caplog.records if "stale lease" in r.getMessage())
    assert "dead0run" in warning and "gone-host" in warning and "pid 4242" in warning
    assert res.manifest["run_id"] != "dead0run"
    assert not (out / LEASE_FILE).exists()


def test_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    """A lease left by a process of this host that no longer exists (a SIGKILLed driver) is taken
    over at once, without waiting for its heartbeat to go stale."""
    store = Storage(str(tmp_path / "out"))
    code = ("import os, sys; from embedjob.storage import Storage; from embedjob.lease import OutputLease; "
            "OutputLease(Storage(sys.argv[1]), timeout_s=3600).acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, store.url()], cwd=ROOT, check=True, timeout=120)
    dead = json.loads(store.read_text(LEASE_FILE))
    with OutputLease(store, timeout_s=3600) as lease:
        assert store.read_json(LEASE_FILE)["run_id"] == lease.run_id != dead["run_id"]


def test_force_unlock_takes_over_a_live_lease(ray_local, tmp_path, tiny_model, capsys):
    """`embedjob run` refuses an output whose lease is live (exit 2); with --force-unlock it takes the
    output over and succeeds, and the holder it displaced learns that it lost the lease."""
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    out = tmp_path / "out"
    spec = _spec(tmp_path, out, tiny_model, lease_timeout_s=2)
    held = OutputLease(Storage(str(out)), timeout_s=2).acquire()
    try:
        assert main(["run", spec]) == 2
        assert held.run_id in capsys.readouterr().err
        assert main(["run", spec, "--force-unlock"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["run_id"] != held.run_id and manifest["config"]["output"]["force_unlock"] is True
        with pytest.raises(LeaseError, match="taken over by another run"):
            held.check()
    finally:
        held.release()
    assert not (out / LEASE_FILE).exists()


def test_run_that_loses_its_lease_stops_before_its_manifest(ray_local, tmp_path, tiny_model, monkeypatch):
    """A run whose lease another run takes over mid-job fails with LeaseError (exit 2) before it
    writes its manifest, and leaves the other run's lease in place."""
    import embedjob.pipeline as pipeline

    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    out = tmp_path / "out"
    intruder: list[OutputLease] = []
    corpus_stages = pipeline.run_corpus_stages

    def taken_over_midway(*args, **kwargs):
        intruder.append(OutputLease(Storage(str(out)), timeout_s=60, force=True).acquire())
        return corpus_stages(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_corpus_stages", taken_over_midway)
    try:
        with pytest.raises(LeaseError, match="taken over by another run"):
            run_job(_cfg(tmp_path, out, tiny_model))
        assert not (out / "manifest.json").exists()
        assert json.loads((out / LEASE_FILE).read_text())["run_id"] == intruder[0].run_id
    finally:
        for lease in intruder:
            lease.release()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty output location: a local folder, or a prefix in a fresh bucket on moto's S3 server."""
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    bucket, opts = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/out", opts)


def test_acquire_refuse_takeover_release(store, caplog):
    """On local disks and S3: a held lease refuses others while its heartbeat runs; a stale one is
    taken over with a warning; --force-unlock takes a live one; release deletes only our own lease."""
    first = OutputLease(store, timeout_s=1.0).acquire()
    assert store.read_json(LEASE_FILE)["run_id"] == first.run_id
    time.sleep(1.5)  # longer than the timeout: only the heartbeat keeps the lease live
    with pytest.raises(LeaseError, match=f"being written by another run \\(run {first.run_id} on host "):
        OutputLease(store, timeout_s=1.0).acquire()
    forced = OutputLease(store, timeout_s=1.0, force=True).acquire()
    deadline = time.time() + 5
    while first.lost is None and time.time() < deadline:  # the displaced heartbeat notices
        time.sleep(0.05)
    assert first.lost and forced.run_id in first.lost
    first.release()  # must not delete the lease it lost
    assert store.read_json(LEASE_FILE)["run_id"] == forced.run_id
    forced.release()
    assert not store.exists(LEASE_FILE)

    store.write_json(LEASE_FILE, _stale_lease(age_s=30))
    with caplog.at_level(logging.WARNING, logger="embedjob.lease"):
        with OutputLease(store, timeout_s=5) as taker:
            assert store.read_json(LEASE_FILE)["run_id"] == taker.run_id
    assert any("stale lease of run dead0run" in r.getMessage() for r in caplog.records)
    assert not store.exists(LEASE_FILE)


def test_second_run_on_a_leased_s3_output_exits_2(tmp_path, s3_bucket, tiny_model, capsys, no_ray_work):
    """`embedjob run` on an S3 output leased by another run exits 2 naming it, before any Ray work;
    `--dry-run` still works there and leaves the lease alone."""
    bucket, opts = s3_bucket
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    store = Storage(f"s3://{bucket}/out", opts)
    spec = _spec(tmp_path, store.url(), tiny_model, storage_options=opts)
    with OutputLease(store, timeout_s=60) as held:
        assert main(["run", spec]) == 2
        assert held.run_id in capsys.readouterr().err
        assert store.list() == [LEASE_FILE]
        assert main(["run", spec, "--dry-run"]) == 0  # a dry run takes no lease
        assert store.read_json(LEASE_FILE)["run_id"] == held.run_id


def test_racing_acquires_exactly_one_wins(store):
    """Runs racing for a free output (threads released together, several rounds): exactly one gets
    the lease, every other one gets LeaseError naming the winner."""
    for _ in range(4):
        leases = [OutputLease(store, timeout_s=30) for _ in range(6)]
        start = threading.Barrier(len(leases))
        won: list[OutputLease] = []
        refused: list[str] = []

        def race(lease: OutputLease) -> None:
            start.wait()
            try:
                won.append(lease.acquire())
            except LeaseError as e:
                refused.append(str(e))

        threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(won) == 1 and len(refused) == len(leases) - 1
        assert all(won[0].run_id in msg for msg in refused)
        assert store.read_json(LEASE_FILE)["run_id"] == won[0].run_id
        won[0].release()
        assert not store.exists(LEASE_FILE)


def test_conditional_writes_under_the_lease(store):
    """The storage primitives the lease stands on: of racing create-if-absent writes exactly one
    succeeds; a replace or delete against a version that has since changed does nothing."""
    start = threading.Barrier(6)
    versions: dict[int, str] = {}

    def create(i: int) -> None:
        start.wait()
        version = store.create_bytes("flag.json", f"{i}".encode())
        if version is not None:
            versions[i] = version

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(versions) == 1
    (winner, version), = versions.items()
    assert store.read_versioned("flag.json") == (f"{winner}".encode(), version)
    newer = store.replace_bytes_if("flag.json", b"next", version)
    assert newer is not None and newer != version
    assert store.replace_bytes_if("flag.json", b"stale", version) is None
    assert not store.delete_if("flag.json", version)
    assert store.read_bytes("flag.json") == b"next"
    assert store.delete_if("flag.json", newer) and not store.exists("flag.json")
