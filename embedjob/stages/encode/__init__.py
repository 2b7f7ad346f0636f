"""Encode stage: BERT document vectors with token-budget batching, in a Ray Data actor pool.

* ``config.py`` — :class:`EncodeConfig`, the ``encode:`` section of a job file.
* ``settings.py`` — :class:`EncoderSettings`: the settings as actually used (model folder, device,
  dtype, fingerprint), recorded in the manifest and hashed into the recipe.
* ``encoder.py`` — :class:`TextEncoder`: token ids (or texts) -> document vectors, testable
  without Ray; padded batches, or packed ones (``packed.py``) where they are faster.
* ``tokenizer.py`` — :class:`Tokenizer`: texts -> token ids in bounded memory, whatever a
  document's size (long texts in whitespace-cut pieces); ``encode_flat`` in flat arrays, through
  ``chunk_cache.py`` where the tokenizer allows it.
* ``chunk_cache.py`` — :class:`ChunkCache`: texts cut at whitespace (and punctuation for BERT's
  pre-tokenizer) into chunks, each distinct chunk tokenised once per process, the ids gathered in
  numpy: the tokenizer's own ids, word ids and offsets at a third of its CPU (and, for the static
  vectors, each chunk's words' normalised forms).
* ``flat.py`` — :class:`FlatTokenized`: a tokenizer call in flat arrays, and the numpy helpers that
  cut and join them.
* ``modules.py`` — the model's sentence-transformers module pipeline (``modules.json``): Pooling in
  every mode, Dense / LayerNorm / Normalize heads, prompts, Matryoshka ``truncate_dim``; unknown
  modules and remote code refused in one line.
* ``packed.py`` — a padding-free BERT forward: the documents of a batch concatenated, attention per
  document (varlen kernels on CUDA).
* ``windows.py`` — long documents as overlapping windows (``encode.long_documents: windows``): the
  window plan (snapped to sentences by default), which window owns each token, and the combination
  of window vectors.
* ``actor.py`` — :class:`EncodeActor`, the callable class Ray Data runs in an actor pool.

The encoder core (settings, tokenizer, chunk_cache, flat, windows, encoder, packed) imports no pydantic, Ray, gensim or faiss, so that
``.ci/gpu-check`` runs it on a bare GPU host. The names below are imported on first use for the
same reason: ``from embedjob.stages.encode import TextEncoder`` loads only what it names.

Example::

    enc = TextEncoder.from_config(EncodeConfig(dtype="float32"))
    vecs = enc.encode_texts(["a cat", "a dog"]).vectors   # (2, 384) float32
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EncodeConfig": "config",
    "EncoderSettings": "settings", "PoolPlan": "busy", "resolve_encoder_settings": "settings", "resolve_dtype": "settings",
    "cpu_supports_bf16": "settings", "ENCODER_RECIPE": "settings", "POOLING_MODES": "modules",
    "ModulePipeline": "modules", "read_pipeline": "modules",
    "TextEncoder": "encoder", "EncodedBatch": "encoder", "token_budget_batches": "encoder", "TokenHook": "encoder",
    "Tokenizer": "tokenizer", "Tokenized": "tokenizer",
    "WindowPlan": "windows", "plan_windows": "windows", "plan_for": "windows",
    "EncodeActor": "actor", "vectors_to_arrow": "actor",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
