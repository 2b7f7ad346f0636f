"""The Lance sink (output.lance): LanceDB opens the dataset and finds a planted document's
neighbours; reruns, a killed driver and a recipe change leave every id exactly once and one recipe
in the latest version; the same on S3 (moto's server). Real local Ray, real files."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.config import build_config
from embedjob.errors import ConfigError
from embedjob.pipeline import run_job
from embedjob.stages.lance_sink.dataset import build_index
from embedjob.storage import Storage
from tests.conftest import ONLY_SHARD_STAGES, SAMPLE_TEXTS, write_shards
from tests.helpers import small_job, small_job_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED = "A planted sentence about violet submarines humming under the frozen northern sea."


def _corpus(folder, n_shards=3):
    """SAMPLE_TEXTS plus a planted text and its twin (same text, another shard): the twin is the
    planted document's nearest neighbour whatever the model."""
    texts = SAMPLE_TEXTS + [PLANTED, PLANTED.upper().lower()]
    langs = ["en"] * len(texts)
    ids = write_shards(folder, texts, n_shards=n_shards, extra_columns={"lang": langs})
    return ids, ids[-2], ids[-1]


def _lance_ids(uri, **opts):
    import lance

    return lance.dataset(uri, **opts).to_table(columns=["id"]).column("id").to_pylist()


def _parquet_vectors(out):
    t = pq.read_table(os.path.join(out, "vectors"), columns=["id", "vector"])
    x = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(), np.float32).reshape(t.num_rows, -1)
    return t.column("id").to_pylist(), x


def test_lancedb_finds_planted_neighbours_rerun_and_recipe_change(ray_local, tmp_path, tiny_model):
    import lance
    import lancedb

    ids, planted, twin = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    lance_cfg = {"lance": True, "carry_columns": ["text", "lang"]}
    res = run_job(small_job(tmp_path / "in", out, tiny_model, output=lance_cfg))
    assert res.ok and res.manifest["stages"]["lance"]["rows"] == len(ids)
    table = lancedb.connect(str(out / "lance")).open_table("docs")
    assert table.count_rows() == len(ids)
    row = table.search().where(f"id = '{planted}'").limit(1).to_list()[0]
    assert row["text"] == PLANTED and row["lang"] == "en" and row["n_tokens"] > 0
    hits = table.search(np.asarray(row["vector"], np.float32)).distance_type("l2").limit(5).to_list()
    assert {h["id"] for h in hits[:2]} == {planted, twin}
    pids, x = _parquet_vectors(out)  # the same neighbours as exact search over vectors/*.parquet
    q = x[pids.index(planted)]
    exact = [pids[i] for i in np.argsort(((x - q) ** 2).sum(1), kind="stable")[:5]]
    assert set(h["id"] for h in hits) == set(exact)
    version = lance.dataset(str(out / "lance" / "docs.lance")).version
    first = lance.dataset(str(out / "lance" / "docs.lance")).to_table(columns=["id", "vector"])

    # an unchanged rerun commits no new version
    res = run_job(small_job(tmp_path / "in", out, tiny_model, output=lance_cfg))
    assert res.manifest["stages"]["lance"]["committed"] is False
    assert lance.dataset(str(out / "lance" / "docs.lance")).version == version

    # a marker whose fragments are gone: that shard is re-encoded, the others kept
    gone = json.loads((out / "_done" / "part-00000.json").read_text())["lance"]["fragments"][0]["files"][0]["path"]
    os.remove(out / "lance" / "docs.lance" / "data" / gone)
    res = run_job(small_job(tmp_path / "in", out, tiny_model, output=lance_cfg))
    assert {k: v["status"] for k, v in res.manifest["shards"].items()} == {
        "part-00000": "done", "part-00001": "skipped-unchanged", "part-00002": "skipped-unchanged"}
    assert sorted(_lance_ids(str(out / "lance" / "docs.lance"))) == sorted(ids)
    version = lance.dataset(str(out / "lance" / "docs.lance")).version
    first = lance.dataset(str(out / "lance" / "docs.lance")).to_table(columns=["id", "vector"])

    # a recipe change: the latest version holds the new recipe only, the old one stays in history
    res = run_job(small_job(tmp_path / "in", out, tiny_model, output=lance_cfg, encode={"pooling": "cls"}))
    ds = lance.dataset(str(out / "lance" / "docs.lance"))
    assert ds.version > version
    got = ds.to_table(columns=["id", "vector"])
    assert sorted(got.column("id").to_pylist()) == sorted(ids)
    pids, x = _parquet_vectors(out)
    lx = np.asarray(got.column("vector").combine_chunks().flatten().to_numpy(), np.float32).reshape(len(ids), -1)
    order = [pids.index(i) for i in got.column("id").to_pylist()]
    np.testing.assert_array_equal(lx, x[order])  # every row of the latest version is the new recipe's
    old = lance.dataset(str(out / "lance" / "docs.lance"), version=version).to_table(columns=["id", "vector"])
    assert old.column("id").to_pylist() == first.column("id").to_pylist()  # history kept as it was
    assert old.column("vector").equals(first.column("vector"))


def test_killed_driver_then_rerun_leaves_each_id_once(ray_local, tmp_path, tiny_model):
    texts = [f"{t} number {i}" for i in range(30) for t in SAMPLE_TEXTS[:4]]  # 120 docs
    ids = write_shards(tmp_path / "in", texts, n_shards=6)
    out = tmp_path / "out"
    data = small_job_data(tmp_path / "in", out, tiny_model, input={"rows_per_block": 4},
                          encode={"rows_per_call": 4, "actors": 1}, output={"lance": True, "carry_columns": ["text"]},
                          ray={"num_cpus": 2})
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    env = {**os.environ, "RAY_ADDRESS": "", "EMBEDJOB_DEBUG_ENCODE_DELAY": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done_dir = out / "_done"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if done_dir.exists() and len(list(done_dir.glob("part-*.json"))) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("job ended before it could be killed: " + proc.stderr.read().decode()[-2000:])
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    finally:
        proc.wait(timeout=60)
    committed = list(done_dir.glob("part-*.json"))
    assert 2 <= len(committed) < 6
    frag_files = list((out / "lance" / "docs.lance" / "data").glob("*.lance"))
    assert len(frag_files) >= 2  # fragments written with the commits, before any dataset version
    # a retried commit task leaves a second copy of a shard's fragments: plant one
    marker = json.loads(committed[0].read_text())
    from embedjob.stages.lance_sink.write import write_shard_fragments

    vec = pq.read_table(out / "vectors" / f"{marker['shard']}.parquet")
    write_shard_fragments(Storage(str(out)), marker["shard"], vec, pa.array(range(vec.num_rows)),
                          {"carry_columns": ["text"], "input_url": marker["input"]["url"]})
    again = small_job(tmp_path / "in", out, tiny_model, input={"rows_per_block": 4},
                      encode={"rows_per_call": 4, "actors": 1}, output={"lance": True, "carry_columns": ["text"]})
    res = run_job(again)
    res2 = run_job(again)
    assert res.ok and res2.manifest["stages"]["lance"]["committed"] is False
    got = _lance_ids(str(out / "lance" / "docs.lance"))
    assert len(got) == len(ids) and sorted(got) == sorted(ids)  # every id exactly once


def test_lance_on_s3_rerun_and_recipe_change(ray_local, s3_bucket, tmp_path, tiny_model):
    import lancedb

    bucket, opts = s3_bucket
    store = Storage(f"s3://{bucket}", opts)
    ids = [f"d{i}" for i in range(len(SAMPLE_TEXTS))]
    for s in range(2):
        store.write_parquet(f"in/part-{s}.parquet", pa.table({"id": ids[s::2], "text": SAMPLE_TEXTS[s::2]}))

    def job(**encode):
        return build_config({
            "input": {"url": f"s3://{bucket}/in", "storage_options": opts},
            "output": {"url": f"s3://{bucket}/out", "storage_options": opts, "lance": True,
                       "carry_columns": ["text"]},
            "encode": {"model": tiny_model, "dtype": "float32", **encode}, **ONLY_SHARD_STAGES,
        })

    assert run_job(job()).ok
    store.write_parquet("in/part-1.parquet", pa.table({"id": ids[1::2], "text": [t + " Changed." for t in
                                                                                 SAMPLE_TEXTS[1::2]]}))
    res = run_job(job())  # part-1 re-encoded: its old fragments leave the latest version
    assert res.manifest["shards"]["part-1"]["status"] == "done"
    res = run_job(job(pooling="cls"))  # recipe change
    assert res.manifest["stages"]["lance"]["rows"] == len(ids)
    uri, lopts = Storage(f"s3://{bucket}/out", opts).object_store("lance")
    table = lancedb.connect(uri, storage_options=lopts).open_table("docs")
    rows = table.to_arrow()
    assert sorted(rows.column("id").to_pylist()) == sorted(ids)  # each id once, one recipe
    assert rows.filter(pa.compute.equal(rows.column("id"), "d1")).column("text")[0].as_py().endswith("Changed.")
    vec = pq.read_table(pa.BufferReader(store.read_bytes("out/vectors/part-0.parquet")))
    want = dict(zip(vec.column("id").to_pylist(), vec.column("vector").to_pylist()))
    for i, v in zip(rows.column("id").to_pylist(), rows.column("vector").to_pylist()):
        if i in want:
            assert np.allclose(v, want[i])  # the new (cls) recipe's vectors


def test_lance_index_recall_and_settings(tmp_path):
    import lance

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32)).astype(np.float32)
    x = centers[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = pa.table({"id": [f"v{i}" for i in range(len(x))],
                  "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 32)})
    ds = lance.write_dataset(t, str(tmp_path / "v.lance"))
    stats = build_index(ds, "ivf_pq", min_rows=1000, normalized=True)
    assert stats["built"] and 0.3 <= stats["recall@10"] <= stats["recall@10_refine_factor_10"], stats
    assert stats["recall@10_refine_factor_10"] >= 0.8, stats
    assert any("vector" in i["fields"] for i in lance.dataset(str(tmp_path / "v.lance")).list_indices())
    assert not build_index(ds, "ivf_hnsw_sq", min_rows=10_000, normalized=True)["built"]
    for bad, msg in [({"carry_columns": ["text"]}, "needs output.lance"),
                     ({"lance": True, "lance_index": "ivf_pq", "vector_dtype": "int8"}, "float32 or float16"),
                     ({"lance": True, "carry_columns": ["vector"]}, "clash")]:
        with pytest.raises(ConfigError, match=msg):
            build_config({"output": bad})


def test_missing_carry_column_stops_before_work(tmp_path, tiny_model):
    write_shards(tmp_path / "in", SAMPLE_TEXTS)
    cfg = small_job(tmp_path / "in", tmp_path / "out", tiny_model, output={"lance": True, "carry_columns": ["lang"]})
    with pytest.raises(ConfigError, match=r"output.carry_columns: \['lang'\] not in input shard"):
        run_job(cfg)
    assert not (tmp_path / "out").exists()
