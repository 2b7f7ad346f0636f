"""The index stage: build FAISS indices over the document vectors and word vectors of a job and
commit them to ``<output>/index/``, only after everything succeeded:

* ``index/docs.faiss`` — a plain FAISS index (``faiss.read_index`` reads it; no pickle). Its labels
  are *positions* ``0..n-1``;
* ``index/docs_ids.parquet`` — ``position`` -> ``id`` plus the ``shard`` key and ``row`` in
  ``vectors/<shard>.parquet`` (rows with a null vector — empty text — are not indexed);
* ``index/docs.json`` — kind, metric, FAISS factory string, search parameters, counts, build id;
* ``index/chunks.faiss`` / ``chunks_ids.parquet`` (``id``, ``chunk``, ``start_char``, ``end_char``,
  ``shard``) / ``chunks.json`` with ``encode.write_chunks``: one vector per passage (window);
* ``index/words-<name>.faiss`` / ``words-<name>_ids.parquet`` / ``words-<name>.json`` for each set
  of word vectors of a stage enabled in the run (``bert``: static, ``word2vec``), read from their
  safe files (``vectors.bin``; never the pickled ``vectors.kv``); cosine: vectors are
  L2-normalised and searched by inner product.

Example::

    stats = run_index(cfg.index, Storage("s3://bucket/out"), vector_urls, manifest["encoder"]["normalize"], ["bert"])
"""

from __future__ import annotations

import io
import time
from typing import Any, Sequence

import numpy as np

from embedjob.layout import CHUNKS, VECTORS
from embedjob.stages.index.build import BuiltIndex, build_chunks_index, build_docs_index, build_words_index
from embedjob.stages.index.config import IndexConfig, index_files
from embedjob.storage import Storage
from embedjob.wordvectors import job_vectors_file, load_job_vectors


def write_index(out: Storage, built: BuiltIndex) -> dict[str, str]:
    """Commit the id map, the metadata and the FAISS file (each an atomic write)."""
    import faiss

    files = index_files(built.meta["name"])
    ids = built.ids.replace_schema_metadata({b"embedjob.build_id": built.meta["build_id"].encode()})
    out.write_parquet(files["ids"], ids)
    if built.rescore is not None:  # binary: the int8 vectors that rescore the Hamming candidates
        buf = io.BytesIO()
        np.save(buf, built.rescore, allow_pickle=False)
        out.write_bytes(files["rescore"], buf.getvalue())
    else:
        files = {k: v for k, v in files.items() if k != "rescore"}
    out.write_json(files["meta"], {**built.meta, "files": files})
    binary = built.meta.get("kind") == "binary_flat"
    data = faiss.serialize_index_binary(built.index) if binary else faiss.serialize_index(built.index)
    out.write_bytes(files["index"], data.tobytes())
    return files


def run_index(icfg: IndexConfig, out: Storage, vector_urls: list[str], normalized: bool,
              word_vector_kinds: Sequence[str] = (), *, chunks: bool = False) -> dict[str, Any]:
    """Build the document index (``normalized``: the document vectors are unit length, as the
    encoder settings say) and one ``words-<kind>`` index per job word-vector set named in
    ``word_vector_kinds`` (``'bert'``, ``'word2vec'``: the stages enabled in this run), read with
    :func:`~embedjob.wordvectors.load_job_vectors` (never a pickle), and commit them to
    ``<out>/index/`` once all are built; ``chunks`` (``encode.write_chunks``): one more index over the
    passages. Returns the stage stats (with each index's description)."""
    opts = out.storage_options
    t0 = time.time()
    built = [build_docs_index(icfg, vector_urls, opts, bool(normalized))]
    if chunks:  # passages: chunks/<shard>.parquet beside each vectors/<shard>.parquet
        chunk_urls = [f"/{CHUNKS}/".join(u.rsplit(f"/{VECTORS}/", 1)) for u in vector_urls]
        built.append(build_chunks_index(icfg, chunk_urls, opts, bool(normalized)))
    skipped: dict[str, str] = {}
    if icfg.words:
        for name in sorted(word_vector_kinds):
            rel = job_vectors_file(name)
            if not out.exists(rel):
                skipped[name] = f"{out.url(rel)} does not exist"
                continue
            kv = load_job_vectors(out.url(), opts, name)
            if len(kv) == 0:
                skipped[name] = "no words"
                continue
            built.append(build_words_index(icfg, name, kv))
    files = {}
    for b in built:  # every index is built before any is written
        files[b.meta["name"]] = write_index(out, b)
    stats = {
        "docs": {k: v for k, v in built[0].meta.items()},
        "words": {b.meta["name"][len("words-"):]: b.meta for b in built[1:] if b.meta["name"].startswith("words-")},
        **({"chunks": built[1].meta} if chunks else {}),
        "files": files,
        "seconds_total": round(time.time() - t0, 3),
    }
    if skipped:
        stats["words_skipped"] = skipped
    return stats
