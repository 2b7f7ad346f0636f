"""A padding-free BERT forward: the documents of a batch concatenated into one ``(tokens, hidden)``
matrix, so that every matrix product works on real tokens only, and attention computed per
document.

It runs the weights of a loaded Hugging Face ``BertModel`` (MiniLM, BERT-base and the other
absolute-position BERT encoders); :func:`supports` says whether a model qualifies, and the encoder
keeps the model's own (padded) forward for the rest. Attention, per document:

* ``varlen`` — ``torch.nn.attention.varlen.varlen_attn`` (flash attention over cumulative sequence
  offsets; CUDA, bf16/fp16), where the installed torch offers it;
* ``padded`` — the packed queries, keys and values scattered into a padded ``(docs, width)`` layout
  for one SDPA call and gathered back (any device and dtype). Only attention sees padding; the
  linear layers, which hold nearly all of the FLOPs, never do.

Example::

    packed = PackedBert(model)                       # a loaded transformers BertModel
    batch = PackedBatch.build([ids_a, ids_b], device)
    hidden, layers = packed(batch)                   # (total tokens, hidden)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

ATTENTION_MODES = ("auto", "varlen", "padded")


def supports(model: Any) -> Optional[str]:
    """None when ``model`` is a BERT encoder this module can run, else why not (one phrase)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "bert":
        return f"model type {getattr(cfg, 'model_type', '?')!r} is not 'bert'"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return "relative position embeddings"
    if getattr(cfg, "is_decoder", False):
        return "a decoder"
    try:
        layer = model.encoder.layer[0]
        _ = (model.embeddings.word_embeddings, model.embeddings.position_embeddings,
             model.embeddings.token_type_embeddings, model.embeddings.LayerNorm,
             layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
             layer.attention.output.dense, layer.attention.output.LayerNorm,
             layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
             layer.output.dense, layer.output.LayerNorm)
    except AttributeError as e:
        return f"unexpected module layout ({e})"
    return None


def varlen_available(device: Any, dtype: Any) -> bool:
    """True where ``varlen_attn`` exists in this torch and can run (CUDA, half precision)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PackedBatch:
    """The documents of one batch, concatenated, with what attention and pooling need."""

    ids: Any  # (T,) int64 token ids
    positions: Any  # (T,) int64 position in its document
    doc_of_token: Any  # (T,) int64 row of its document in the batch
    cu_seqlens: Any  # (N+1,) int32 start offsets, for varlen attention
    lengths: Any  # (N,) int64
    max_len: int
    n_docs: int

    @classmethod
    def build(cls, docs: Sequence[np.ndarray], device: Any = "cpu", pin: bool = False,
              copy_stream: Any = None) -> "PackedBatch":
        """Pack token id arrays; on CUDA the host buffers are pinned and copied without blocking
        (on ``copy_stream`` when given, so that the copy overlaps the previous batch's compute)."""
        import torch

        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        total = int(lengths.sum())
        starts = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if total else np.zeros(0, np.int64)
        doc_of_token = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
        positions = np.arange(total, dtype=np.int64) - starts[:-1][doc_of_token]
        host = {
            "ids": torch.from_numpy(ids), "positions": torch.from_numpy(positions),
            "doc_of_token": torch.from_numpy(doc_of_token), "cu_seqlens": torch.from_numpy(starts.astype(np.int32)),
            "lengths": torch.from_numpy(lengths),
        }
        dev = torch.device(device)
        if dev.type == "cuda":
            if pin:
                host = {k: v.pin_memory() for k, v in host.items()}
            if copy_stream is not None:
                with torch.cuda.stream(copy_stream):
                    moved = {k: v.to(dev, non_blocking=True) for k, v in host.items()}
                current = torch.cuda.current_stream(dev)
                current.wait_stream(copy_stream)
                for v in moved.values():
                    v.record_stream(current)  # the compute stream uses them: keep them alive until it has
            else:
                moved = {k: v.to(dev, non_blocking=True) for k, v in host.items()}
        else:
            moved = host
        return cls(max_len=int(lengths.max()) if len(docs) else 0, n_docs=len(docs), **moved)

    def to_padded(self, packed: Any) -> tuple[Any, Any]:
        """``(T, ...)`` -> ``((N, max_len, ...), mask (N, max_len))`` with zeros where there is no token."""
        import torch

        out = packed.new_zeros((self.n_docs * self.max_len,) + tuple(packed.shape[1:]))
        flat = self.doc_of_token * self.max_len + self.positions
        out[flat] = packed
        mask = torch.zeros(self.n_docs * self.max_len, dtype=torch.long, device=packed.device)
        mask[flat] = 1
        return out.view((self.n_docs, self.max_len) + tuple(packed.shape[1:])), mask.view(self.n_docs, self.max_len)

    def pool(self, hidden: Any, mode: str) -> Any:
        """Document vectors (N, hidden) in float32 from packed token vectors."""
        import torch

        h = hidden.float()
        if mode == "cls":
            return h[self.cu_seqlens[:-1].long()]
        if mode == "max":
            out = h.new_full((self.n_docs, h.shape[1]), float("-inf"))
            return out.scatter_reduce(0, self.doc_of_token.unsqueeze(1).expand_as(h), h, reduce="amax")
        out = torch.zeros((self.n_docs, h.shape[1]), dtype=h.dtype, device=h.device)
        out.index_add_(0, self.doc_of_token, h)
        return out / self.lengths.clamp(min=1).unsqueeze(1).to(h.dtype)


class PackedBert:
    """The forward pass of a loaded ``BertModel``'s weights over a :class:`PackedBatch`.

    ``attention`` is one of :data:`ATTENTION_MODES`; ``auto`` takes ``varlen`` where
    :func:`varlen_available`, else ``padded``. The query, key and value projections of each layer
    are fused into one matrix product."""

    def __init__(self, model: Any, attention: str = "auto", compile: bool = False):
        import torch

        why = supports(model)
        if why:
            raise ValueError(f"packed batches need a BERT encoder: {why}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r}; valid: {', '.join(ATTENTION_MODES)}")
        p = next(model.parameters())
        if attention == "auto":
            attention = "varlen" if varlen_available(p.device, p.dtype) else "padded"
        elif attention == "varlen" and not varlen_available(p.device, p.dtype):
            raise ValueError("attention='varlen' needs torch.nn.attention.varlen on CUDA in bf16/fp16")
        self.attention = attention
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.emb = model.embeddings
        self.layers = []
        with torch.no_grad():
            for layer in model.encoder.layer:
                s = layer.attention.self
                w = torch.cat([s.query.weight, s.key.weight, s.value.weight], 0).contiguous()
                b = torch.cat([s.query.bias, s.key.bias, s.value.bias], 0).contiguous()
                self.layers.append((w, b, layer))
        self.compiled = None
        if compile:
            self.compiled = self._compile(model)

    def _compile(self, model: Any):
        """``torch.compile`` of one layer over varlen attention (its elementwise work fused), with
        each layer's weights as arguments so that one compiled graph serves every layer; None where
        it does not apply (padded attention, an activation it does not know)."""
        import torch

        approx = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}.get(model.config.hidden_act)
        if self.attention != "varlen" or approx is None:
            return None
        self.eps = float(model.config.layer_norm_eps)
        self.approx = approx
        self.params = []
        for w, b, layer in self.layers:
            ao, it, out = layer.attention.output, layer.intermediate, layer.output
            self.params.append((w, b, ao.dense.weight, ao.dense.bias, ao.LayerNorm.weight, ao.LayerNorm.bias,
                                it.dense.weight, it.dense.bias, out.dense.weight, out.dense.bias,
                                out.LayerNorm.weight, out.LayerNorm.bias))
        return torch.compile(_varlen_layer, dynamic=True)

    def _attend(self, q: Any, k: Any, v: Any, batch: PackedBatch) -> Any:
        import torch

        if self.attention == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, batch.max_len)
        qp, mask = batch.to_padded(q)
        kp, _ = batch.to_padded(k)
        vp, _ = batch.to_padded(v)
        keep = mask.bool()[:, None, None, :]  # (N, 1, 1, W): attend to real keys only
        out = torch.nn.functional.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=keep)
        out = out.transpose(1, 2).reshape(batch.n_docs * batch.max_len, self.heads, self.head_dim)
        return out[batch.doc_of_token * batch.max_len + batch.positions]

    def __call__(self, batch: PackedBatch, hidden_layers: Optional[Sequence[int]] = None) -> tuple[Any, list]:
        """Last hidden state ``(T, hidden)`` and, for ``hidden_layers`` (indices into Hugging
        Face's ``hidden_states``: 0 = embeddings, i = after layer i, negatives count from the end),
        those packed hidden states."""
        import torch
        import torch.nn.functional as F

        e = self.emb
        x = (e.word_embeddings(batch.ids) + e.position_embeddings(batch.positions)
             + e.token_type_embeddings.weight[0])
        x = e.LayerNorm(x)
        n_layers = len(self.layers)
        want = {i % (n_layers + 1) for i in hidden_layers} if hidden_layers else set()
        kept = {0: x} if 0 in want else {}
        T = x.shape[0]
        with torch.inference_mode():
            for i, (w, b, layer) in enumerate(self.layers, start=1):
                if self.compiled is not None:
                    x = self.compiled(x, self.params[i - 1], batch.cu_seqlens, batch.max_len, self.heads,
                                      self.head_dim, self.eps, self.approx)
                    if i in want:
                        kept[i] = x
                    continue
                qkv = F.linear(x, w, b).view(T, 3, self.heads, self.head_dim)
                a = self._attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], batch).reshape(T, -1)
                ao = layer.attention.output
                x = ao.LayerNorm(ao.dense(a) + x)
                h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
                x = layer.output.LayerNorm(layer.output.dense(h) + x)
                if i in want:
                    kept[i] = x
        return x, [kept[i % (n_layers + 1)] for i in hidden_layers] if hidden_layers else []


def _varlen_layer(x: Any, p: tuple, cu_seqlens: Any, max_len: int, heads: int, head_dim: int, eps: float,
                  approx: str) -> Any:
    """One BERT layer over packed tokens with varlen attention, as a pure function of its weights
    ``p`` (fused QKV, attention output, its LayerNorm, intermediate, output, its LayerNorm)."""
    import torch.nn.functional as F
    from torch.nn.attention.varlen import varlen_attn

    T, H = x.shape
    qkv = F.linear(x, p[0], p[1]).view(T, 3, heads, head_dim)
    a = varlen_attn(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_len, max_len).reshape(T, H)
    x = F.layer_norm(F.linear(a, p[2], p[3]) + x, (H,), p[4], p[5], eps)
    h = F.gelu(F.linear(x, p[6], p[7]), approximate=approx)
    return F.layer_norm(F.linear(h, p[8], p[9]) + x, (H,), p[10], p[11], eps)


def packed_batches(lengths: np.ndarray, batch_tokens: int, max_docs: int) -> list[np.ndarray]:
    """Split documents (indices into ``lengths``) into batches, longest first, whose *real* token
    count stays under ``batch_tokens`` (no padding to count); a single over-long document still
    gets a batch of its own, and no batch has more than ``max_docs`` documents."""
    order = np.argsort(-lengths, kind="stable")
    batches, start, used = [], 0, 0
    for i, j in enumerate(order):
        L = int(lengths[j])
        if i > start and (used + L > batch_tokens or i - start >= max_docs):
            batches.append(order[start:i])
            start, used = i, 0
        used += L
    if start < len(order):
        batches.append(order[start:])
    return batches
