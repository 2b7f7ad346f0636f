"""A shard's rows as Lance fragments, written by its commit task before its done marker.

The fragments are data files under ``lance/docs.lance/data/`` that no dataset version lists
yet; the marker records their metadata (Lance's own JSON) and the Arrow schema, and
:mod:`dataset` commits them. A commit task that runs twice writes two sets of files, of which only
the one its marker lists is ever committed."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import pyarrow as pa

from embedjob.errors import ConfigError
from embedjob.layout import LANCE_DOCS
from embedjob.storage import Storage, split_url
from embedjob.vector_codec import META_KEY, codec_of

logger = logging.getLogger(__name__)

LANCE_PROTOCOLS = ("file", "s3", "gs", "az")


def shard_rows_table(shard: str, vectors: pa.Table, rows: pa.ChunkedArray | pa.Array,
                     sink: dict[str, Any]) -> pa.Table:
    """What the dataset holds of one shard: ``id``, ``vector``, ``n_tokens``, ``shard`` and the
    ``carry_columns`` read from the input shard at the rows the vectors came from."""
    codec = codec_of(vectors.schema)
    table = vectors.replace_schema_metadata(None)
    table = table.append_column("shard", pa.array([shard] * table.num_rows, pa.string()))
    carry = list(sink.get("carry_columns") or [])
    if carry:
        src = Storage(sink["input_url"], sink.get("input_options") or {}).read_parquet("", columns=carry)
        src = src.take(rows)
        for c in carry:
            table = table.append_column(c, src.column(c))
    meta = {"dtype": codec.get("dtype", "float32"), "dim": codec.get("dim"),  # the int8 scale: one for every shard
            **({"scale": codec["scale"]} if "scale" in codec else {})}
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def write_shard_fragments(out: Storage, shard: str, vectors: pa.Table, rows: pa.ChunkedArray | pa.Array,
                          sink: dict[str, Any], *, dataset: str = LANCE_DOCS) -> dict[str, Any]:
    """Write the shard's rows as fragments of ``dataset`` (``lance/docs.lance``; chunk vectors
    would go to their own dataset the same way); returns what its marker keeps:
    ``{"dataset", "rows", "fragments" (Lance JSON), "schema" (Arrow IPC, base64), "seconds"}``."""
    from lance.fragment import write_fragments

    t0 = time.time()
    table = shard_rows_table(shard, vectors, rows, sink)
    uri, opts = out.object_store(dataset)
    frags = write_fragments(table, uri, schema=table.schema, mode="overwrite", storage_options=opts) \
        if table.num_rows else []
    return {"dataset": dataset, "rows": table.num_rows, "fragments": [f.to_json() for f in frags],
            "schema": base64.b64encode(table.schema.serialize().to_pybytes()).decode("ascii"),
            "seconds": round(time.time() - t0, 3)}


def schema_of(part: dict[str, Any]) -> pa.Schema:
    """The Arrow schema a marker's ``lance`` entry records."""
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(part["schema"])))


def check_sink(output_url: str, lance: bool, shard_urls: list[str], storage_options: dict[str, Any],
               columns: list[str]) -> None:
    """Before any work: Lance writes where every process sees the same files (a local path or an
    object store), and the first input shard has every column of ``output.carry_columns``."""
    if lance and split_url(output_url)[0] not in LANCE_PROTOCOLS:
        raise ConfigError(f"output.lance: Lance cannot write to {split_url(output_url)[0]}:// outputs "
                          f"(output.url={output_url!r}); use a local path or {', '.join(LANCE_PROTOCOLS[1:])}:// URL")
    if not columns or not shard_urls:
        return
    names = Storage(shard_urls[0], storage_options).read_parquet_schema("").names
    absent = [c for c in columns if c not in names]
    if absent:
        raise ConfigError(f"output.carry_columns: {absent} not in input shard {shard_urls[0]} "
                          f"(its columns: {', '.join(names)})")
