"""Theta for every document: a Ray Data pass over the token shards that writes the
document-topic proportions ``(id, theta)`` of each shard to a staging folder and returns each
document's argmax topic, with its label when ``topics.label_column`` names a column of the input
(read here, with the ids, from the shard's input file)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from embedjob.errors import TopicsError
from embedjob.layout import shard_file, shard_key_of
from embedjob.stages.topics.bow import bow_arrays
from embedjob.stages.topics.model import infer_theta, model_from_bytes
from embedjob.storage import Storage


class ThetaWriter:
    """Ray Data callable: token shard URL -> ``(id, theta)`` Parquet written to a staging folder;
    returns per shard its documents, empty documents, argmax topics and (``label_column``) labels."""

    def __init__(self, model_blob: bytes, vocab: list[str], root: str, storage_options: dict[str, Any],
                 staging: str, threads: int = 1, label_column: Optional[str] = None, id_column: str = "id",
                 input_storage_options: Optional[dict[str, Any]] = None):
        torch.set_num_threads(threads)
        self.model, _ = model_from_bytes(model_blob)
        self.vocab = pa.array(vocab, pa.string())
        self.root, self.storage_options, self.staging = root, storage_options, staging
        self.label_column, self.id_column = label_column, id_column
        self.input_storage_options = input_storage_options or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        store = Storage(self.root, self.storage_options)
        rows: list[dict[str, Any]] = []
        for url, key, input_url in zip(batch["url"], batch["key"], batch["input_url"]):
            table = Storage(str(url), self.storage_options).read_parquet("", columns=["id", "tokens"])
            ids, cnt = bow_arrays(table.column("tokens"), self.vocab)
            theta = infer_theta(self.model, ids, cnt)
            k = theta.shape[1]
            col = pa.FixedSizeListArray.from_arrays(pa.array(theta.reshape(-1), pa.float32()), k)
            out = pa.table({"id": table.column("id"), "theta": col.cast(pa.list_(pa.float32()))})
            store.write_parquet(shard_file(self.staging, key), out)
            labels = self._labels(str(input_url), table.column("id")) if self.label_column else None
            rows.append({"key": str(key), "docs": table.num_rows,
                         "empty": int((pc.list_value_length(ids).to_numpy() == 0).sum()),
                         "argmax": theta.argmax(1).astype(np.int32).tolist() if len(theta) else [],
                         "labels": labels})
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    def _labels(self, input_url: str, ids: pa.ChunkedArray) -> list[Optional[str]]:
        """The label of each of ``ids`` from the input shard (as strings; null where it has none)."""
        if not input_url or input_url == "None":
            raise TopicsError(f"topics.label_column={self.label_column!r}: the input file of a token shard is "
                              "not known (the job's markers record it)")
        table = Storage(input_url, self.input_storage_options).read_parquet(
            "", columns=[self.id_column, self.label_column])
        by_id = dict(zip(table.column(self.id_column).cast(pa.string()).to_pylist(),
                         table.column(self.label_column).cast(pa.string()).to_pylist()))
        return [by_id.get(i) for i in ids.cast(pa.string()).to_pylist()]


RESULT_SCHEMA = pa.schema([("key", pa.string()), ("docs", pa.int64()), ("empty", pa.int64()),
                          ("argmax", pa.list_(pa.int32())), ("labels", pa.list_(pa.string()))])


def theta_pass(model_blob: bytes, vocab: list[str], out, token_urls: list[str], staging: str, *,
               actors: int, threads: int, label_column: Optional[str] = None, id_column: str = "id",
               input_urls: Optional[dict[str, Optional[str]]] = None,
               input_storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Theta of every token shard's documents, written to ``<staging>/<shard>.parquet`` by ``actors``
    Ray Data actors; returns the documents, empty documents and shards counted, and (``_argmax``,
    ``_labels``) every document's argmax topic and label (None without ``label_column``)."""
    import ray

    input_urls = input_urls or {}
    items = [{"url": u, "key": shard_key_of(u), "input_url": str(input_urls.get(shard_key_of(u)))} for u in token_urls]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ThetaWriter, fn_constructor_kwargs={
        "model_blob": model_blob, "vocab": vocab, "root": out.url(), "storage_options": out.storage_options,
        "staging": staging, "threads": threads, "label_column": label_column, "id_column": id_column,
        "input_storage_options": input_storage_options},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items)))),
        num_cpus=1, batch_format="numpy")
    rows = ds.take_all()
    argmax = np.array([a for r in rows for a in r["argmax"]], np.int64)
    labels = [lab for r in rows for lab in r["labels"]] if label_column else None
    return {"theta_docs": int(sum(r["docs"] for r in rows)), "theta_empty_docs": int(sum(r["empty"] for r in rows)),
            "theta_shards": len(rows), "_argmax": argmax, "_labels": labels}


def check_label_column(label_column: str, token_urls: list[str], input_urls: Optional[dict[str, Optional[str]]],
                       storage_options: dict[str, Any]) -> None:
    """Before training: every token shard's input file is known and has ``label_column``
    (:class:`TopicsError` naming the file and its columns otherwise)."""
    for u in token_urls:
        src = (input_urls or {}).get(shard_key_of(u))
        if not src:
            raise TopicsError(f"topics.label_column={label_column!r}: the input file of {u} is not known "
                              "(label_column works in a job, whose shard markers record their input)")
        names = Storage(src, storage_options).read_parquet_schema("").names
        if label_column not in names:
            raise TopicsError(f"topics.label_column={label_column!r}: input shard {src} has no such column; "
                              f"columns: {', '.join(names)}")
