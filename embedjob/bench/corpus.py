"""The benchmarks' corpus: where the shared corpus lies, and its shards turned into token shards
(``id``, ``tokens``) with the job's preprocessing, as the job's ``tokens/`` files would be."""

from __future__ import annotations

import os
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.stages.preprocess import PreprocessConfig, preprocess_texts
from embedjob.storage import Storage

DEFAULT_CORPUS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "corpus",
                                              "mixed-en"))


def tokenize_shard(url: str, dest: str, *, filters: Optional[list[str]] = None, limit: Optional[int] = None,
                   storage_options: Optional[dict[str, Any]] = None) -> tuple[int, int]:
    """The job's tokens of one corpus shard (its first ``limit`` rows) written to ``dest`` as
    Parquet (``id``, ``tokens``), atomically; ``filters`` replace the job's default preprocessing
    filters. Returns (documents, tokens)."""
    table = Storage(url, storage_options or {}).read_parquet("", columns=["id", "text"])
    if limit is not None:
        table = table.slice(0, limit)
    cfg = PreprocessConfig(filters=filters) if filters is not None else PreprocessConfig()
    tokens = preprocess_texts(table.column("text").to_pylist(), cfg)
    tmp = dest + ".tmp"
    pq.write_table(pa.table({"id": table.column("id").cast(pa.string()),
                             "tokens": pa.array(tokens, pa.list_(pa.string()))}), tmp, row_group_size=4096)
    os.replace(tmp, dest)
    return table.num_rows, sum(len(t) for t in tokens)
