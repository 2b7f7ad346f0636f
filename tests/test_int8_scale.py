"""output.vector_dtype int8 with one scale shared by every shard (issue 30, part 2, defect 3): the raw
int8 rows of any two shards compare as their float32 vectors do, in duckdb as in the index stage; a
model without normalisation needs output.int8_max, refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.vector_codec import codec_of, decode, encode, with_codec


def embedding_like_vectors(n: int = 1600, dim: int = 384, rank: int = 16, seed: int = 0):
    """Unit vectors on a noisy ``rank``-dimensional subspace (as sentence embeddings: their largest
    component about 0.23 at 384 dimensions, all-MiniLM-L6-v2's 0.26), and a shard for each: the sign of
    two latent coordinates, so every shard covers another region (per-shard ranges would differ)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, rank))
    x = z @ rng.normal(size=(rank, dim)) + 0.5 * np.sqrt(rank) * rng.normal(size=(n, dim))
    shard = (z[:, 0] > 0).astype(int) + 2 * (z[:, 1] > 0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), shard


def write_int8_shards(folder, x: np.ndarray, shard_of: np.ndarray) -> list[str]:
    """``vectors/<shard>.parquet`` files as the commit writes them (codec in the schema metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in np.unique(shard_of):
        rows = np.flatnonzero(shard_of == s)
        arr, codec = encode(x[rows], "int8")
        t = pa.table({"id": pa.array([f"d{i:05d}" for i in rows]), "vector": arr,
                      "n_tokens": pa.array(np.zeros(len(rows), np.int32))})
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(t.replace_schema_metadata(with_codec(t.schema, codec).metadata), path)
        urls.append(str(path))
    return urls


def recall(found: dict[int, list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(found[q]) & set(truth[j])) / truth.shape[1] for j, q in enumerate(sorted(found))]))


def test_raw_int8_rows_of_different_shards_compare_in_duckdb(tmp_path):
    import duckdb

    x, shard_of = embedding_like_vectors()
    write_int8_shards(tmp_path / "vectors", x, shard_of)
    queries = np.arange(0, len(x), 16)
    truth = np.argsort(-(x[queries] @ x.T), axis=1)[:, :10]
    # What a duckdb user writes: raw int8 rows of every shard, inner product, top 10 per query.
    rows = duckdb.sql(f"""
        with v as (select cast(substr(id, 2) as integer) as i, vector::integer[] as vec
                   from '{tmp_path}/vectors/*.parquet')
        select q.i as q, d.i as d from v q, v d
        where q.i % 16 = 0
        qualify row_number() over (partition by q.i order by list_dot_product(q.vec, d.vec) desc, d.i) <= 10
    """).fetchall()
    found: dict[int, list[int]] = {}
    for q, d in rows:
        found.setdefault(q, []).append(d)
    assert len(found) == len(queries)
    assert recall(found, truth) >= 0.99
    codecs = [codec_of(pq.read_schema(p)) for p in sorted((tmp_path / "vectors").glob("*.parquet"))]
    assert len({json.dumps({k: c.get(k) for k in ("scheme", "scale")}) for c in codecs}) == 1  # one scale


def test_int8_index_across_shards_and_decode(tmp_path):
    from embedjob.stages.index.build import build_docs_index
    from embedjob.stages.index.config import IndexConfig
    from embedjob.stages.index.search import LoadedIndex

    x, shard_of = embedding_like_vectors(seed=1)
    urls = write_int8_shards(tmp_path / "vectors", x, shard_of)
    built = build_docs_index(IndexConfig(kind="flat"), urls, {}, True)
    order = np.concatenate([np.flatnonzero(shard_of == s) for s in range(4)])  # positions: shard then row
    queries = x[::16]
    _, got = LoadedIndex(built.index, built.ids, built.meta).search_vectors(queries, 10)
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    assert recall({j: order[got[j]].tolist() for j in range(len(queries))}, truth) >= 0.99
    t = pq.read_table(urls[0])
    c = codec_of(t.schema)
    assert c["scale"] == pytest.approx(6 / np.sqrt(384) / 127) and c["clipped"] == 0
    err = np.abs(decode(t.column("vector"), c) - x[shard_of == 0])
    assert err.max() <= c["scale"] / 2 + 1e-6


def test_int8_of_unnormalised_vectors_needs_int8_max(tmp_path):
    from embedjob.errors import ConfigError
    from embedjob.stages.write import OutputConfig

    o = OutputConfig(url=str(tmp_path), vector_dtype="int8")
    assert o.int8_max_for(True, 384) == pytest.approx(0.306186) and o.int8_max_for(True, 16) == 1.0
    with pytest.raises(ConfigError, match="output.int8_max"):
        o.int8_max_for(False, 384)
    assert OutputConfig(url=str(tmp_path), vector_dtype="int8", int8_max=4.0).int8_max_for(False, 384) == 4.0
    arr, codec = encode(np.array([[5.0, -0.5]], np.float32), "int8", int8_max=4.0)
    assert arr.flatten().to_pylist() == [127, -16] and codec["clipped"] == 1
