"""Index stage and `embedjob search`: synthetic vector shards in the output layout, a real
(MiniLM) encoder for search, and an index written to moto S3 and read back."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.cli import main as cli_main
from embedjob.config import JobConfig
from embedjob.stages.encode import vectors_to_arrow
from embedjob.stages.index import IndexConfig
from embedjob.stages.index.config import (
    choose_kind,
    default_nlist,
    default_pq_m,
    resolve_metric,
)
from embedjob.stages.index.search import Searcher, load_index, search
from embedjob.stages.index.stage import run_index
from embedjob.storage import Storage
from embedjob.wordvectors import write_keyed_vectors
from tests.conftest import SAMPLE_TEXTS, write_shards


def _write_vector_shards(out: Storage, n_shards: int = 3, n: int = 400, dim: int = 16, *, null_every: int = 0,
                         normalize: bool = True, seed: int = 0):
    """vectors/part-i.parquet like the pipeline writes them; returns (urls, {id: vector})."""
    rng = np.random.default_rng(seed)
    urls, truth = [], {}
    for s in range(n_shards):
        v = rng.standard_normal((n, dim)).astype(np.float32)
        if normalize:
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        valid = np.ones(n, bool)
        if null_every:
            valid[::null_every] = False
        ids = [f"s{s}-{i:04d}" for i in range(n)]
        table = pa.table({"id": ids, "vector": vectors_to_arrow(v, valid),
                          "n_tokens": pa.array(np.full(n, 5, np.int32))})
        out.write_parquet(f"vectors/part-{s:05d}.parquet", table)
        urls.append(out.url(f"vectors/part-{s:05d}.parquet"))
        truth.update({i: v[r] for r, i in enumerate(ids) if valid[r]})
    return urls, truth


def _cfg(**index) -> IndexConfig:
    return JobConfig(index=index).index


def test_config_defaults_and_choices():
    c = IndexConfig()
    assert c.enabled and c.kind == "auto" and c.words
    assert choose_kind(c, 100) == "flat"
    assert choose_kind(c, c.auto_flat_max + 1) == "hnsw"
    assert choose_kind(c, c.auto_hnsw_max + 1) == "ivf_pq"
    assert resolve_metric(c, True) == "ip" and resolve_metric(c, False) == "l2"
    assert resolve_metric(IndexConfig(metric="l2"), True) == "l2"
    assert default_pq_m(c, 384) == 48 and default_pq_m(c, 100) == 10
    assert default_pq_m(IndexConfig(pq_m=96), 384) == 96
    assert default_nlist(c, 100_000) == 1024
    assert default_nlist(c, 1_000_000) == 100_000 // 39  # at least 39 training points per cluster
    assert default_nlist(IndexConfig(train_sample=1000), 1_000_000) == 1000 // 39
    with pytest.raises(Exception, match="kind"):
        IndexConfig(kind="annoy")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
def test_ids_round_trip(tmp_path, kind):
    """Every document is found by its own vector, and its position maps back to its id, shard and row."""
    out = Storage(str(tmp_path / "out"))
    urls, truth = _write_vector_shards(out, null_every=7)
    extra = {"pq_m": 4, "pq_bits": 4, "refine_k_factor": 8, "ivf_nprobe": 64} if kind == "ivf_pq" else {}
    stats = run_index(_cfg(kind=kind, **extra), out, urls, True, [])
    meta = stats["docs"]
    assert meta["kind"] == kind and meta["metric"] == "ip"
    assert meta["count"] == len(truth) and meta["null_vectors"] == 3 * len(range(0, 400, 7))
    for f in ("index/docs.faiss", "index/docs_ids.parquet", "index/docs.json"):
        assert out.exists(f), f

    import faiss

    index = faiss.read_index(str(tmp_path / "out" / "index" / "docs.faiss"))  # plain FAISS, no pickle
    ids = pq.read_table(tmp_path / "out" / "index" / "docs_ids.parquet")
    assert ids.column_names == ["position", "id", "shard", "row"]
    assert ids.column("position").to_pylist() == list(range(len(truth)))
    keys = list(truth)
    q = np.stack([truth[i] for i in keys])
    _, labels = index.search(q, 1)
    found = ids.column("id").take(pa.array(labels[:, 0])).to_pylist()
    assert np.mean([a == b for a, b in zip(found, keys)]) >= 0.99
    # position -> (shard, row) points at the row of the vectors file holding that id
    for pos in (0, 17, len(truth) - 1):
        r = ids.slice(pos, 1).to_pylist()[0]
        vt = pq.read_table(tmp_path / "out" / "vectors" / f"{r['shard']}.parquet")
        assert vt.column("id")[r["row"]].as_py() == r["id"]


def test_ivf_parts_added_in_ray_tasks(tmp_path, ray_local):
    """IVF trains on a sample, adds each shard in its own Ray task and merges: same ids as inline."""
    out = Storage(str(tmp_path / "out"))
    urls, truth = _write_vector_shards(out, n_shards=4, n=300, null_every=5)
    run_index(_cfg(kind="ivf_flat", ivf_nlist=8, ivf_nprobe=8), out, urls, True, [])
    loaded = load_index(out)
    keys = list(truth)
    _, labels = loaded.search_vectors(np.stack([truth[i] for i in keys]), 1)
    assert loaded.ids.column("id").take(pa.array(labels[:, 0])).to_pylist() == keys


def test_auto_metric_l2_and_too_small_for_ivf(tmp_path):
    out = Storage(str(tmp_path / "out"))
    urls, _ = _write_vector_shards(out, n_shards=1, n=50, normalize=False)
    stats = run_index(_cfg(kind="ivf_pq"), out, urls, False, [])
    assert stats["docs"]["metric"] == "l2"
    assert stats["docs"]["kind"] == "flat" and "needs at least" in stats["docs"]["note"]


def test_no_vectors_is_a_clear_error(tmp_path):
    from embedjob.storage import StorageError

    out = Storage(str(tmp_path / "out"))
    out.write_parquet("vectors/a.parquet", pa.table({"id": ["x"], "vector": vectors_to_arrow(
        np.zeros((1, 4), np.float32), np.array([False])), "n_tokens": pa.array([0], pa.int32())}))
    with pytest.raises(StorageError, match="no non-null vector"):
        run_index(_cfg(), out, [out.url("vectors/a.parquet")], True, [])


def test_word_vector_indices(tmp_path):
    from gensim.models import KeyedVectors

    out = Storage(str(tmp_path / "out"))
    urls, _ = _write_vector_shards(out, n_shards=1, n=30)
    kv = KeyedVectors(vector_size=8)
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(40)]
    vecs = rng.standard_normal((40, 8)).astype(np.float32)
    vecs[1] = vecs[0] * 3 + 0.01  # w1 is w0's nearest neighbour (cosine)
    kv.add_vectors(words, vecs)
    write_keyed_vectors(kv, out.child("word2vec"))
    stats = run_index(_cfg(), out, urls, True, ["word2vec", "bert"])
    assert stats["words"]["word2vec"]["count"] == 40, stats
    assert "bert" in stats["words_skipped"]  # no static/vectors.bin
    assert out.exists("index/words-word2vec.faiss") and out.exists("index/words-word2vec_ids.parquet")
    from embedjob.stages.index.search import similar_words_in_index

    top = similar_words_in_index(out.url(), {}, "word2vec", "w0", k=3)
    assert top[0]["word"] == "w1" and top[0]["score"] > 0.99


def _encoded_job(tmp_path, minilm_path, texts, n_shards=3):
    """A job output made by hand: input shards, vectors/ written with the real encoder, manifest."""
    from embedjob.stages.encode import EncodeConfig, TextEncoder, resolve_encoder_settings

    inp = tmp_path / "in"
    write_shards(str(inp), texts, n_shards=n_shards)
    enc = TextEncoder(resolve_encoder_settings(EncodeConfig(model=minilm_path, dtype="float32")))
    out = Storage(str(tmp_path / "out"))
    shard_urls, vector_urls = {}, []
    for s in range(n_shards):
        key = f"part-{s:05d}"
        t = pq.read_table(inp / f"{key}.parquet")
        v = enc.encode_texts(t.column("text").to_pylist()).vectors
        out.write_parquet(f"vectors/{key}.parquet", pa.table({
            "id": t.column("id"), "vector": vectors_to_arrow(v), "n_tokens": pa.array(np.ones(len(v), np.int32))}))
        shard_urls[key] = str(inp / f"{key}.parquet")
        vector_urls.append(out.url(f"vectors/{key}.parquet"))
    manifest = {"encoder": enc.settings.as_dict(), "input": {"url": str(inp), "id_column": "id", "text_column": "text",
                                                   "storage_options": {}, "shards": shard_urls}}
    return out, vector_urls, manifest


def test_search_finds_document_by_its_own_text(tmp_path, minilm_path, capsys):
    out, urls, manifest = _encoded_job(tmp_path, minilm_path, SAMPLE_TEXTS)
    stats = run_index(_cfg(kind="hnsw"), out, urls, manifest["encoder"]["normalize"], [])
    manifest["stages"] = {"index": stats}
    out.write_json("manifest.json", manifest)

    s = Searcher(out.url())
    for i in (0, 5, 11):
        hits = s.search(SAMPLE_TEXTS[i], k=3)
        assert hits[0]["id"] == f"doc-{i:05d}"
        assert hits[0]["score"] > 0.99
        assert hits[0]["text_start"] == SAMPLE_TEXTS[i][:200]
    hits = search(out.url(), {}, "interest rates and the stock market", k=2)
    assert {h["id"] for h in hits} <= {"doc-00002", "doc-00003", "doc-00009"}

    # the CLI: ids, scores and the start of the text
    assert cli_main(["search", out.url(), SAMPLE_TEXTS[4], "-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hits"][0]["id"] == "doc-00004" and printed["hits"][0]["text_start"].startswith("The football")
    assert cli_main(["search", out.url(), "a symphony concert", "-k", "1"]) == 0
    assert "doc-00011" in capsys.readouterr().out


def test_search_with_moved_model_and_skipped_rows(tmp_path, minilm_path):
    """The stored model path is re-resolved; when vector rows do not line up with input rows
    (skipped empty texts), the text is found by id."""
    texts = ["", *SAMPLE_TEXTS[:6]]
    out, urls, manifest = _encoded_job(tmp_path, minilm_path, texts, n_shards=1)
    vt = pq.read_table(tmp_path / "out" / "vectors" / "part-00000.parquet").slice(1)  # 'skip' drops row 0
    out.write_parquet("vectors/part-00000.parquet", vt)
    run_index(_cfg(), out, urls, manifest["encoder"]["normalize"], [])
    manifest["encoder"] = {**manifest["encoder"], "model_path": "/nonexistent/model",
                           "model": "all-MiniLM-L6-v2"}
    out.write_json("manifest.json", manifest)
    hits = search(out.url(), {}, SAMPLE_TEXTS[3], k=1)
    assert hits[0]["id"] == "doc-00004" and hits[0]["text_start"] == SAMPLE_TEXTS[3]


def test_index_on_s3_round_trip(tmp_path, s3_bucket, minilm_path):
    """Vectors, index and input on moto S3: built there, read back with faiss after copying down,
    and searched through s3:// with the text read from the S3 input."""
    import faiss
    import s3fs

    bucket, opts = s3_bucket
    local, urls_local, manifest = _encoded_job(tmp_path, minilm_path, SAMPLE_TEXTS)
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(tmp_path / "in") + "/", f"{bucket}/in/", recursive=True)
    fs.put(str(tmp_path / "out" / "vectors") + "/", f"{bucket}/out/vectors/", recursive=True)
    out = Storage(f"s3://{bucket}/out", opts)
    urls = [out.url(f"vectors/part-{s:05d}.parquet") for s in range(3)]
    stats = run_index(_cfg(kind="flat"), out, urls, manifest["encoder"]["normalize"], [])
    assert stats["docs"]["count"] == len(SAMPLE_TEXTS)
    manifest["input"] = {**manifest["input"], "url": f"s3://{bucket}/in",
                         "storage_options": {"key": "***", "secret": "***"},
                         "shards": {f"part-{s:05d}": f"s3://{bucket}/in/part-{s:05d}.parquet" for s in range(3)}}
    out.write_json("manifest.json", manifest)

    dst = tmp_path / "docs.faiss"
    out.download("index/docs.faiss", str(dst))
    index = faiss.read_index(str(dst))
    assert index.ntotal == len(SAMPLE_TEXTS)

    hits = search(f"s3://{bucket}/out", opts, SAMPLE_TEXTS[7], k=3)
    assert hits[0]["id"] == "doc-00007" and hits[0]["text_start"] == SAMPLE_TEXTS[7]


def test_bench_index_small(tmp_path, capsys):
    out = Storage(str(tmp_path / "out"))
    _write_vector_shards(out, n_shards=2, n=1500, dim=32)
    assert cli_main(["bench", "index", "--vectors", out.url(), "--queries", "100", "--repeat", "1", "--json",
                       "--set", "index.hnsw_ef_search=128"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("recall_at_10", "speedup", "qps_ann", "qps_exact", "n_vectors"):
        assert key in res
    assert res["n_vectors"] == 2900 and res["recall_at_10"] > 0.8


def test_search_help_lists_its_flags(capsys):
    """`embedjob search --help` is a real subcommand's help, not an error."""
    with pytest.raises(SystemExit) as e:
        cli_main(["search", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("output", "query", "-k", "--storage-option", "--input-storage-option",
                 "--words", "--json", "dotted keys nest"):
        assert flag in text, flag
