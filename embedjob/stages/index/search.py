"""Reading a finished index back and answering queries (what ``embedjob search`` calls): the
index, its id map and metadata checked to be from one build, the query encoded with the job's own
encoder (from ``manifest.json``), and the start of each hit's text read from its input shard.

Example::

    hits = search("s3://bucket/out", {}, "interest rates rise", k=5)
    hits[0]  # {"id": "doc-00042", "score": 0.61, "shard": "part-00003", "text_start": "The bank..."}
    similar_words_in_index("s3://bucket/out", {}, "word2vec", "bank", k=5)  # [{"word": ..., "score": ...}, ...]
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedjob.layout import INDEX_DIR, MANIFEST
from embedjob.models import resolve_model_path
from embedjob.stages.encode import EncoderSettings, TextEncoder, cpu_supports_bf16
from embedjob.stages.index.config import CHUNK_INDEX, DOCS, index_files
from embedjob.stages.index.faiss_index import set_search_params
from embedjob.storage import Storage, StorageError, split_url
from embedjob.vector_codec import quantize_query, rescore

logger = logging.getLogger(__name__)

TEXT_START_CHARS = 200
SEARCH_LEVELS = ("auto", "doc", "chunk")  # auto: passages where the job wrote them, else documents


@dataclass
class LoadedIndex:
    """A finished index read back: the FAISS object with its query parameters, id map and metadata."""

    index: Any
    ids: pa.Table
    meta: dict[str, Any]
    rescore: Optional[np.ndarray] = None  # binary: the stored int8 vectors by position

    def search_vectors(self, q: np.ndarray, k: int, *, rescore_factor: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, positions)`` of the ``k`` nearest to each row of ``q``. Binary vectors: the
        ``k * rescore_factor`` nearest by Hamming distance (default: the index's ``rescore.factor``),
        ranked by inner product with the stored int8 vectors where the index has them."""
        if self.meta.get("kind") == "binary_flat":  # output.vector_dtype=binary: packed bits, Hamming
            bits = np.ascontiguousarray(quantize_query(q, {"dtype": "binary"}))
            spec = self.meta.get("rescore") or {}
            factor = int(rescore_factor or spec.get("factor") or 1)
            if self.rescore is None or factor <= 1:
                return self.index.search(bits, k)
            _, cand = self.index.search(bits, min(self.index.ntotal, k * factor))
            return rescore(np.asarray(q, dtype=np.float32), cand, self.rescore, spec["scale"], k)
        return self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)


def load_index(out: Storage, name: str = DOCS) -> LoadedIndex:
    """Read an index, its id map and metadata from the output (checked to be from one build)."""
    import faiss

    files = index_files(name)
    if not out.exists(files["meta"]):
        raise StorageError(f"no index {name!r} at {out.url(INDEX_DIR)} (was the job run with index.enabled=true?)")
    meta = out.read_json(files["meta"])
    raw = np.frombuffer(out.read_bytes(files["index"]), dtype=np.uint8)
    binary = meta.get("kind") == "binary_flat"
    index = faiss.deserialize_index_binary(raw) if binary else faiss.deserialize_index(raw)
    with out.open(files["ids"], "rb") as f:
        ids = pq.ParquetFile(f).read()
    build_id = (ids.schema.metadata or {}).get(b"embedjob.build_id", b"").decode()
    if index.ntotal != meta["count"] or ids.num_rows != meta["count"] or build_id != meta["build_id"]:
        raise StorageError(f"index {name!r} at {out.url(INDEX_DIR)}: files are from different builds "
                           "(being rewritten by a running job?); retry when the job has finished")
    sp = meta.get("search_params") or {}
    if not binary:
        set_search_params(index, meta["kind"], sp.get("ef_search"), sp.get("nprobe"), sp.get("refine_k_factor"))
    rescore_vectors = None
    if binary and meta.get("rescore"):  # the int8 vectors that rescore the Hamming candidates (never a pickle)
        rescore_vectors = np.load(io.BytesIO(out.read_bytes(files["rescore"])), allow_pickle=False)
        if len(rescore_vectors) != meta["count"]:
            raise StorageError(f"index {name!r} at {out.url(INDEX_DIR)}: {files['rescore']} holds "
                               f"{len(rescore_vectors)} vectors, the index {meta['count']}; rebuild the index")
    return LoadedIndex(index, ids, meta, rescore_vectors)


def query_encoder(settings: dict[str, Any]):
    """The job's own encoder (model, pooling, normalisation, max length) for query texts; the
    model folder is re-resolved when the recorded path does not exist on this machine."""
    s = EncoderSettings.from_dict(settings)
    if not os.path.isdir(s.model_path or ""):
        s.model_path = resolve_model_path(s.model)
    device = "cpu"
    if s.device == "cuda":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    s.device = device
    if device == "cpu" and (s.dtype == "float16" or (s.dtype == "bfloat16" and not cpu_supports_bf16())):
        s.dtype = "float32"  # same model and pooling; half precision is slow or missing on this CPU
    return TextEncoder(s)


def input_options(manifest_input: dict[str, Any], out: Storage,
                  override: Optional[dict[str, Any]]) -> dict[str, Any]:
    """fsspec options to read the input shards: ``override``, else the manifest's (secrets were
    masked there) with the output's own options when the input is on the same store."""
    if override is not None:
        return override
    opts = {k: v for k, v in (manifest_input.get("storage_options") or {}).items() if v != "***"}
    url = manifest_input.get("url") or next(iter((manifest_input.get("shards") or {}).values()), "")
    if split_url(url)[0] == out.protocol and out.protocol != "file":
        opts = {**opts, **out.storage_options}  # redacted secrets: the output's credentials
    return opts


def fetch_texts(shard_url: str, storage_options: dict[str, Any], id_column: str, text_column: str,
                wanted: list[tuple[str, int]]) -> dict[str, Optional[str]]:
    """Texts of documents ``(id, row)`` of one input shard: the row's row group is read and its id
    checked; when rows moved (e.g. skipped empty texts) the id is looked up in the whole shard."""
    store = Storage(shard_url, storage_options)
    found: dict[str, Optional[str]] = {}
    with store.open("", "rb") as f:
        pf = pq.ParquetFile(f)
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups: dict[int, pa.Table] = {}
        missing = []
        for doc_id, row in wanted:
            g = int(np.searchsorted(starts, row, side="right") - 1)
            if 0 <= g < pf.num_row_groups:
                if g not in groups:
                    groups[g] = pf.read_row_group(g, columns=[id_column, text_column])
                t = groups[g]
                r = row - int(starts[g])
                if str(t.column(id_column)[r].as_py()) == doc_id:
                    found[doc_id] = t.column(text_column)[r].as_py()
                    continue
            missing.append(doc_id)
        if missing:
            t = pf.read(columns=[id_column, text_column])
            ids = t.column(id_column).cast(pa.string())
            mask = pc.is_in(ids, value_set=pa.array(missing, pa.string()))
            sub = t.filter(mask)
            for i, txt in zip(sub.column(id_column).cast(pa.string()).to_pylist(), sub.column(text_column).to_pylist()):
                found[i] = txt
    return found


class Searcher:
    """A loaded document index plus the job's encoder: ``Searcher(url, opts).search("text")``."""

    def __init__(self, output_url: str, storage_options: Optional[dict[str, Any]] = None, *,
                 input_storage_options: Optional[dict[str, Any]] = None, level: str = "auto"):
        self.out = Storage(output_url, storage_options or {})
        if not self.out.exists(MANIFEST):
            raise StorageError(f"{self.out.url('manifest.json')} does not exist: not a finished embedjob output")
        if level not in SEARCH_LEVELS:
            raise StorageError(f"search level {level!r}; valid: {', '.join(SEARCH_LEVELS)}")
        self.manifest = self.out.read_json(MANIFEST)
        self.loaded = load_index(self.out, DOCS)
        has_chunks = self.out.exists(index_files(CHUNK_INDEX)["meta"])
        if level == "chunk" and not has_chunks:
            raise StorageError(f"no passage index at {self.out.url(INDEX_DIR)}: run the job with "
                               "encode.write_chunks: true (and index.enabled: true) to search passages")
        self.chunks = load_index(self.out, CHUNK_INDEX) if has_chunks and level != "doc" else None
        self.inp = self.manifest.get("input") or {}
        self.input_options = input_options(self.inp, self.out, input_storage_options)
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            if "encoder" not in self.manifest:
                raise StorageError(f"{self.out.url('manifest.json')} has no 'encoder' settings to encode queries with")
            self._encoder = query_encoder(self.manifest["encoder"])
        return self._encoder

    def search(self, query: str, k: int = 10, *, with_text: bool = True) -> list[dict[str, Any]]:
        q = self.encoder.encode_texts([query]).vectors
        return self.search_vector(q[0], k, with_text=with_text)

    def search_vector(self, q: np.ndarray, k: int = 10, *, with_text: bool = True) -> list[dict[str, Any]]:
        if self.chunks is not None:
            hits = self._best_passages(q, k)
            if with_text:
                self._attach_texts(hits)
            return hits
        k = max(1, min(int(k), self.loaded.index.ntotal))
        scores, labels = self.loaded.search_vectors(q.reshape(1, -1), k)
        pos = [int(p) for p in labels[0] if p >= 0]
        rows = self.loaded.ids.take(pa.array(pos, pa.int64())).to_pylist()
        hits = [{"id": r["id"], "score": float(s), "shard": r["shard"], "row": r["row"], "text_start": None}
                for r, s in zip(rows, scores[0])]
        if with_text:
            self._attach_texts(hits)
        return hits

    def _best_passages(self, q: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The ``k`` documents with the best-matching passages, each with its best passage (chunk
        index and character span), best first."""
        loaded = self.chunks
        want = max(1, min(int(k), self.loaded.index.ntotal))
        rows_of = {(r["shard"], r["id"]): r["row"] for r in self.loaded.ids.select(["id", "shard", "row"]).to_pylist()}
        hits: dict[str, dict[str, Any]] = {}
        kk = min(loaded.index.ntotal, want * 8)
        while True:
            scores, labels = loaded.search_vectors(q.reshape(1, -1), kk)
            pos = [int(p) for p in labels[0] if p >= 0]
            for r, sc in zip(loaded.ids.take(pa.array(pos, pa.int64())).to_pylist(), scores[0]):
                if r["id"] not in hits and (r["shard"], r["id"]) in rows_of:
                    hits[r["id"]] = {"id": r["id"], "score": float(sc), "shard": r["shard"],
                                     "row": rows_of[(r["shard"], r["id"])], "chunk": r["chunk"],
                                     "start_char": r["start_char"], "end_char": r["end_char"],
                                     "text_start": None, "passage": None}
            if len(hits) >= want or kk >= loaded.index.ntotal:
                return list(hits.values())[:want]
            hits.clear()
            kk = min(loaded.index.ntotal, kk * 4)

    def _attach_texts(self, hits: list[dict[str, Any]]) -> None:
        shards = self.inp.get("shards") or {}
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for h in hits:
            by_shard.setdefault(h["shard"], []).append((h["id"], h["row"]))
        for shard, wanted in by_shard.items():
            url = shards.get(shard)
            if url is None:
                logger.warning("search: shard %r is not in the manifest's input shards: no text shown", shard)
                continue
            try:
                texts = fetch_texts(url, self.input_options, self.inp.get("id_column", "id"),
                                    self.inp.get("text_column", "text"), wanted)
            except (OSError, StorageError, KeyError, pa.ArrowInvalid) as e:
                logger.warning("search: cannot read texts from input shard %s (%s); pass "
                               "--input-storage-option if it needs other credentials", url, e)
                continue
            for h in hits:
                if h["shard"] == shard and texts.get(h["id"]) is not None:
                    h["text_start"] = texts[h["id"]][:TEXT_START_CHARS]
                    if "start_char" in h:  # a passage hit: text[start_char:end_char] is its text
                        h["passage"] = texts[h["id"]][h["start_char"]:h["end_char"]]


def search(output_url: str, storage_options: Optional[dict[str, Any]], query: str, k: int = 10, *,
           input_storage_options: Optional[dict[str, Any]] = None, level: str = "auto") -> list[dict[str, Any]]:
    """The ``k`` documents nearest to ``query`` in a finished job's index: ``id``, ``score`` (see
    ``index/docs.json``: inner product or squared L2), ``shard``, ``row`` and ``text_start``. With
    a passage index (``encode.write_chunks``) and ``level`` auto or chunk, documents are ranked by
    their best passage, given as ``chunk``, ``start_char``, ``end_char`` and ``passage``."""
    return Searcher(output_url, storage_options, input_storage_options=input_storage_options,
                    level=level).search(query, k)


def similar_words_in_index(output_url: str, storage_options: Optional[dict[str, Any]], name: str, word: str,
                  k: int = 10) -> list[dict[str, Any]]:
    """Nearest words (cosine) to ``word`` in the ``words-<name>`` index of a finished job; ``word``
    is spelled as the job's preprocessing spelled its vocabulary first (``People`` -> ``people``)."""
    import faiss

    from embedjob.stages.spelling import job_spelling

    word = job_spelling(output_url, storage_options, word)
    out = Storage(output_url, storage_options or {})
    loaded = load_index(out, f"words-{name}")
    words = loaded.ids.column("word")
    hit = pc.index(words, word).as_py()
    if hit < 0:
        raise StorageError(f"word {word!r} is not in the {name} word index of {output_url} ({len(words)} words; "
                           "words are matched after the job's preprocessing, e.g. lower-cased)")
    if loaded.meta["kind"].startswith("ivf") and not isinstance(faiss.downcast_index(loaded.index), faiss.IndexRefine):
        faiss.extract_index_ivf(loaded.index).make_direct_map()
    q = loaded.index.reconstruct(int(hit)).reshape(1, -1)
    scores, labels = loaded.search_vectors(q, min(k + 1, loaded.index.ntotal))
    out_rows = []
    for s, p in zip(scores[0], labels[0]):
        if p < 0 or p == hit:
            continue
        out_rows.append({"word": words[int(p)].as_py(), "score": float(s)})
    return out_rows[:k]


def search_report(output_url: str, query: str, *, k: int = 10, storage_options: Optional[dict[str, Any]] = None,
                  input_storage_options: Optional[dict[str, Any]] = None, words: Optional[str] = None,
                  as_json: bool = False, level: str = "auto") -> str:
    """What ``embedjob search`` prints: a line per hit (rank, score, id and the start of the text;
    with ``words`` the words near the word ``query`` in the ``words-<words>`` index), or one JSON
    object with ``as_json``."""
    if words:
        hits = similar_words_in_index(output_url, storage_options, words, query, k)
        if as_json:
            return json.dumps({"query": query, "index": f"words-{words}", "hits": hits})
        return "\n".join(f"{i:>3}  {h['score']:.4f}  {h['word']}" for i, h in enumerate(hits, 1))
    try:  # a one-shot CLI: no model-loading progress bar around the results
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    t = time.time()
    hits = search(output_url, storage_options, query, k, input_storage_options=input_storage_options, level=level)
    if as_json:
        return json.dumps({"query": query, "seconds": round(time.time() - t, 3), "hits": hits})
    lines = []
    for i, h in enumerate(hits, 1):
        text = (h.get("passage") or h["text_start"] or "").replace("\n", " ")
        lines.append(f"{i:>3}  {h['score']:.4f}  {h['id']}  {text[:100]}")
    return "\n".join(lines)
