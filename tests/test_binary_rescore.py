"""output.vector_dtype binary with rescoring (issue 30, part 2, defect 4): the Hamming index's
k * index.rescore_factor nearest are ranked by inner product with the int8 vectors stored beside the
bits (column ``rescore``), which lifts recall@10 against float32 exact search from about 0.5 to
0.95 and more; the index stage keeps them as index/docs_rescore.npy and `embedjob search` uses them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.stages.index.build import build_docs_index
from embedjob.stages.index.config import IndexConfig
from embedjob.stages.index.search import LoadedIndex
from embedjob.vector_codec import add_rescore_column, encode, with_codec
from tests.test_int8_scale import embedding_like_vectors


def write_binary_shards(folder, x: np.ndarray, shard_of: np.ndarray) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in np.unique(shard_of):
        rows = np.flatnonzero(shard_of == s)
        arr, codec = encode(x[rows], "binary")
        t = pa.table({"id": pa.array([f"d{i:05d}" for i in rows]), "vector": arr,
                      "n_tokens": pa.array(np.zeros(len(rows), np.int32))})
        t, codec = add_rescore_column(t, x[rows], None, codec)
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(t.replace_schema_metadata(with_codec(t.schema, codec).metadata), path)
        urls.append(str(path))
    return urls


def test_binary_search_rescores_hamming_candidates_with_int8(tmp_path):
    x, shard_of = embedding_like_vectors(n=2000, seed=2)
    urls = write_binary_shards(tmp_path / "vectors", x, shard_of)
    built = build_docs_index(IndexConfig(), urls, {}, True)
    assert built.meta["kind"] == "binary_flat" and built.meta["rescore"]["factor"] == 16
    assert built.rescore.shape == (2000, 384) and built.rescore.dtype == np.int8
    order = np.concatenate([np.flatnonzero(shard_of == s) for s in range(4)])  # positions: shard then row
    queries = x[::20]
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    loaded = LoadedIndex(built.index, built.ids, built.meta, built.rescore)

    def recall(factor):
        scores, got = loaded.search_vectors(queries, 10, rescore_factor=factor)
        return float(np.mean([len(set(order[g]) & set(t)) / 10 for g, t in zip(got, truth)])), scores

    hamming, _ = recall(1)
    rescored, scores = recall(None)  # the index's default factor
    assert rescored >= 0.95 > hamming
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # inner products, best first


def test_binary_job_writes_and_searches_with_rescoring(ray_local, tmp_path, tiny_model):
    from embedjob.pipeline import run_job
    from embedjob.stages.index.search import Searcher
    from tests.conftest import SAMPLE_TEXTS, write_shards
    from tests.helpers import small_job

    planted = "A planted sentence about violet submarines humming under the frozen northern sea."
    ids = write_shards(tmp_path / "in", SAMPLE_TEXTS + [planted, planted.lower()], n_shards=2)
    out = tmp_path / "out"
    res = run_job(small_job(tmp_path / "in", out, tiny_model, index={"enabled": True, "rescore_factor": 4},
                            encode={"normalize": True}, output={"vector_dtype": "binary"}))
    assert res.ok
    t = pq.read_table(out / "vectors" / "part-00000.parquet")
    assert t.schema.field("rescore").type == pa.list_(pa.int8(), 32)
    docs = res.manifest["stages"]["index"]["docs"]
    assert docs["rescore"]["factor"] == 4 and (out / "index" / "docs_rescore.npy").exists()
    hits = Searcher(str(out)).search(planted, k=2, with_text=False)
    assert {h["id"] for h in hits} == {ids[-2], ids[-1]} and hits[0]["score"] > 0.99  # inner product, unit vectors
