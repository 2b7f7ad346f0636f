"""Bad input: one clear error line naming the problem, exit code 2, before any Ray work."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None):
    env = {**os.environ, "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, "-m", "embedjob", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                       env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def job(tmp_path, inp, extra=""):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"input:\n  url: {inp}\noutput:\n  url: {tmp_path / 'out'}\n{extra}")
    return str(spec)


def _assert_one_clear_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("embedjob: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_corrupt_parquet(tmp_path):
    write_shards(tmp_path / "in", ["a", "b"], n_shards=1)
    (tmp_path / "in" / "part-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    rc, _, err = run_cli("run", job(tmp_path, tmp_path / "in"))
    _assert_one_clear_error(rc, err, "part-00001.parquet", "cannot read Parquet")


def test_missing_text_column(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "in" / "p.parquet")
    rc, _, err = run_cli("run", job(tmp_path, tmp_path / "in"))
    _assert_one_clear_error(rc, err, "'text'", "input.text_column", "available columns: id, body", "p.parquet")


def test_non_string_text_column(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": [3]}), tmp_path / "in" / "p.parquet")
    rc, _, err = run_cli("run", job(tmp_path, tmp_path / "in"))
    _assert_one_clear_error(rc, err, "text column 'text' has type int64", "p.parquet")


def test_empty_folder(tmp_path):
    (tmp_path / "in").mkdir()
    rc, _, err = run_cli("run", job(tmp_path, tmp_path / "in"))
    _assert_one_clear_error(rc, err, "no Parquet shards found", str(tmp_path / "in"))


def test_bad_yaml_key(tmp_path):
    rc, _, err = run_cli("run", job(tmp_path, tmp_path / "in", "encode:\n  modle: x\n"))
    _assert_one_clear_error(rc, err, "encode.modle", "did you mean 'model'")


def test_bad_model(tmp_path):
    write_shards(tmp_path / "in", ["a"], n_shards=1)
    rc, _, err = run_cli("run", job(tmp_path, tmp_path / "in"), "--set", "encode.model=/no/such/model")
    _assert_one_clear_error(rc, err, "encode.model='/no/such/model'")


def test_dry_run_prints_config_and_shards(tmp_path):
    write_shards(tmp_path / "in", ["a", "b", "c"], n_shards=2)
    rc, out, err = run_cli("run", job(tmp_path, tmp_path / "in"), "--dry-run", "--set", "encode.max_length=32")
    assert rc == 0, err
    assert "max_length: 32" in out and "part-00000.parquet\t2 rows" in out and "part-00001.parquet\t1 rows" in out
    assert not (tmp_path / "out").exists()


def test_run_job_dry_run_returns_the_text_and_says_where_the_sample_corpus_would_go(tmp_path):
    """input.create_sample_if_missing is run_job's (not only the CLI's): a dry run on an empty input
    returns what `embedjob run --dry-run` prints and builds nothing; with shards it lists them."""
    from embedjob.config import build_config
    from embedjob.pipeline import run_job
    from embedjob.sample_corpus import sample_if_missing

    cfg = build_config({"input": {"url": str(tmp_path / "in"), "create_sample_if_missing": True},
                        "output": {"url": str(tmp_path / "out")}})
    text = run_job(cfg, dry_run=True)
    assert isinstance(text, str) and text.endswith("holds no shards yet: a run builds the sample corpus there first")
    assert not (tmp_path / "in").exists() and not (tmp_path / "out").exists()
    write_shards(tmp_path / "in", ["a", "b", "c"], n_shards=2)
    assert not sample_if_missing(str(tmp_path / "in"), {}, dry_run=True)
    text = run_job(cfg, dry_run=True)
    assert text.startswith("# resolved job config\n") and "part-00001.parquet\t1 rows" in text
