"""The Lance sink (output.lance): LanceDB opens the dataset and finds a planted document's
neighbours; reruns and a recipe change leave every id exactly once and one recipe in the latest
version; the same on S3 (moto's server). Real local Ray, real files. A killed driver and a retried
commit: test_faults.py::test_sigkill_driver_mid_encode_then_resume runs with output.lance on."""

import json
import os

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
from tests.helpers import small_job

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
    res = run_job(job(pooling="cls"))  # a changed shard and a recipe change: every old fragment leaves
    assert res.manifest["stages"]["lance"]["rows"] == len(ids) and res.manifest["stages"]["lance"]["version"] == 2
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
                     ({"lance": True, "lance_index": "ivf_pq", "vector_dtype": "int8"}, "float32, float16 or binary"),
                     ({"lance": True, "carry_columns": ["vector"]}, "clash")]:
        with pytest.raises(ConfigError, match=msg):
            build_config({"output": bad})


def test_missing_carry_column_or_memory_output_stops_before_work(tmp_path, tiny_model):
    write_shards(tmp_path / "in", SAMPLE_TEXTS)
    cfg = small_job(tmp_path / "in", tmp_path / "out", tiny_model, output={"lance": True, "carry_columns": ["lang"]})
    with pytest.raises(ConfigError, match=r"output.carry_columns: \['lang'\] not in input shard"):
        run_job(cfg)
    assert not (tmp_path / "out").exists()
    cfg = small_job(tmp_path / "in", "memory://out", tiny_model, output={"lance": True})
    with pytest.raises(ConfigError, match="Lance cannot write to memory://"):
        run_job(cfg)


@pytest.mark.parametrize("id_type", [pa.int64(), pa.string()])
def test_removed_ids_from_the_lookup_and_from_a_dataset_scan(tmp_path, id_type):
    """The Lance merge's deletes, both ways, for integer and string ids: from the reuse lookup's
    removed-id files (strings, cast to the dataset's id type) when the lookup read every commit of
    the version, else from the dataset's own id column against the kept shards' ids (already of the
    dataset's type: the cast that raised ArrowTypeError there once is not applied)."""
    import lance

    from embedjob.layout import VECTORS, shard_file
    from embedjob.stages.lance_sink.merge import removed_ids

    out = Storage(str(tmp_path / "out"))
    ids = pa.array([1, 2, 3, 4, 5], pa.int64()).cast(id_type)
    current = lance.write_dataset(pa.table({"id": ids, "x": pa.array([0.5] * 5, pa.float32())}),
                                  str(tmp_path / "docs.lance"))
    out.write_parquet(shard_file(VECTORS, "part-a"), pa.table({"id": ids.slice(0, 2)}))
    out.write_parquet(shard_file(VECTORS, "part-b"), pa.table({"id": ids.slice(4, 1)}))
    keep = {"part-a": {"commit": "c2"}, "part-b": {"commit": "c1"}}
    prev = {"part-a": "c1", "part-b": "c1"}
    want = [current.to_table().column("id")[i].as_py() for i in (2, 3)]

    assert removed_ids(out, current, keep, prev, None) == (want, "dataset scan")
    out.write_parquet("_tmp/removed/00000.parquet", pa.table({"id": pa.array(["4"], pa.string())}))
    out.write_parquet("_tmp/removed/00001.parquet", pa.table({"id": pa.array(["3"], pa.string())}))
    lookup = {"folder": "_tmp/removed", "read": {"part-a": "c1"}}
    assert removed_ids(out, current, keep, prev, lookup) == (want, "lookup")
    # the lookup did not read part-b's commit and part-b is not kept as it was: the dataset is scanned
    assert removed_ids(out, current, {"part-a": {"commit": "c2"}, "part-b": {"commit": "c3"}}, prev,
                       lookup) == (want, "dataset scan")
