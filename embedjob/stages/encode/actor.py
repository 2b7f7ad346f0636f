"""The encoder as a Ray Data callable class: one per GPU (``num_gpus=1``) or CPU actors."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from embedjob.debug import encode_batch_delay, encode_call_started, encode_delay, encode_init_death, encoder_ready
from embedjob.errors import row_error
from embedjob.layout import failed_marker
from embedjob.progress import BatchReporter
from embedjob.schema import (
    CAPPED,
    CHUNK_TOKENS,
    CHUNK_VECTORS,
    DOC_TOKENS,
    ENCODED_TOKENS,
    ENCODER_NODE,
    ENCODER_RSS,
    INPUT_IDS,
    ROW,
    SHARD,
    WINDOWS,
)
from embedjob.stages.encode.busy import BusyClock, PoolPlan
from embedjob.stages.encode.encoder import TextEncoder
from embedjob.stages.encode.oom import DocumentTooLarge
from embedjob.stages.encode.settings import EncoderSettings
from embedjob.stages.encode.tokenizer import release_free_memory
from embedjob.stages.static.accumulate import StaticAccumulator
from embedjob.stages.static.config import StaticSettings
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


def vectors_to_arrow(vectors: np.ndarray, valid: Optional[np.ndarray] = None) -> pa.Array:
    """A (n, dim) float32 matrix as a fixed-size list array (null where ``valid`` is False)."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


def id_arrays(col: Any) -> list[np.ndarray]:
    """Each row of a ``list<int32>`` column as an int32 array: views of the column's one flat
    buffer (no Python int per token, as ``to_pylist`` would make); a null row is empty."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not len(arr):
        return []
    off = arr.offsets.to_numpy()
    flat = arr.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    base = int(off[0])
    return np.split(flat[base:int(off[-1])], (off[1:-1] - base).tolist())


def encoder_pool(ds, cfg, encoder: EncoderSettings, plan: PoolPlan, static: Optional[StaticSettings],
                 counter: Any = None, unfit: Optional[dict[str, Any]] = None):
    """``ds`` followed by the encoder actor pool (``cfg``: the job's ``encode`` section; ``plan``:
    :func:`embedjob.cluster.plan_encoder`'s actors, GPUs, CPUs and threads per actor; ``counter``:
    the driver's :class:`~embedjob.progress.ProgressCounter` the actors report each batch to;
    ``unfit``: ``on_bad_shard``, ``out_url``, ``out_options`` for a document that does not fit in memory)."""
    import warnings

    import ray

    with warnings.catch_warnings():
        # Ray 2.60 deprecates **ray_remote_args but offers no named parameter for actor restarts
        # (encode.max_restarts / max_task_retries): its warning says nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={"settings": encoder, "batch_tokens": cfg.batch_tokens_for(encoder.device),
                                   "max_batch_docs": cfg.max_batch_docs, "num_threads": plan.threads,
                                   "static": static, "batching": cfg.batching, "compile": cfg.compile,
                                   "cache_dir": cfg.cache_dir, "progress": counter, "unfit": unfit},
            batch_format="pyarrow", batch_size=cfg.rows_per_call, zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_gpus=plan.num_gpus or None, num_cpus=plan.num_cpus, resources=plan.resources,
            max_restarts=cfg.max_restarts, max_task_retries=cfg.max_task_retries,
            # actors on as many nodes as hold room for them: a lost (spot) node costs the fewest
            **({"scheduling_strategy": "SPREAD"} if plan.actors > 1 else {}),
        )


class EncodeActor:
    """Ray Data callable class: loads the model once per actor, encodes one block per call.

    Input batch (pyarrow): the preprocess stage's columns, including ``_input_ids``; rows whose
    text was empty carry an empty id list and get a null vector. Output: the same rows with
    ``vector`` (fixed-size float32 list) and ``n_tokens`` (the whole document's tokens) added, with
    the write stage's counters ``_windows``, ``_encoded_tokens``, ``_capped``; ``_input_ids`` dropped."""

    def __init__(self, settings: EncoderSettings, batch_tokens: int, max_batch_docs: int,
                 num_threads: Optional[int] = None, static: Optional[StaticSettings] = None,
                 batching: str = "auto", compile: bool = False, cache_dir: Optional[str] = None,
                 progress: Any = None, unfit: Optional[dict[str, Any]] = None):
        import torch

        encode_init_death()  # test-only: an actor lost while it starts (a node gone, a crash)
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"encoder actor was placed for a GPU (node {_ray_node_id()}, Ray GPU ids {_ray_gpu_ids()}) but "
                f"torch {torch.__version__} "
                f"(CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device: install a CUDA build of torch "
                "on the GPU nodes, or set encode.device=cpu")
        self.encoder = TextEncoder(settings, batch_tokens=batch_tokens, max_batch_docs=max_batch_docs,
                                   num_threads=num_threads, batching=batching,
                                   compile=compile, cache_dir=cache_dir)
        self.static = None
        if static:
            self.static = StaticAccumulator(self.encoder, **static.accumulator_kwargs())
        self.node_id = _ray_node_id()
        self.progress = BatchReporter(progress)  # the driver's ProgressCounter (None: not counted)
        self.clock = BusyClock()  # waiting for blocks vs computing: "encoder busy" (busy.py)
        self._model_cpu = 0.0  # the encoder's model_cpu_s already reported
        self.unfit = unfit or {}  # where a document too large for memory is reported (oom.py)
        logger.info("encoder actor ready: %s on %s (%s, %s batches), %d threads", settings.model,
                    settings.device, settings.dtype, self.encoder.batching, torch.get_num_threads())
        encoder_ready()  # test-only: a deliberately slow preprocess starts now

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.clock.arrive()
        try:
            return self._call(batch)
        finally:
            model_cpu = self.encoder.counters["model_cpu_s"]
            self.progress.add_time(*self.clock.leave(), model_cpu - self._model_cpu)
            self._model_cpu = model_cpu
            self.progress.flush()

    def _call(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows:  # a second start of the same rows is a retried block (bookkeeping)
            self.progress.begin(f"{batch.column(SHARD)[0].as_py()}:{batch.column(ROW)[0].as_py()}")
        encode_call_started()  # test-only: tells a test this process is mid-call
        encode_delay()  # test-only: widens the window to kill an actor mid-run
        ids_col = id_arrays(batch.column(INPUT_IDS))
        keep = np.fromiter((len(x) > 0 for x in ids_col), dtype=bool, count=len(ids_col))
        unfit = np.zeros(batch.num_rows, dtype=bool)
        while True:  # out of memory even alone (oom.py): that document is left out, the actor lives on
            try:
                enc = self._encode(batch, ids_col, keep)
                break
            except DocumentTooLarge as e:
                row = int(np.flatnonzero(keep)[e.doc])
                keep[row] = False
                unfit[row] = True
                unfit_document(batch, row, e, **self.unfit)
        if self.encoder.oom.ooms:
            self.progress.oom(f"{self.node_id}:{os.getpid()}", self.encoder.oom.as_dict())
        self.progress.flush()
        vectors = np.zeros((batch.num_rows, self.encoder.dim), dtype=np.float32)
        vectors[keep] = enc.vectors
        out = batch.drop_columns([c for c in (INPUT_IDS, DOC_TOKENS) if c in batch.column_names])
        out = out.append_column("vector", vectors_to_arrow(vectors, valid=keep))
        for name, values, typ in (("n_tokens", enc.n_tokens, pa.int32()), (WINDOWS, enc.windows, pa.int32()),
                                  (ENCODED_TOKENS, enc.encoded_tokens, pa.int32()), (CAPPED, enc.capped, pa.bool_())):
            col = np.zeros(batch.num_rows, dtype=values.dtype)
            col[keep] = values
            out = out.append_column(name, pa.array(col, type=typ))
        if self.encoder.settings.write_chunks:
            out = _append_chunks(out, enc, keep)
        if self.node_id is not None:
            out = out.append_column(ENCODER_NODE, pa.array([self.node_id] * batch.num_rows, type=pa.string()))
        release_free_memory()
        out = out.append_column(ENCODER_RSS, pa.array([_peak_rss_mb()] * batch.num_rows, type=pa.float64()))
        if self.static is not None:
            out = self.static.attach(out)
        if unfit.any():  # its shard is never complete: not committed, its failure recorded
            out = out.filter(pa.array(~unfit))
        return out

    def _encode(self, batch: pa.Table, ids_col: list, keep: np.ndarray):
        """The encoder's output for the rows ``keep`` of ``batch`` (static word sums hooked in)."""
        todo = [x for x, k in zip(ids_col, keep) if k]
        doc_tokens = None
        if DOC_TOKENS in batch.column_names:  # whole documents tokenised: ids capped at encode.max_windows
            doc_tokens = batch.column(DOC_TOKENS).to_numpy(zero_copy_only=False)[keep]
        hook = self.static.hook_for(batch, keep) if self.static is not None else None
        return self.encoder.encode_ids(todo, token_hook=hook, doc_tokens=doc_tokens,
                                       windows_out=self.encoder.settings.write_chunks, on_batch=self._batch_done)

    def _batch_done(self, docs: int, tokens: int) -> None:
        self.progress.add(docs, tokens)
        encode_batch_delay()  # test-only: a block long enough to see progress while it is in flight


def unfit_document(batch: pa.Table, row: int, e: DocumentTooLarge, *, on_bad_shard: str = "fail",
                   out_url: Optional[str] = None, out_options: Optional[dict[str, Any]] = None,
                   id_column: str = "id") -> None:
    """A document that does not fit in memory even alone: under ``on_bad_shard=fail`` the error
    (shard, row, id); under ``skip`` its shard's failure record (the shard is never committed)."""
    shard, at = batch.column(SHARD)[row].as_py(), batch.column(ROW)[row].as_py()
    doc_id = batch.column(id_column)[row].as_py() if id_column in batch.column_names else None
    err = row_error(shard, at, doc_id, f"encode: the document {e}")
    if on_bad_shard != "skip" or out_url is None:
        raise err
    logger.warning("%s; shard %s fails (input.on_bad_shard=skip)", err, shard)
    Storage(out_url, out_options or {}).write_json(failed_marker(shard), {"reason": str(err)})


def _append_chunks(out: pa.Table, enc, keep: np.ndarray) -> pa.Table:
    """``_chunk_vectors`` and ``_chunk_tokens`` (encode.write_chunks): each row's windows, in order."""
    n = out.num_rows
    counts = np.zeros(n, dtype=np.int32)
    counts[keep] = enc.windows
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    vecs = vectors_to_arrow(enc.window_vectors)
    out = out.append_column(CHUNK_VECTORS, pa.ListArray.from_arrays(offsets, vecs))
    return out.append_column(CHUNK_TOKENS, pa.ListArray.from_arrays(offsets, pa.array(enc.window_tokens, pa.int32())))


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _ray_node_id() -> Optional[str]:
    """The id of the Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - bookkeeping only, never fail encoding for it
        return None


def _ray_gpu_ids() -> list:
    """The GPUs Ray assigned to this actor ([] outside Ray)."""
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - for the error message only
        return []
