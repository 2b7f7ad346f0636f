"""Vectors for ``embedjob bench dedup``: a finished job's ``vectors/*.parquet``, or a corpus encoded
here once with a cheap setting (MiniLM truncated to ``max_length`` tokens) and cached shard by
shard under ``<cache>/dedup-<key>/`` (``part-NNNNN.npy`` float32, read back with
``allow_pickle=False``, and ``part-NNNNN.ids.parquet``), so an interrupted encode resumes and a
rerun encodes nothing. ``meta.json`` records the settings and how long the encoding took.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.models import model_fingerprint
from embedjob.stages.dedup.shards import read_vector_shard
from embedjob.stages.encode import EncodeConfig, TextEncoder, resolve_encoder_settings
from embedjob.storage import Storage, StorageError, list_shards

logger = logging.getLogger(__name__)


def job_vectors(output_url: str, storage_options: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """The non-null document vectors of a job output and their ids, in shard then row order."""
    out = Storage(output_url, storage_options)
    names = out.list("vectors", suffix=".parquet")
    if not names:
        raise StorageError(f"no vectors/*.parquet under {output_url}")
    xs, ids = [], []
    for nm in names:
        r = read_vector_shard(out.url(f"vectors/{nm}"), storage_options)
        xs.append(r["vectors"])
        ids += r["ids"].to_pylist()
    return np.concatenate(xs), ids


def _cache_key(corpus: str, model_fp: str, max_length: int, backend: str) -> str:
    return hashlib.sha256(json.dumps([os.path.abspath(corpus), model_fp, max_length, backend]).encode()).hexdigest()[:12]


def corpus_vectors(corpus: str, cache: str, *, model: str = "all-MiniLM-L6-v2", max_length: int = 64,
                   backend: str = "torch", threads: Optional[int] = None) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Every document of the corpus encoded (truncated to ``max_length`` tokens), cached per shard:
    ``(vectors, ids, meta)``; ``meta['encode_seconds']`` sums the time the shards took to encode."""
    cfg = EncodeConfig(model=model, max_length=max_length, long_documents="truncate", backend=backend,
                       dtype="float32")
    settings = resolve_encoder_settings(cfg)
    folder = os.path.join(cache, f"dedup-{_cache_key(corpus, model_fingerprint(settings.model_path), max_length, backend)}")
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {
        "corpus": os.path.abspath(corpus), "model": model, "max_length": max_length, "backend": backend,
        "long_documents": "truncate", "shards": {}}
    enc = None
    xs, ids = [], []
    for url in list_shards(corpus):
        name = os.path.basename(url)[: -len(".parquet")]
        npy, idf = os.path.join(folder, f"{name}.npy"), os.path.join(folder, f"{name}.ids.parquet")
        if not (os.path.exists(npy) and os.path.exists(idf)):
            if enc is None:
                enc = TextEncoder(settings, batch_tokens=cfg.batch_tokens_for("cpu"), max_batch_docs=cfg.max_batch_docs,
                                  num_threads=threads, backend=backend, cache_dir=os.path.join(cache, "openvino"))
            table = Storage(url).read_parquet("", columns=["id", "text"])
            texts = [t or "" for t in table.column("text").to_pylist()]
            t0 = time.time()
            x = enc.encode_texts(texts).vectors.astype(np.float32)
            secs = time.time() - t0
            np.save(npy + ".tmp.npy", x)
            os.replace(npy + ".tmp.npy", npy)
            pq.write_table(pa.table({"id": table.column("id").cast(pa.string())}), idf + ".tmp")
            os.replace(idf + ".tmp", idf)
            meta["shards"][name] = {"documents": len(texts), "seconds": round(secs, 1)}
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f, indent=1)
            os.replace(meta_path + ".tmp", meta_path)
            logger.info("bench dedup: encoded %s (%d documents) in %.0fs", name, len(texts), secs)
        xs.append(np.load(npy, allow_pickle=False))
        ids += pq.read_table(idf).column("id").to_pylist()
    meta["encode_seconds"] = round(sum(v["seconds"] for v in meta["shards"].values()), 1)
    meta["documents"] = len(ids)
    return np.concatenate(xs), ids, meta


def token_mean_vectors(corpus: str, cache: str, *, model: str = "all-MiniLM-L6-v2",
                       max_length: int = 128) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """A cheap stand-in when encoding the whole corpus is too slow: each document's mean of the
    model's *input* word-piece embeddings (no transformer layer) over its first ``max_length``
    tokens, the corpus mean subtracted (raw means all point one way), unit length. Texts that
    differ by a few words get near-identical vectors, as with the encoder; cached like
    :func:`corpus_vectors`."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    path = resolve_encoder_settings(EncodeConfig(model=model)).model_path
    key = _cache_key(corpus, model_fingerprint(path), max_length, "token-mean")
    folder = os.path.join(cache, f"dedup-{key}")
    npy, idf, meta_path = (os.path.join(folder, n) for n in ("all.npy", "all.ids.parquet", "meta.json"))
    if os.path.exists(meta_path):
        return np.load(npy, allow_pickle=False), pq.read_table(idf).column("id").to_pylist(), json.load(open(meta_path))
    t0 = time.time()
    emb = next(v for k, v in load_file(os.path.join(path, "model.safetensors")).items()
               if k.endswith("word_embeddings.weight")).astype(np.float32)
    tok = AutoTokenizer.from_pretrained(path)
    xs, ids = [], []
    for url in list_shards(corpus):
        table = Storage(url).read_parquet("", columns=["id", "text"])
        enc = tok([t or "" for t in table.column("text").to_pylist()], add_special_tokens=False, truncation=True,
                  max_length=max_length)["input_ids"]
        lengths = np.array([max(len(e), 1) for e in enc])
        flat = np.concatenate([np.asarray(e if e else [0], np.int64) for e in enc])
        sums = np.add.reduceat(emb[flat], np.concatenate([[0], np.cumsum(lengths)[:-1]]), axis=0)
        xs.append(sums / lengths[:, None])
        ids += table.column("id").cast(pa.string()).to_pylist()
    x = np.concatenate(xs)
    x -= x.mean(axis=0, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    meta = {"corpus": os.path.abspath(corpus), "model": model, "kind": "token-mean", "max_length": max_length,
            "encode_seconds": round(time.time() - t0, 1), "documents": len(ids)}
    os.makedirs(folder, exist_ok=True)
    np.save(npy, x.astype(np.float32))
    pq.write_table(pa.table({"id": ids}), idf)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return x.astype(np.float32), ids, meta
