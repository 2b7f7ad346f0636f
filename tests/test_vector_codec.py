"""output.vector_dtype: float16, int8 (one scale shared by every shard; files with the older per-shard
ranges still decode) and binary (packed bits, Hamming search in FAISS), in Parquet, Lance and the
index that `embedjob search` reads."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.pipeline import run_job
from embedjob.stages.index.search import Searcher
from embedjob.vector_codec import bytes_per_vector, codec_of, decode, encode, packed, with_codec
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job

PLANTED = "A planted sentence about violet submarines humming under the frozen northern sea."


def test_codecs_round_trip_within_their_precision():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 24)).astype(np.float32)
    valid = np.ones(50, bool)
    valid[3] = False
    arr, codec = encode(x, "float16", valid)
    assert arr.type.value_type == pa.float16() and arr.null_count == 1
    np.testing.assert_allclose(decode(arr.filter(pa.array(valid)), codec), x[valid], atol=1e-2)

    arr, codec = encode(x, "int8", valid, int8_max=4.0)
    assert codec["scale"] == pytest.approx(4 / 127) and codec["scheme"] == "symmetric_v1"
    err = np.abs(decode(arr.filter(pa.array(valid)), codec) - x[valid])
    assert (err <= codec["scale"] / 2 + 1e-5).all() and arr.type.value_type == pa.int8()
    old = {"dtype": "int8", "dim": 24, "ranges": [[-1.0] * 24, [1.0] * 24]}  # written before the shared scale
    np.testing.assert_allclose(decode(pa.array([[-128] * 24, [127] * 24], pa.list_(pa.int8(), 24)), old),
                               [[-1.0] * 24, [1.0] * 24], atol=1e-6)

    arr, codec = encode(x, "binary")
    assert arr.type.list_size == 3 and packed(arr).dtype == np.uint8
    np.testing.assert_array_equal(decode(arr, codec), (x > 0).astype(np.float32))
    assert [bytes_per_vector(d, 384) for d in ("float32", "float16", "int8", "binary")] == [1536, 768, 384, 48]
    schema = with_codec(pa.schema([("vector", arr.type)]), codec)
    assert codec_of(schema)["dtype"] == "binary" and codec_of(pa.schema([]))["dtype"] == "float32"
    with pytest.raises(ValueError, match="valid: float32"):
        encode(x, "int4")


def _ids_and_shards(tmp_path):
    ids = write_shards(tmp_path / "in", SAMPLE_TEXTS + [PLANTED, PLANTED.lower()], n_shards=2)
    return ids, {ids[-2], ids[-1]}


def test_int8_then_binary_job_search_and_manifest(ray_local, tmp_path, tiny_model):
    import lance

    ids, planted = _ids_and_shards(tmp_path)
    out = tmp_path / "out"
    res = run_job(small_job(tmp_path / "in", out, tiny_model, index={"enabled": True},
                            output={"vector_dtype": "int8", "int8_max": 4.0, "lance": True}))
    assert res.ok
    t = pq.read_table(out / "vectors" / "part-00000.parquet")
    assert t.schema.field("vector").type.value_type == pa.int8()
    codec = codec_of(t.schema)
    shard = res.manifest["shards"]["part-00000"]
    assert shard["vector_codec"]["scale"] == codec["scale"] == pytest.approx(4 / 127) and codec["dim"] == 32
    ds = lance.dataset(str(out / "lance" / "docs.lance"))
    assert ds.schema.field("vector").type.value_type == pa.int8() and ds.count_rows() == len(ids)
    hits = Searcher(str(out)).search(PLANTED, k=2, with_text=False)
    assert {h["id"] for h in hits} == planted

    res = run_job(small_job(tmp_path / "in", out, tiny_model, index={"enabled": True},
                            output={"vector_dtype": "binary"}))
    t = pq.read_table(out / "vectors" / "part-00001.parquet")
    assert t.schema.field("vector").type == pa.list_(pa.uint8(), 4)  # 32 dimensions, 4 bytes
    assert res.manifest["stages"]["index"]["docs"]["kind"] == "binary_flat"
    hits = Searcher(str(out)).search(PLANTED, k=2, with_text=False)
    assert {h["id"] for h in hits} == planted and hits[0]["score"] == 0  # Hamming distance 0
    assert codec_of(pq.read_schema(out / "vectors" / "part-00000.parquet"))["dtype"] == "binary"  # one recipe
    moved = res.manifest["stages"]["lance"]["moved_aside"]  # lance is off now: the int8 dataset moved aside
    assert not (out / "lance" / "docs.lance").exists() and (out / moved).is_dir()


def test_bench_vectors_on_random_vectors():
    from embedjob.bench.vectors import run_bench

    rng = np.random.default_rng(1)
    x = rng.normal(size=(1200, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    docs = pa.table({"id": [f"d{i}" for i in range(len(x))], "text": [f"text {i}" for i in range(len(x))]})
    res = run_bench(docs, x, 12.0, queries=100, shard_rows=300, lance_index="none")
    rows = res["dtypes"]
    assert res["documents"] == 1100 and res["shards"] == 4
    assert rows["float32"]["recall_at_10"] == 1.0  # flat search over float32 is the exact search
    assert [rows[d]["bytes_per_vector"] for d in ("float32", "float16", "int8", "binary")] == [256, 128, 64, 8]
    assert rows["float16"]["recall_at_10"] >= 0.98 and rows["int8"]["recall_at_10"] >= 0.8
    assert rows["binary"]["recall_at_10"] < rows["int8"]["recall_at_10"]
    assert all(0 < rows[d]["lance_write_share_of_encode"] for d in rows)
