"""Theta for every document: a Ray Data pass over the token shards that writes the
document-topic proportions ``(id, theta)`` of each shard to a staging folder."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from embedjob.layout import shard_key_of
from embedjob.stages.topics.bow import bow_arrays
from embedjob.stages.topics.model import infer_theta, model_from_bytes
from embedjob.storage import Storage


class ThetaWriter:
    """Ray Data callable: token shard URL -> ``(id, theta)`` Parquet written to a staging folder."""

    def __init__(self, model_blob: bytes, vocab: list[str], root: str, storage_options: dict[str, Any],
                 staging: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.model, _ = model_from_bytes(model_blob)
        self.vocab = pa.array(vocab, pa.string())
        self.root, self.storage_options, self.staging = root, storage_options, staging

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        store = Storage(self.root, self.storage_options)
        keys, docs, empty = [], [], []
        for url, key in zip(batch["url"], batch["key"]):
            table = Storage(str(url), self.storage_options).read_parquet("", columns=["id", "tokens"])
            ids, cnt = bow_arrays(table.column("tokens"), self.vocab)
            theta = infer_theta(self.model, ids, cnt)
            k = theta.shape[1]
            col = pa.FixedSizeListArray.from_arrays(pa.array(theta.reshape(-1), pa.float32()), k)
            out = pa.table({"id": table.column("id"), "theta": col.cast(pa.list_(pa.float32()))})
            store.write_parquet(f"{self.staging}/{key}.parquet", out)
            keys.append(str(key))
            docs.append(table.num_rows)
            empty.append(int((pc.list_value_length(ids).to_numpy() == 0).sum()))
        return {"key": np.array(keys), "docs": np.array(docs), "empty": np.array(empty)}


def theta_pass(model_blob: bytes, vocab: list[str], out, token_urls: list[str], staging: str, *,
               actors: int, threads: int) -> dict[str, Any]:
    """Theta of every token shard's documents, written to ``<staging>/<shard>.parquet`` by ``actors``
    Ray Data actors; returns the documents, empty documents and shards counted."""
    import ray

    items = [{"url": u, "key": shard_key_of(u)} for u in token_urls]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ThetaWriter, fn_constructor_kwargs={
        "model_blob": model_blob, "vocab": vocab, "root": out.url(), "storage_options": out.storage_options,
        "staging": staging, "threads": threads}, batch_size=1, compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items)))),
        num_cpus=1, batch_format="numpy")
    rows = ds.take_all()
    return {"theta_docs": int(sum(r["docs"] for r in rows)), "theta_empty_docs": int(sum(r["empty"] for r in rows)),
            "theta_shards": len(rows)}
