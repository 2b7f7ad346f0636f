"""How stored document vectors are encoded (``output.vector_dtype``), in Parquet and Lance alike.

* ``float32`` — as encoded (4 bytes a dimension);
* ``float16`` — half precision (2 bytes);
* ``int8`` — symmetric scalar quantisation with one scale that every shard shares:
  ``round(x * 127 / int8_max)`` clipped to ``[-127, 127]`` (1 byte), ``int8_max`` being
  ``output.int8_max`` or, for unit vectors, :func:`unit_int8_max` (``min(1, 6 / sqrt(dim))``). Zero
  stays zero and every row has the same step, so the raw int8 rows of any two shards compare as
  their vectors do (inner product and L2 up to the factor ``scale**2``) in any reader: duckdb's
  ``list_dot_product``, Lance, FAISS. The scale is kept with the vectors (the Parquet file's
  metadata, the shard's marker, ``manifest.json``) so that :func:`decode` turns them back into
  float32. Files written before (``ranges``: each dimension's ``[min, max]`` over the shard cut
  into 256 steps, as sentence-transformers' ``quantize_embeddings`` does) still decode;
* ``binary`` — one bit a dimension (``x > 0``), packed 8 to a byte (``np.packbits``, as
  sentence-transformers' ``ubinary``), searched by Hamming distance.

A vector file says how it is encoded in its schema metadata (``embedjob.vector_codec``, JSON);
a file without it is float32. Example::

    arr, codec = encode(x, "int8")           # x: (n, dim) float32, unit rows
    x2 = decode(arr, codec)                   # (n, dim) float32, |x - x2| <= codec["scale"] / 2
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import pyarrow as pa

DTYPES = ("float32", "float16", "int8", "binary")
META_KEY = b"embedjob.vector_codec"
VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "binary": pa.uint8()}
INT8_SCHEME = "symmetric_v1"  # one scale for every shard: x ~ q * scale, scale = int8_max / 127


def stored_width(dtype: str, dim: int) -> int:
    """Values per stored vector: ``dim``, or ``ceil(dim / 8)`` bytes for ``binary``."""
    return (dim + 7) // 8 if dtype == "binary" else dim


def bytes_per_vector(dtype: str, dim: int) -> int:
    """Bytes of one stored vector's values (no file overhead)."""
    return stored_width(dtype, dim) * {"float32": 4, "float16": 2, "int8": 1, "binary": 1}[dtype]


def encode(x: np.ndarray, dtype: str, valid: Optional[np.ndarray] = None, *,
           int8_max: Optional[float] = None) -> tuple[pa.Array, dict[str, Any]]:
    """``(fixed-size-list array, codec)`` of the (n, dim) float32 matrix ``x`` stored as ``dtype``;
    rows where ``valid`` is False are null. ``int8``: ``int8_max`` is the value stored as 127 (the
    same for every shard of an output; None: :func:`unit_int8_max`, for unit vectors), larger values
    are clipped and counted."""
    if dtype not in DTYPES:
        raise ValueError(f"vector dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    x = np.asarray(x, dtype=np.float32)
    n, dim = x.shape
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    codec: dict[str, Any] = {"dtype": dtype, "dim": int(dim)}
    if dtype == "float32":
        values = x
    elif dtype == "float16":
        values = x.astype(np.float16)
    elif dtype == "int8":
        int8_max = unit_int8_max(dim) if int8_max is None else float(int8_max)
        values, codec["clipped"] = quantize_int8(x, int8_max, valid)
        codec.update(scheme=INT8_SCHEME, int8_max=float(int8_max), scale=float(int8_max) / 127.0)
    else:
        values = np.packbits(x > 0, axis=1)
    width = values.shape[1]
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=VALUE_TYPES[dtype])
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(flat, width, mask=mask), codec


def _steps(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    steps = (hi - lo) / 255.0
    return np.where(steps > 0, steps, 1.0).astype(np.float32)


def unit_int8_max(dim: int) -> float:
    """The default ``int8_max`` of unit vectors: 6 standard deviations of a component of a random
    unit vector of ``dim`` dimensions (``1 / sqrt(dim)``), at most 1 (0.306 for 384 dimensions)."""
    return float(min(1.0, 6.0 / np.sqrt(max(int(dim), 1))))


def quantize_int8(x: np.ndarray, int8_max: float = 1.0,
                  valid: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """``(int8 matrix, values clipped)``: ``x * 127 / int8_max`` rounded and clipped to [-127, 127]
    (``valid``: the rows counted for clipping). Queries are quantised the same way to compare raw."""
    q = np.rint(np.asarray(x, dtype=np.float32) * np.float32(127.0 / int8_max))
    over = np.abs(q) > 127
    clipped = int(over[valid].sum() if valid is not None else over.sum())
    return np.clip(q, -127, 127).astype(np.int8), clipped


def decode(arr: pa.Array | pa.ChunkedArray, codec: Optional[dict[str, Any]]) -> np.ndarray:
    """The (n, dim) float32 matrix of non-null stored vectors (``binary``: 0/1 per bit; use
    :func:`packed` for Hamming search)."""
    codec = codec or {"dtype": "float32"}
    values = packed(arr) if codec["dtype"] == "binary" else _values(arr)
    dtype = codec["dtype"]
    if dtype == "int8" and "scale" in codec:
        return values.astype(np.float32) * np.float32(codec["scale"])
    if dtype == "int8":  # written before the shared scale: the shard's own per-dimension ranges
        lo, hi = (np.asarray(r, dtype=np.float32) for r in codec["ranges"])
        return ((values.astype(np.float32) + 128.0) * _steps(lo, hi) + lo).astype(np.float32)
    if dtype == "binary":
        return np.unpackbits(values, axis=1)[:, : codec["dim"]].astype(np.float32)
    return values.astype(np.float32)


def packed(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The (n, bytes) uint8 matrix of binary vectors, as FAISS's binary indices take them."""
    return np.ascontiguousarray(_values(arr), dtype=np.uint8)


def values_matrix(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The (n, width) matrix of a vector column's raw stored values (int8 as int8, bits as bytes)."""
    return _values(arr)


def _values(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    n = len(arr)
    width = arr.type.list_size if pa.types.is_fixed_size_list(arr.type) else None
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if n == 0:
        return flat.reshape(0, width or 0)
    width = width or len(flat) // n
    if len(flat) != n * width:
        raise ValueError(f"vectors have unequal lengths ({len(flat)} values for {n} rows)")
    return flat.reshape(n, width)


def quantize_query(q: np.ndarray, codec: Optional[dict[str, Any]]) -> np.ndarray:
    """A float32 query as the index's vectors are stored: packed bits for ``binary``, else as is."""
    if codec and codec.get("dtype") == "binary":
        return np.packbits(np.asarray(q) > 0, axis=1)
    return np.asarray(q, dtype=np.float32)


RESCORE_COLUMN = "rescore"  # binary: the same vectors as int8 (shared scale), to rescore Hamming candidates


def add_rescore_column(table: pa.Table, x: np.ndarray, valid: Optional[np.ndarray], codec: dict[str, Any],
                       int8_max: Optional[float] = None) -> tuple[pa.Table, dict[str, Any]]:
    """``table`` (binary vectors) with the column ``rescore``: ``x`` as int8 with the shared scale, and
    ``codec`` with that int8 codec under ``rescore``, so a search can rescore Hamming candidates."""
    arr, rc = encode(x, "int8", valid, int8_max=int8_max)
    rescore = {k: rc[k] for k in ("scheme", "int8_max", "scale", "clipped")}
    return table.append_column(RESCORE_COLUMN, arr), {**codec, "rescore": rescore}


def rescore(q: np.ndarray, candidates: np.ndarray, stored: np.ndarray, scale: float,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``candidates`` (positions, -1 = none) by inner product of the
    float32 query with the stored int8 vectors: ``(scores, positions)``, each (n, k), -1 padded."""
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    labels = np.full((len(q), k), -1, dtype=np.int64)
    for j, cand in enumerate(candidates):
        cand = cand[cand >= 0]
        s = (stored[cand].astype(np.float32) @ np.asarray(q[j], dtype=np.float32)) * np.float32(scale)
        best = np.argsort(-s, kind="stable")[:k]
        scores[j, :len(best)], labels[j, :len(best)] = s[best], cand[best]
    return scores, labels


def with_codec(schema: pa.Schema, codec: dict[str, Any]) -> pa.Schema:
    """``schema`` carrying ``codec`` in its metadata."""
    return schema.with_metadata({**(schema.metadata or {}), META_KEY: json.dumps(codec).encode()})


def codec_of(schema: pa.Schema) -> dict[str, Any]:
    """The codec a vector file's schema records (float32 when none)."""
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {"dtype": "float32"}
