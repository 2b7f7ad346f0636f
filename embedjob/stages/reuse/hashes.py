"""The content hash of a document and the partition of an id: pure functions, testable without Ray.

``text_hash`` is blake2b-128 of the input text's UTF-8 bytes, as read (before preprocessing or a
prompt: those are part of the recipe, the shard stage hash). Null or blank texts get a null hash:
they are never reused (they cost the encoder nothing)."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

HASH_BYTES = 16
HASH_TYPE = pa.binary(HASH_BYTES)


def text_hashes(texts: Sequence[Optional[str]]) -> pa.Array:
    """``fixed_size_binary(16)`` blake2b of each text; null for null or blank texts.

    >>> text_hashes(["a", None]).null_count
    1
    """
    out = [None if t is None or not t.strip() else hashlib.blake2b(t.encode("utf-8"), digest_size=HASH_BYTES).digest()
           for t in texts]
    return pa.array(out, type=HASH_TYPE)


def partition_of(ids: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The lookup partition (``0 .. partitions-1``) of each id: a fixed hash of its string form, the
    same in every process."""
    import pandas as pd

    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if len(ids) == 0:
        return np.zeros(0, np.int64)
    h = pd.util.hash_array(ids.cast(pa.string()).to_numpy(zero_copy_only=False), categorize=False)
    return (h % np.uint64(partitions)).astype(np.int64)
