"""What embedjob promises when its inputs are hostile or careless, and when its output folder is
shared: read this module as the list of those promises.

Each test plays a user or an attacker: secrets on the command line, a recipe change after a shard
left the input, leftovers of a crashed run, null and duplicated ids. (More of the same promises
live beside it: planted pickles in ``test_hostile_pickle.py``, one writer per output in
``test_hostile_lease.py``, errors in one line in ``test_hostile_errors.py``.)
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.cli import main
from embedjob.pipeline import JobError, run_job
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job

SECRET_KEY = "AKIAEMBEDJOBFAKE0042"
SECRET = "s3cr3t-Embedjob-DoNotPrint-9f1c"


def _glob_rows(out, folder="vectors"):
    """What a reader that globs the folder gets (duckdb, as users do)."""
    import duckdb

    return duckdb.sql(f"select count(*) from '{out}/{folder}/*.parquet'").fetchall()[0][0]


def _manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


# -- secrets ----------------------------------------------------------------------------------
def test_dry_run_masks_secrets_from_set_and_yaml(tmp_path, capsys):
    """`--dry-run` masks `key`/`secret` given with --set and `aws_*` keys under client_kwargs in the YAML."""
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"input:\n  url: {tmp_path / 'in'}\n  storage_options:\n    client_kwargs:\n"
        f"      aws_access_key_id: {SECRET_KEY}\n      aws_secret_access_key: {SECRET}\n"
        f"      aws_session_token: {SECRET}-token\n"
        f"output:\n  url: {tmp_path / 'out'}\n")
    code = main(["run", str(spec), "--dry-run", "--set", f"output.storage_options.key={SECRET_KEY}",
                 "--set", f"output.storage_options.secret={SECRET}"])
    printed = capsys.readouterr()
    assert code == 0
    assert SECRET not in printed.out + printed.err and SECRET_KEY not in printed.out + printed.err
    assert "aws_secret_access_key: '***'" in printed.out and "secret: '***'" in printed.out
    assert "part-00000.parquet" in printed.out  # still shows what would be read


def test_no_output_file_holds_a_secret(ray_local, tmp_path, tiny_model):
    """Nothing written beside the outputs (manifest, config, stats, markers) holds a credential."""
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    opts = {"key": SECRET_KEY, "secret": SECRET}  # the local filesystem ignores them; they travel all the same
    run_job(small_job(tmp_path / "in", tmp_path / "out", tiny_model, input={"storage_options": opts},
                 output={"storage_options": dict(opts)}))
    for root, _, names in os.walk(tmp_path / "out"):
        for name in names:
            data = open(os.path.join(root, name), "rb").read()
            assert SECRET.encode() not in data and SECRET_KEY.encode() not in data, os.path.join(root, name)
    assert _manifest(tmp_path / "out")["config"]["input"]["storage_options"]["secret"] == "***"


# -- one recipe per output folder -------------------------------------------------------------
def test_recipe_change_after_a_shard_left_the_input(ray_local, tmp_path, tiny_model):
    """A reader that globs vectors/ never sees two recipes: after a removed shard and a pooling change
    it gets exactly the rows the manifest counts; the old files are moved aside, not deleted."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_shards(inp, SAMPLE_TEXTS * 3, n_shards=3)  # 12 rows per shard
    run_job(small_job(inp, out, tiny_model, encode={"pooling": "mean"}))
    assert _glob_rows(out) == 36
    os.remove(inp / "part-00002.parquet")
    res = run_job(small_job(inp, out, tiny_model, encode={"pooling": "cls"}))
    assert _glob_rows(out) == 24 == res.manifest["totals"]["rows_out"]
    assert _glob_rows(out, "tokens") == 24
    assert sorted(os.listdir(out / "vectors")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not os.path.exists(out / "_done" / "part-00002.json")
    moved = res.manifest["superseded"]
    assert set(moved["shards"]) == {"part-00002"}
    assert "another recipe" in moved["shards"]["part-00002"]["reason"]
    aside = out / moved["to"]
    assert pq.read_table(aside / "vectors" / "part-00002.parquet").num_rows == 12  # kept, aside
    assert (aside / "_done" / "part-00002.json").exists() and (aside / "moved.json").exists()


def test_removed_shard_same_recipe_moved_by_default_kept_on_request(ray_local, tmp_path, tiny_model):
    """A shard that left the input (same recipe) is moved aside by default, or kept and listed as such
    with output.removed_shards=keep; either way the manifest's rows equal the globbed rows."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_shards(inp, SAMPLE_TEXTS * 3, n_shards=3)
    run_job(small_job(inp, out, tiny_model))
    os.remove(inp / "part-00001.parquet")
    kept = run_job(small_job(inp, out, tiny_model, output={"removed_shards": "keep"}))
    assert kept.manifest["shards"]["part-00001"]["status"] == "kept-not-in-input"
    assert _glob_rows(out) == 36 == kept.manifest["totals"]["rows_out"]
    assert kept.manifest["totals"]["done"] == 0  # nothing re-encoded
    moved = run_job(small_job(inp, out, tiny_model))
    assert "part-00001" not in moved.manifest["shards"]
    assert "not in the input" in moved.manifest["superseded"]["shards"]["part-00001"]["reason"]
    assert _glob_rows(out) == 24 == moved.manifest["totals"]["rows_out"]


def test_failed_shard_keeps_no_vectors_of_another_recipe(ray_local, tmp_path, tiny_model):
    """A shard that fails after a recipe change has its old-recipe vectors moved aside; one that fails
    under the same recipe keeps its previous commit, listed as such and counted."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_shards(inp, SAMPLE_TEXTS * 3, n_shards=3)
    run_job(small_job(inp, out, tiny_model))
    good = open(inp / "part-00000.parquet", "rb").read()
    (inp / "part-00000.parquet").write_bytes(b"not parquet at all")
    same = run_job(small_job(inp, out, tiny_model, input={"on_bad_shard": "skip"}))
    row = same.manifest["shards"]["part-00000"]
    assert row["status"] == "failed" and row["previous_commit"] == "kept"
    assert _glob_rows(out) == 36 == same.manifest["totals"]["rows_out"]
    changed = run_job(small_job(inp, out, tiny_model, input={"on_bad_shard": "skip"}, encode={"pooling": "max"}))
    assert changed.manifest["shards"]["part-00000"]["status"] == "failed"
    assert "part-00000" in changed.manifest["superseded"]["shards"]
    assert _glob_rows(out) == 24 == changed.manifest["totals"]["rows_out"]
    (inp / "part-00000.parquet").write_bytes(good)
    back = run_job(small_job(inp, out, tiny_model, encode={"pooling": "max"}))
    assert back.manifest["totals"]["done"] == 1 and _glob_rows(out) == 36


def test_leftovers_and_missing_files_are_never_trusted(ray_local, tmp_path, tiny_model):
    """Files no commit vouches for are moved aside; a marker whose files are gone is redone."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_shards(inp, SAMPLE_TEXTS, n_shards=2)
    run_job(small_job(inp, out, tiny_model))
    pq.write_table(pa.table({"id": ["planted"], "vector": [[0.0] * 32], "n_tokens": [1]}),
                   out / "vectors" / "zz-orphan.parquet")
    os.remove(out / "vectors" / "part-00001.parquet")
    res = run_job(small_job(inp, out, tiny_model))
    assert res.manifest["shards"]["part-00001"]["status"] == "done"
    assert res.manifest["superseded"]["shards"]["zz-orphan"]["reason"] == "uncommitted leftover"
    assert sorted(os.listdir(out / "vectors")) == ["part-00000.parquet", "part-00001.parquet"]
    assert _glob_rows(out) == len(SAMPLE_TEXTS) == res.manifest["totals"]["rows_out"]


def test_manifest_is_written_when_a_stage_fails(ray_local, tmp_path, tiny_model):
    """A failed corpus stage still leaves a manifest that says so and records every committed shard."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_shards(inp, SAMPLE_TEXTS, n_shards=2)
    with pytest.raises(JobError, match="word2vec"):
        run_job(small_job(inp, out, tiny_model, word2vec={"enabled": True, "min_count": 10_000}))
    m = _manifest(out)
    assert m["status"] == "failed" and "word2vec" in m["error"]
    assert m["totals"]["committed_shards"] == 2 and m["totals"]["rows_out"] == len(SAMPLE_TEXTS)


# -- ids --------------------------------------------------------------------------------------
def test_null_id_is_refused_before_any_work(tmp_path, capsys):
    """A null id is one line naming the shard and the row, exit 2, before Ray starts or anything is written."""
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": ["a", None, "c"], "text": ["x y", "y z", "z w"]}), tmp_path / "in" / "p.parquet")
    code = main(["run", "--set", f"input.url={tmp_path / 'in'}", "--set", f"output.url={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "p.parquet" in err[0] and "row 1" in err[0] and "null" in err[0]
    assert not os.path.exists(tmp_path / "out")


def test_duplicate_ids_fail_naming_both_shards_or_warn_and_count(ray_local, tmp_path, tiny_model, capsys):
    """An id found twice (here across shards) stops the job at launch naming it and both places;
    with input.on_duplicate_id=warn the job goes on and the manifest counts the duplicates."""
    inp = tmp_path / "in"
    os.makedirs(inp)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": SAMPLE_TEXTS[:3]}), inp / "p0.parquet")
    pq.write_table(pa.table({"id": ["d", "b"], "text": SAMPLE_TEXTS[3:5]}), inp / "p1.parquet")
    code = main(["run", "--set", f"input.url={inp}", "--set", f"output.url={tmp_path / 'out'}",
                 "--set", f"encode.model={tiny_model}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "'b'" in err[0] and "p0.parquet row 1" in err[0] and "p1.parquet row 1" in err[0]
    assert not os.path.exists(tmp_path / "out")
    res = run_job(small_job(inp, tmp_path / "out", tiny_model, input={"on_duplicate_id": "warn"}))
    ids = res.manifest["input"]["ids"]
    assert ids["duplicate_rows"] == 1 and ids["duplicated_ids"] == 1 and ids["examples"][0]["id"] == "b"


def test_null_id_under_skip_marks_only_that_shard_bad(ray_local, tmp_path, tiny_model):
    """With on_bad_shard=skip a shard with a null id is recorded as failed (naming the row); the rest run."""
    inp = tmp_path / "in"
    write_shards(inp, SAMPLE_TEXTS, n_shards=2)
    pq.write_table(pa.table({"id": pa.array([None], pa.string()), "text": ["lonely text"]}), inp / "part-00009.parquet")
    res = run_job(small_job(inp, tmp_path / "out", tiny_model, input={"on_bad_shard": "skip"}))
    assert res.failed_shards == ["part-00009"]
    assert "row 0" in res.manifest["shards"]["part-00009"]["reason"]
    assert _glob_rows(tmp_path / "out") == len(SAMPLE_TEXTS)


def test_recipe_change_on_s3_moves_old_outputs_aside(ray_local, s3_bucket, tiny_model):
    """The same one-recipe contract on object storage (moto's S3 server): old files copied aside, then removed."""
    from embedjob.storage import Storage

    bucket, opts = s3_bucket
    store = Storage(f"s3://{bucket}", opts)
    for s in range(3):
        store.write_parquet(f"in/part-{s}.parquet", pa.table({"id": [f"d{s}-{i}" for i in range(4)],
                                                              "text": SAMPLE_TEXTS[4 * s: 4 * s + 4]}))

    def cfg(pooling):
        return small_job(f"s3://{bucket}/in", f"s3://{bucket}/out", tiny_model, encode={"pooling": pooling},
                    input={"storage_options": opts}, output={"storage_options": opts})

    run_job(cfg("mean"))
    store.delete("in/part-2.parquet")
    res = run_job(cfg("cls"))
    assert store.list("out/vectors") == ["part-0.parquet", "part-1.parquet"]
    assert res.manifest["totals"]["rows_out"] == 8
    run = res.manifest["superseded"]["run"]
    assert store.list(f"out/_superseded/{run}/vectors") == ["part-2.parquet"]
    assert store.exists(f"out/_superseded/{run}/_done/part-2.json")
