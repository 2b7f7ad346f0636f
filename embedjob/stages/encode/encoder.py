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
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from embedjob.debug import encode_oom_check
from embedjob.models import model_fingerprint
from embedjob.stages.encode.modules import POOLING_MODES, Heads, pool
from embedjob.stages.encode.oom import OomBudget, by_document, split_on_oom
from embedjob.stages.encode.openvino import DEFAULT_CACHE, OpenVinoEncoder
from embedjob.stages.encode.packed import PackedBatch, PackedBert, packed_batches, supports
from embedjob.stages.encode.settings import EncoderSettings, resolve_encoder_settings
from embedjob.stages.encode.tokenizer import Tokenizer
from embedjob.stages.encode.windows import (
    LONG_DOCUMENT_MODES,
    check_window_settings,
    combine_windows,
    plan_for,
    window_ids,
)

logger = logging.getLogger(__name__)

# Batch widths are rounded up to a multiple of this (see TextEncoder.pad_multiple).
PAD_MULTIPLE = 16


@dataclass
class EncodedBatch:
    vectors: np.ndarray  # (n, dim) float32, input order
    n_tokens: np.ndarray  # (n,) int32, the document's tokens incl. special tokens (all of them with windows)
    windows: Optional[np.ndarray] = None  # (n,) int32 windows encoded per document
    encoded_tokens: Optional[np.ndarray] = None  # (n,) int32 tokens fed to the model (overlaps counted twice)
    capped: Optional[np.ndarray] = None  # (n,) bool: longer than encode.max_windows windows, tail dropped
    window_vectors: Optional[np.ndarray] = None  # (W, dim) per window, by document (encode_ids(windows_out=True))
    window_tokens: Optional[np.ndarray] = None  # (W,) int32 tokens of each window


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
# positions of the batch's documents in the input, one per row, and each row's window spans:
# WindowPlan.spans, which say which of the document's token positions a row holds and owns).
# Used by the static word vector stage.
TokenHook = Callable[[Any, Any, np.ndarray, np.ndarray], None]


BATCHING_MODES = ("auto", "packed", "padded")
BACKENDS = ("torch", "openvino")


class TextEncoder:
    """A loaded BERT-like model that turns documents into vectors.

    ``settings`` is :func:`resolve_encoder_settings`'s output (or an ``EncodeConfig`` via
    :meth:`from_config`). ``batching``: ``packed`` runs BERT encoders padding-free
    (:mod:`~embedjob.stages.encode.packed`), ``padded`` runs the model's own forward over
    length-sorted padded batches, ``auto`` packs on CUDA and pads on CPU, where packing measured no
    faster (``embedjob bench encode --batching``). A model that cannot be packed runs padded.
    ``counters`` adds up documents, real tokens, computed token slots (padding included) and
    batches."""

    def __init__(self, settings: EncoderSettings, *, batch_tokens: int = 16384, max_batch_docs: int = 256,
                 num_threads: Optional[int] = None, output_hidden_layers: Optional[Sequence[int]] = None,
                 batching: str = "auto", compile: bool = False, backend: Optional[str] = None,
                 cache_dir: Optional[str] = None):
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.torch = torch
        self.settings = dataclasses.replace(settings)
        bad = [m for m in self.settings.pooling_modes if m not in POOLING_MODES]
        if bad:
            raise ValueError(f"encode.pooling={self.settings.pooling!r}; valid: {', '.join(POOLING_MODES)}")
        if batching not in BATCHING_MODES:
            raise ValueError(f"encode.batching={batching!r}; valid: {', '.join(BATCHING_MODES)}")
        backend = backend or settings.backend
        if backend not in BACKENDS:
            raise ValueError(f"encode.backend={backend!r}; valid: {', '.join(BACKENDS)}")
        if backend == "openvino" and self.settings.device != "cpu":
            raise ValueError(f"encode.backend=openvino runs on CPU, not {self.settings.device}")
        self.device = torch.device(self.settings.device)
        self.dtype = getattr(torch, self.settings.dtype) if backend == "torch" else torch.float32
        path = self.settings.model_path
        hf_logging.disable_progress_bar()  # no "Loading weights" bar from every actor
        kw = dict(self.settings.model_kwargs or {}, trust_remote_code=self.settings.trust_remote_code)
        try:
            self.model = AutoModel.from_pretrained(path, dtype=self.dtype, attn_implementation="sdpa", **kw)
        except (ValueError, ImportError):  # models without SDPA support
            self.model = AutoModel.from_pretrained(path, dtype=self.dtype, **kw)
        self.model.eval().to(self.device)
        root = path if not self.settings.transformer_path else os.path.dirname(os.path.normpath(path))
        self.heads = Heads(root, self.settings.heads, self.device)
        if self.settings.long_documents not in LONG_DOCUMENT_MODES:
            raise ValueError(f"encode.long_documents={self.settings.long_documents!r}; "
                             f"valid: {', '.join(LONG_DOCUMENT_MODES)}")
        if self.settings.long_documents == "windows":
            check_window_settings(self.settings.max_length, self.settings.window_overlap, self.settings.max_windows,
                                  self.settings.window_pooling, self.settings.head_tokens, self.settings.tail_tokens)
        self.tokenizer = Tokenizer.from_settings(self.settings)
        self.pad_id = self.tokenizer.tok.pad_token_id or 0
        self.dim = int(self.settings.dim or self.model.config.hidden_size)
        self.oom = OomBudget(batch_tokens)  # the token budget, lowered on out-of-memory (oom.py)
        self.max_batch_docs = max_batch_docs
        # Batch widths rounded up to a multiple of 16: few distinct shapes keep oneDNN's primitive cache
        # and the allocator's free lists bounded (actor memory stays flat over a long backfill) and
        # suit GPU tensor cores; the extra padding is masked out and measured no slower on CPU.
        self.pad_multiple = PAD_MULTIPLE
        self._layers = tuple(output_hidden_layers) if output_hidden_layers else None
        self.settings.dim = self.dim
        self.settings.model_fingerprint = self.settings.model_fingerprint or model_fingerprint(path)
        self.ov = None
        self.backend = self.settings.backend = backend
        if backend == "openvino":
            self._ov_cache = cache_dir or DEFAULT_CACHE
            self.ov = self._openvino(self._layers)
            batching = "padded"
        self.packed = None
        if batching == "packed" or (batching == "auto" and self.device.type == "cuda"):
            self.packed = self._packed_forward(batching, compile)
        self.batching = self.settings.batching = "packed" if self.packed is not None else "padded"
        on_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        # tokens = fed to the model (real, overlaps of windows twice); doc_tokens = the documents' own;
        # model_cpu_s = CPU seconds of the calling thread inside the model's forward passes (on CUDA the
        # kernel launches; on CPU with one torch thread the whole forward: bench feed leaves it out)
        self.counters = {"docs": 0, "tokens": 0, "computed_tokens": 0, "batches": 0, "doc_tokens": 0,
                         "windows": 0, "capped_docs": 0, "model_cpu_s": 0.0}

    @property
    def batch_tokens(self) -> int:
        """Token budget of one model batch (lowered for good after an out-of-memory, ``oom.py``)."""
        return self.oom.batch_tokens

    @batch_tokens.setter
    def batch_tokens(self, value: int) -> None:
        self.oom = OomBudget(value)

    @property
    def output_hidden_layers(self) -> Optional[tuple]:
        """Hidden layers handed to a token hook (``hidden_states`` indices); None = the last only."""
        return self._layers

    @output_hidden_layers.setter
    def output_hidden_layers(self, layers: Optional[Sequence[int]]) -> None:
        layers = tuple(layers) if layers else None
        if layers != self._layers and self.ov is not None:  # the exported graph returns exactly these layers
            self.ov = self._openvino(layers)
        self._layers = layers

    def _openvino(self, layers: Optional[tuple]):
        """The model compiled by OpenVINO, returning the last hidden state and ``layers``."""
        return OpenVinoEncoder(self.model, self._ov_cache, self.settings.model_fingerprint, dtype=self.settings.dtype,
                               layers=layers or (), threads=self.torch.get_num_threads())

    def _packed_forward(self, batching: str, compile: bool):
        why = supports(self.model)
        if why is None:
            return PackedBert(self.model, compile=compile)
        (logger.warning if batching == "packed" else logger.info)(
            "encode.batching=%s: %s cannot be packed (%s); running padded batches", batching,
            self.settings.model, why)
        return None

    @classmethod
    def from_config(cls, cfg, *, device: str = "cpu", **kwargs) -> "TextEncoder":
        kwargs.setdefault("batching", getattr(cfg, "batching", "auto"))
        kwargs.setdefault("compile", getattr(cfg, "compile", False))
        kwargs.setdefault("cache_dir", getattr(cfg, "cache_dir", None))
        return cls(resolve_encoder_settings(cfg, device), batch_tokens=cfg.batch_tokens_for(device),
                   max_batch_docs=cfg.max_batch_docs, **kwargs)

    def encode_texts(self, texts: Sequence[str], token_hook: Optional[TokenHook] = None) -> EncodedBatch:
        if not texts:
            return self.encode_ids([], token_hook=token_hook)
        tok = self.tokenizer.encode(texts)
        return self.encode_ids([np.asarray(x, dtype=np.int32) for x in tok.ids], token_hook=token_hook,
                               doc_tokens=tok.doc_tokens)

    def encode_ids(self, ids: Sequence[np.ndarray], token_hook: Optional[TokenHook] = None,
                   doc_tokens: Optional[np.ndarray] = None, windows_out: bool = False,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> EncodedBatch:
        """Vectors for documents given as token id arrays (with special tokens), in input order.

        With ``long_documents: windows`` a document longer than ``max_length`` is cut into
        overlapping windows (:mod:`~embedjob.stages.encode.windows`) that share batches with every
        other document's; its vector combines its windows' (``window_pooling``) before normalising.
        ``doc_tokens``: each document's whole token count when ``ids`` were capped (the tokenizer's
        :class:`Tokenized`), reported as ``n_tokens``. ``windows_out`` adds every window's own vector
        (normalised when the model normalises), windows in document order. ``on_batch(windows,
        tokens)`` is called after each model batch (progress). The pooled vectors stay on the
        device until every batch has run, then come back in one copy."""
        torch = self.torch
        n = len(ids)
        out = np.zeros((n, self.dim), dtype=np.float32)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        n_tokens = (lengths if doc_tokens is None else np.maximum(np.asarray(doc_tokens), lengths)).astype(np.int32)
        plan = plan_for(self.settings, ids, self.tokenizer.sentence_end_ids)
        plan.capped |= n_tokens > lengths  # the tokenizer cut the document at the cap already
        if n == 0:
            return EncodedBatch(out, n_tokens, plan.windows, lengths.astype(np.int32), plan.capped,
                                np.zeros((0, self.dim), np.float32), np.zeros(0, np.int32))
        wids = window_ids(ids, plan)
        wlen = plan.n_tokens
        hook = None
        if token_hook is not None:
            def hook(layers, mask, idx):
                token_hook(layers, mask, plan.doc[idx], plan.spans(idx))
        run = self._run_packed if self.packed is not None else self._run_padded
        parts, order = [], []
        share = 1.0 / np.maximum(plan.windows[plan.doc], 1)  # each window's share of its document (progress)
        done, reported = 0.0, 0
        with torch.inference_mode():
            for idx, pooled in by_document(run(wids, wlen, hook), plan.doc, self.oom):
                parts.append(pooled)
                order.append(idx)
                if on_batch is not None:
                    done += float(share[idx].sum())
                    k = min(n, int(round(done))) - reported
                    reported += k
                    on_batch(k, int(wlen[idx].sum()))
            if on_batch is not None and reported < n:
                on_batch(n - reported, 0)
            pooled = torch.cat(parts)
            by_window = torch.empty_like(pooled)
            by_window[torch.from_numpy(np.concatenate(order)).to(pooled.device)] = pooled
            if self.heads:  # Dense / LayerNorm...: each window is a text of its own to the model
                by_window = self.heads(by_window)
            pooled = self._finish(combine_windows(by_window, plan, self.settings.window_pooling))
            by_window = self._finish(by_window) if windows_out else by_window
            win_vecs = None
            out[:] = pooled.cpu().numpy()
            if windows_out:
                win_vecs = by_window.cpu().numpy()
        encoded = np.bincount(plan.doc, weights=wlen, minlength=n).astype(np.int32)
        c = self.counters
        c["docs"] += n
        c["tokens"] += int(wlen.sum())
        c["doc_tokens"] += int(n_tokens.sum())
        c["windows"] += len(wlen)
        c["capped_docs"] += int(plan.capped.sum())
        return EncodedBatch(out, n_tokens, plan.windows, encoded, plan.capped, win_vecs, wlen.astype(np.int32))

    def _finish(self, vecs):
        """Matryoshka truncation to ``dimensions``, then L2 normalisation when the model normalises
        (sentence-transformers' truncate_dim cuts its normalised vectors; normalised again here, so
        that every vector has unit length)."""
        if self.settings.dimensions:
            vecs = vecs[:, :self.settings.dimensions]
        if self.settings.normalize:
            vecs = self.torch.nn.functional.normalize(vecs, p=2, dim=1)
        return vecs

    def _run_packed(self, ids, lengths, token_hook):
        def cost(idx):
            return int(lengths[idx].sum())

        for idx in packed_batches(lengths, self.batch_tokens, self.max_batch_docs):
            yield from split_on_oom(lambda i: self._packed_batch(ids, lengths, i, token_hook), idx, cost, self.oom)

    def _packed_batch(self, ids, lengths, idx, token_hook):
        """One packed model batch of windows ``idx``: (idx, pooled vectors)."""
        on_cuda = self.device.type == "cuda"
        layers_wanted = self.output_hidden_layers if token_hook is not None else None
        encode_oom_check(int(lengths[idx].sum()))  # test-only: an injected allocator failure
        batch = PackedBatch.build([ids[j] for j in idx], self.device, pin=on_cuda, copy_stream=self.copy_stream)
        c0 = time.thread_time()
        hidden, layers = self.packed(batch, hidden_layers=layers_wanted)
        self.counters["model_cpu_s"] += time.thread_time() - c0
        self.counters["computed_tokens"] += int(lengths[idx].sum())
        self.counters["batches"] += 1
        if token_hook is not None:
            padded = [batch.to_padded(h) for h in (layers or [hidden])]
            token_hook([p for p, _ in padded], padded[0][1], idx)
        modes, skip = self.settings.pooling_modes, self.settings.skip_tokens
        if len(modes) == 1 and modes[0] in ("mean", "cls", "max") and not skip:
            return idx, batch.pool(hidden, modes[0])
        return idx, pool(*batch.to_padded(hidden), modes, skip)

    def _run_padded(self, ids, lengths, token_hook):
        def cost(idx):
            return len(idx) * int(lengths[idx].max())

        for idx in token_budget_batches(lengths, self.batch_tokens, self.max_batch_docs):
            yield from split_on_oom(lambda i: self._padded_batch(ids, lengths, i, token_hook), idx, cost, self.oom)

    def _padded_batch(self, ids, lengths, idx, token_hook):
        """One padded model batch of windows ``idx``: (idx, pooled vectors)."""
        torch = self.torch
        on_cuda = self.device.type == "cuda"
        width = int(lengths[idx].max())
        if self.pad_multiple > 1:
            width = min(-(-width // self.pad_multiple) * self.pad_multiple,
                        max(int(self.settings.max_length or width), width))
        encode_oom_check(len(idx) * width)  # test-only: an injected allocator failure
        input_ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for r, j in enumerate(idx):
            L = lengths[j]
            input_ids[r, :L] = ids[j]
            mask[r, :L] = 1
        t_ids, t_mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
        if on_cuda:
            t_ids, t_mask = (t.pin_memory().to(self.device, non_blocking=True) for t in (t_ids, t_mask))
        want_hidden = token_hook is not None and self.output_hidden_layers is not None
        c0 = time.thread_time()
        if self.ov is not None:
            last, extra = self.ov(input_ids, mask)
            hidden, chosen = torch.from_numpy(last), [torch.from_numpy(x) for x in extra]
        else:
            res = self.model(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=want_hidden)
            hidden = res.last_hidden_state
            chosen = [res.hidden_states[i] for i in self.output_hidden_layers] if want_hidden else []
        self.counters["model_cpu_s"] += time.thread_time() - c0
        self.counters["computed_tokens"] += len(idx) * width
        self.counters["batches"] += 1
        if token_hook is not None:
            token_hook(chosen if want_hidden else [hidden], t_mask, idx)
        return idx, self._pool(hidden, t_mask)

    def _pool(self, hidden, mask):
        return pool(hidden, mask, self.settings.pooling_modes, self.settings.skip_tokens)
