"""Reading the committed ``vectors/<shard>.parquet`` files for the index, one Ray task per shard
(inline when Ray is not up): row counts, the ids and rows of the non-null vectors with the vectors
or a uniform sample of them, and, for IVF kinds, each shard added to its own copy of the trained
index with its global positions as ids."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.layout import shard_key_of
from embedjob.storage import Storage, StorageError
from embedjob.vector_codec import RESCORE_COLUMN, codec_of, decode, packed, values_matrix


def to_float32_matrix(column: pa.ChunkedArray | pa.Array, dim: Optional[int] = None) -> np.ndarray:
    """A (non-null) list / fixed-size-list column as an (n, dim) float32 matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    d = dim or (arr.type.list_size if pa.types.is_fixed_size_list(arr.type) else len(flat) // n)
    if d == 0 or len(flat) != n * d:
        raise ValueError(f"vectors have unequal lengths ({len(flat)} values for {n} rows)")
    return flat.reshape(n, d)


def shard_rows(url: str, storage_options: dict[str, Any]) -> int:
    """Rows of one vector shard, from its Parquet footer."""
    store = Storage(url, storage_options)
    with store.open("", "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def scan_vector_shard(url: str, storage_options: dict[str, Any], *, with_vectors: bool, sample_n: int = 0,
                      seed: int = 0) -> dict[str, Any]:
    """Ids and rows of the non-null vectors of one ``vectors/<shard>.parquet``, plus the vectors
    themselves (``with_vectors``) and/or a uniform sample of ``sample_n`` of them."""
    store = Storage(url, storage_options)
    try:
        table = store.read_parquet("")  # id, vector (binary: and the int8 rescore column), n_tokens
    except (OSError, KeyError, pa.ArrowInvalid) as e:
        raise StorageError(f"cannot read vector shard {url!r} (columns id, vector): {e}") from e
    vec = table.column("vector")
    valid = np.asarray(vec.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    rows = np.flatnonzero(valid).astype(np.int64)
    ids = table.column("id").cast(pa.string()).combine_chunks().filter(pa.array(valid))
    x = None
    if with_vectors or sample_n:  # float32 for FAISS; binary vectors stay packed bits (Hamming search)
        codec, kept = codec_of(table.schema), vec.combine_chunks().filter(pa.array(valid))
        x = (packed(kept) if codec["dtype"] == "binary" else decode(kept, codec)) if codec["dtype"] != "float32" \
            else to_float32_matrix(kept)
    out: dict[str, Any] = {"shard": shard_key_of(url), "ids": ids, "rows": rows, "count": len(rows),
                           "null_vectors": int(len(valid) - len(rows)),
                           "dim": int(x.shape[1]) if x is not None and len(x) else None}
    if with_vectors:
        out["vectors"] = x
        if RESCORE_COLUMN in table.column_names:  # binary: the int8 vectors to rescore Hamming candidates
            kept = table.column(RESCORE_COLUMN).combine_chunks().filter(pa.array(valid))
            out["rescore"] = np.asarray(values_matrix(kept), dtype=np.int8)
    if sample_n and x is not None:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(x), size=min(sample_n, len(x)), replace=False))
        out["sample"] = x[pick]
    return out


def scan_sampled(url: str, storage_options: dict[str, Any], sample_n: int, seed: int) -> dict[str, Any]:
    """:func:`scan_vector_shard` for an IVF kind: ids, rows and a training sample, not the vectors."""
    return scan_vector_shard(url, storage_options, with_vectors=False, sample_n=sample_n, seed=seed)


def add_vector_shard(url: str, storage_options: dict[str, Any], trained: np.ndarray, offset: int,
                     keep_vectors: bool) -> dict[str, Any]:
    """Add one shard's vectors to a copy of the trained (empty) IVF index, with global positions
    ``offset..offset+n-1`` as ids; returns the serialised part (and the vectors for re-ranking)."""
    import faiss

    part = scan_vector_shard(url, storage_options, with_vectors=True)
    index = faiss.deserialize_index(trained)
    x = part["vectors"]
    if len(x):
        index.add_with_ids(x, np.arange(offset, offset + len(x), dtype=np.int64))
    return {"part": faiss.serialize_index(index), "count": len(x), "vectors": x if keep_vectors else None}


def map_tasks(fn, args_list: list[tuple], kwargs: dict[str, Any]) -> list[Any]:
    """Run ``fn`` over shards in Ray tasks when Ray is up (inline otherwise), results in order."""
    import ray

    if ray.is_initialized() and len(args_list) > 1:
        task = ray.remote(num_cpus=1)(fn)
        shared = {k: (ray.put(v) if isinstance(v, np.ndarray) and v.nbytes > 1 << 20 else v)
                  for k, v in kwargs.items()}
        return ray.get([task.remote(*a, **shared) for a in args_list])
    return [fn(*a, **kwargs) for a in args_list]


def add_parts(urls: list[str], storage_options: dict[str, Any], trained: np.ndarray, offsets: np.ndarray,
              keep: bool) -> list[dict[str, Any]]:
    """:func:`add_vector_shard` for every shard (Ray tasks sharing one copy of the trained index),
    parts in shard order."""
    import ray

    if ray.is_initialized() and len(urls) > 1:
        task = ray.remote(num_cpus=1)(add_vector_shard)
        ref = ray.put(trained)
        return ray.get([task.remote(u, storage_options, ref, int(o), keep) for u, o in zip(urls, offsets)])
    return [add_vector_shard(u, storage_options, trained, int(o), keep) for u, o in zip(urls, offsets)]


def shard_codec(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """How one vector shard stores its vectors (``vector_codec``), from its Parquet footer."""
    store = Storage(url, storage_options)
    with store.open("", "rb") as f:
        return codec_of(pq.ParquetFile(f).schema_arrow)
