"""End-to-end runs of the job on a real local Ray (one per module)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.config import build_config
from embedjob.pipeline import run_job
from tests.conftest import ONLY_SHARD_STAGES, SAMPLE_TEXTS, write_shards


def _cfg(inp, out, model, **sections):
    data = {"input": {"url": str(inp)}, "output": {"url": str(out)},
            **{k: dict(v) for k, v in ONLY_SHARD_STAGES.items()},
            "encode": {"model": model, "dtype": "float32", "rows_per_call": 8}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return build_config(data)


def _read_vectors(out):
    return pq.read_table(os.path.join(out, "vectors"))


def test_vectors_equal_sentence_transformers(ray_local, tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = SAMPLE_TEXTS * 2
    ids = write_shards(tmp_path / "in", texts, n_shards=3)
    res = run_job(_cfg(tmp_path / "in", tmp_path / "out", "all-MiniLM-L6-v2"))
    t = _read_vectors(tmp_path / "out")
    got = dict(zip(t.column("id").to_pylist(), np.array(t.column("vector").to_pylist(), dtype=np.float32)))
    ref = SentenceTransformer(minilm_path, device="cpu").encode(texts)
    for i, doc_id in enumerate(ids):
        cos = float(got[doc_id] @ ref[i] / np.linalg.norm(got[doc_id]) / np.linalg.norm(ref[i]))
        assert cos >= 0.999, (doc_id, cos)
    assert res.manifest["encoder"]["dtype"] == "float32"


def test_every_row_exactly_once_with_empty_text_kept(ray_local, tmp_path, tiny_model):
    texts = SAMPLE_TEXTS + [None, "", "   "] + SAMPLE_TEXTS
    ids = write_shards(tmp_path / "in", texts, n_shards=4)
    run_job(_cfg(tmp_path / "in", tmp_path / "out", tiny_model, input={"rows_per_block": 16}))
    out = tmp_path / "out"
    t = _read_vectors(out)
    assert sorted(t.column("id").to_pylist()) == sorted(ids)
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 32)
    by_id = dict(zip(t.column("id").to_pylist(), t.column("vector").to_pylist()))
    for i in (12, 13, 14):
        assert by_id[ids[i]] is None
    # per-shard outputs keep input order and names
    for s in range(4):
        shard = pq.read_table(out / "vectors" / f"part-{s:05d}.parquet")
        assert shard.column("id").to_pylist() == [ids[i] for i in range(s, len(texts), 4)]
        tok = pq.read_table(out / "tokens" / f"part-{s:05d}.parquet")
        assert tok.column("id").to_pylist() == shard.column("id").to_pylist()
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"]["rows_out"] == len(texts)
    assert json.loads((out / "stats" / "preprocess.json").read_text())["empty_text"] == 3
    assert m["versions"]["ray"] and m["encoder"]["model_fingerprint"]
    assert not list((out / "_tmp").glob("*/*")) if (out / "_tmp").exists() else True


def test_empty_text_skip_is_counted(ray_local, tmp_path, tiny_model):
    texts = ["a real document about cats", None, "another one about dogs", ""]
    write_shards(tmp_path / "in", texts, n_shards=1)
    res = run_job(_cfg(tmp_path / "in", tmp_path / "out", tiny_model, input={"on_empty_text": "skip"}))
    assert _read_vectors(tmp_path / "out").num_rows == 2
    assert res.manifest["shards"]["part-00000"]["skipped_empty"] == 2


def test_outputs_readable_without_embedjob(ray_local, tmp_path, tiny_model):
    import duckdb
    import pandas as pd

    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    run_job(_cfg(tmp_path / "in", tmp_path / "out", tiny_model))
    vec_glob = str(tmp_path / "out" / "vectors" / "*.parquet")
    n, dim = duckdb.sql(f"select count(*), max(len(vector)) from '{vec_glob}'").fetchall()[0]
    assert (n, dim) == (len(SAMPLE_TEXTS), 32)
    df = pd.read_parquet(tmp_path / "out" / "tokens")
    assert len(df) == len(SAMPLE_TEXTS) and "cat" in df.tokens.iloc[0].tolist()


def test_rerun_skips_committed_shards_and_adds_new(ray_local, tmp_path, tiny_model):
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    cfg = _cfg(tmp_path / "in", tmp_path / "out", tiny_model)
    first = run_job(cfg)
    assert first.manifest["totals"]["done"] == 2
    again = run_job(cfg)
    assert first.manifest["totals"]["documents"] == {"encoded": len(SAMPLE_TEXTS), "reused": 0, "removed": 0}
    assert again.manifest["totals"] == {**first.manifest["totals"], "done": 0, "skipped_unchanged": 2,
                                        "documents": {"encoded": 0, "reused": 0, "removed": 0}}  # shards skipped whole
    assert again.manifest["stages"]["vocab"]["status"] == "skipped-unchanged"
    pq.write_table(pa.table({"id": ["new-1"], "text": ["a brand new shard"]}), tmp_path / "in" / "part-00009.parquet")
    third = run_job(cfg)
    assert [k for k, v in third.manifest["shards"].items() if v["status"] == "done"] == ["part-00009"]
    assert third.manifest["stages"]["vocab"]["status"] == "done"
    assert _read_vectors(tmp_path / "out").num_rows == len(SAMPLE_TEXTS) + 1
