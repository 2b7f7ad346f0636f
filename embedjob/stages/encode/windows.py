"""Long documents as overlapping windows: every token reaches the encoder (``encode.long_documents:
windows``), each window at most the model's max length, with its own [CLS] and [SEP].

A document's token ids (``[CLS] t1 .. tn [SEP]``, as the tokenizer gives them) are cut into windows
of ``max_length - 2`` content tokens that overlap by ``overlap`` tokens; the last window is aligned
to the document's end, so it has full context too. At most ``max_windows`` windows are kept (a
1M-character document stays bounded); such a document is *capped* and the encoder counts it. Every
token position is *owned* by exactly one window, the one whose centre is nearest (most context on
both sides), so that per-token consumers (the static word vectors) count each occurrence once.

Numpy only (no torch at import), like the rest of the encoder core. Example::

    plan = plan_windows(np.array([600, 10]), max_length=256, overlap=32, max_windows=64)
    plan.doc        # [0, 0, 0, 1]: three windows for the first document, one for the second
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

LONG_DOCUMENT_MODES = ("windows", "truncate")
# Tokens after which a sentence starts (those a tokenizer's vocabulary has).
SENTENCE_END_TOKENS = (".", "!", "?", "。", "！", "？", "…", "؟", "।")
WINDOW_POOLING_MODES = ("mean", "first", "max")


def max_document_tokens(max_length: int, overlap: int, max_windows: int, head: int = 1, tail: int = 1) -> int:
    """Token ids (special tokens included) that ``max_windows`` windows hold: the tokenizer's cap."""
    k = window_content(max_length, head, tail)
    return head + tail + k + (max_windows - 1) * (k - overlap)


def window_content(max_length: int, head: int = 1, tail: int = 1) -> int:
    """Content tokens of one window: ``head`` leading tokens ([CLS], and the prompt's when there is
    one) and ``tail`` closing ones ([SEP], </s>, EOS; 0 for some decoders) repeat in every window."""
    return max(1, max_length - head - tail)


def check_window_settings(max_length: int, overlap: int, max_windows: int, pooling: str, head: int = 1,
                          tail: int = 1) -> None:
    """ValueError naming the setting when the window settings cannot work together."""
    if pooling not in WINDOW_POOLING_MODES:
        raise ValueError(f"encode.window_pooling={pooling!r}; valid: {', '.join(WINDOW_POOLING_MODES)}")
    if max_windows < 1:
        raise ValueError(f"encode.max_windows={max_windows}: at least 1")
    if not 0 <= overlap <= window_content(max_length, head, tail) // 2:
        raise ValueError(f"encode.window_overlap={overlap}: between 0 and half a window "
                         f"({window_content(max_length, head, tail) // 2} tokens at max_length {max_length})")


@dataclass
class WindowPlan:
    """The windows of a call's documents, in document order. Positions index a document's token
    ids (0 = its [CLS]). Window ``w`` covers positions ``start[w] <= p < end[w]``: a *whole* window is
    the document's ids as they are (column ``c`` = position ``c``); any other holds ``ids[start:end]``
    between a [CLS] and a [SEP] of its own (column ``c`` = position ``start - 1 + c``). It owns the
    positions ``own_lo[w] <= p < own_hi[w]``. ``head`` and ``tail``: the leading and closing tokens
    every cut window repeats (1 and 1 for [CLS] .. [SEP]; the prompt adds to ``head``)."""

    doc: np.ndarray  # (W,) int64 document of each window
    start: np.ndarray  # (W,) int64
    end: np.ndarray  # (W,) int64
    whole: np.ndarray  # (W,) bool
    own_lo: np.ndarray  # (W,) int64
    own_hi: np.ndarray  # (W,) int64
    windows: np.ndarray  # (n,) int32 windows per document
    capped: np.ndarray  # (n,) bool: the document had more than max_windows windows (its tail dropped)
    head: int = 1
    tail: int = 1

    @property
    def single(self) -> bool:
        """Every document is one whole window (nothing to cut or combine)."""
        return bool(self.whole.all()) and len(self.doc) == len(self.windows)

    @property
    def n_tokens(self) -> np.ndarray:
        """(W,) tokens fed to the model per window, special tokens included."""
        return self.end - self.start + np.where(self.whole, 0, self.head + self.tail)

    def spans(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), 5)`` int64 for token hooks: the position of column 0 (columns map to
        positions ``offset + c``), the covered positions [start, end) and the owned ones [own_lo, own_hi)."""
        offset = np.where(self.whole[rows], 0, self.start[rows] - self.head)
        return np.stack([offset, self.start[rows], self.end[rows], self.own_lo[rows], self.own_hi[rows]], axis=1)


def sentence_starts(ids: np.ndarray, end_ids: np.ndarray, head: int = 1, tail: int = 1) -> np.ndarray:
    """Positions of a document's token ids (``[CLS] .. [SEP]``) that begin a sentence: those right
    after a sentence-ending token (``end_ids``), from ``head + 1`` to ``len - tail - 1``."""
    x = np.asarray(ids)
    if len(x) <= head + tail + 1:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.isin(x[head:len(x) - tail - 1], end_ids)) + head + 1


def snap_slack(max_length: int, overlap: int, head: int = 1, tail: int = 1) -> int:
    """How far a boundary may move back to a sentence boundary: at most the overlap (so windows
    still cover every token) and ``window - 2 * overlap`` (so ownership stays in order)."""
    k = window_content(max_length, head, tail)
    return max(0, min(overlap, k - 2 * overlap))


def _snap(s: np.ndarray, e: np.ndarray, b: np.ndarray, slack: int, k: int, last_fixed: bool) -> tuple:
    """Starts, then ends, moved back to the nearest sentence start in ``b`` within ``slack``; an end
    never moves before the next window's start, and a last window aligned to the document's end stays."""
    s = s.copy()
    n = len(s)
    movable = n - 1 if last_fixed else n
    for i in range(1, movable):
        j = int(np.searchsorted(b, s[i], side="right")) - 1
        if j >= 0 and b[j] >= s[i] - slack and b[j] > s[i - 1]:
            s[i] = b[j]
    e = s + k
    for i in range(movable):
        lo = max(e[i] - slack, s[i] + 1, s[i + 1] if i + 1 < n else 0)
        j = int(np.searchsorted(b, e[i], side="right")) - 1
        if j >= 0 and b[j] >= lo:
            e[i] = b[j]
    return s, e


def cut_document(L: int, k: int, stride: int, slack: int, max_windows: int, sentences: Optional[np.ndarray],
                 head: int = 1, tail: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """The windows of one document of ``L`` token ids longer than a window (``k`` content tokens
    each, ``stride`` apart, boundaries snapped to ``sentences`` within ``slack``): their starts,
    ends, owned ranges ``[lo, hi)``, and whether ``max_windows`` capped it."""
    m = 1 + -(-(L - head - tail - k) // stride)
    s = head + stride * np.arange(min(m, max_windows), dtype=np.int64)
    capped = m > max_windows
    if not capped:
        s[-1] = L - tail - k  # the last window ends with the document: full context for its tail
    e = s + k
    if sentences is not None and len(sentences):
        s, e = _snap(s, e, np.asarray(sentences), slack, k, not capped)
    centre2 = s + e  # twice the centre
    cut = (centre2[:-1] + centre2[1:] + 3) // 4  # first position nearer the next window's centre
    cut = np.maximum.accumulate(np.clip(cut, s[1:], e[:-1])) if len(cut) else cut  # inside both windows
    return s, e, np.concatenate([[0], cut]), np.concatenate([cut, [L]]), capped


def plan_windows(lengths: np.ndarray, max_length: int, overlap: int, max_windows: int,
                 sentences: Optional[Sequence[Optional[np.ndarray]]] = None, head: int = 1,
                 tail: int = 1) -> WindowPlan:
    """Windows over documents of ``lengths`` token ids each (special tokens included). ``sentences``:
    each document's sentence starts (:func:`sentence_starts`) to snap boundaries to, or None.
    ``head``/``tail``: leading and closing tokens each cut window repeats (see :class:`WindowPlan`).
    A document that fits is one whole window, planned for all of them at once; only the longer ones
    are cut one by one (tests/test_windows.py holds it equal to the per-document original)."""
    k = window_content(max_length, head, tail)
    stride = max(1, k - overlap)
    slack = snap_slack(max_length, overlap, head, tail)
    L_all = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = len(L_all)
    windows = np.ones(n, dtype=np.int32)
    capped = np.zeros(n, dtype=bool)
    cut_docs: dict[int, tuple[np.ndarray, ...]] = {}
    for d in np.flatnonzero(L_all > max_length).tolist():
        b = sentences[d] if sentences is not None and slack else None
        s, e, lo, hi, capped[d] = cut_document(int(L_all[d]), k, stride, slack, max_windows, b, head, tail)
        cut_docs[d] = (s, e, lo, hi)
        windows[d] = len(s)
    first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(windows, out=first[1:])
    doc = np.repeat(np.arange(n, dtype=np.int64), windows)
    start = np.zeros(int(first[-1]), dtype=np.int64)
    end = L_all[doc].copy()  # a whole window: [0, L), owning all of it
    whole = np.ones(len(doc), dtype=bool)
    own_lo, own_hi = start.copy(), end.copy()
    for d, (s, e, lo, hi) in cut_docs.items():
        at = slice(int(first[d]), int(first[d + 1]))
        start[at], end[at], own_lo[at], own_hi[at] = s, e, lo, hi
        whole[at] = False
    return WindowPlan(doc, start, end, whole, own_lo, own_hi, windows, capped, head, tail)


def plan_for(settings: Any, ids: Sequence[np.ndarray], end_ids: Optional[np.ndarray] = None) -> WindowPlan:
    """The windows ``settings`` (an :class:`EncoderSettings`) cut documents' token ``ids`` into: the
    one plan both the encoder and the chunk spans use. ``end_ids``: the tokenizer's sentence-ending
    token ids (:attr:`Tokenizer.sentence_end_ids`), used with ``snap_to_sentences``."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    if settings.long_documents != "windows":
        return truncated_plan(lengths)
    sentences = None
    head, tail = getattr(settings, "head_tokens", 1), getattr(settings, "tail_tokens", 1)
    if settings.snap_to_sentences and end_ids is not None and len(end_ids):
        sentences = [sentence_starts(x, end_ids, head, tail) if len(x) > settings.max_length else None for x in ids]
    return plan_windows(lengths, settings.max_length, settings.window_overlap, settings.max_windows, sentences,
                        head, tail)


def truncated_plan(lengths: np.ndarray) -> WindowPlan:
    """One whole window per document (``encode.long_documents: truncate``: the ids are already cut)."""
    n = len(lengths)
    z = np.zeros(n, dtype=np.int64)
    L = np.asarray(lengths, dtype=np.int64)
    return WindowPlan(np.arange(n, dtype=np.int64), z, L, np.ones(n, bool), z, L, np.ones(n, np.int32),
                      np.zeros(n, bool))


def window_ids(ids: Sequence[np.ndarray], plan: WindowPlan) -> list[np.ndarray]:
    """The token ids of every window: ``[CLS] ids[start:end] [SEP]`` (the document's first
    ``plan.head`` and last ``plan.tail`` ids around the window's), or a whole document as it is."""
    if plan.single:
        return list(ids)
    out = []
    h, t = plan.head, plan.tail
    for d, s, e, whole in zip(plan.doc.tolist(), plan.start.tolist(), plan.end.tolist(), plan.whole.tolist()):
        x = ids[d]
        out.append(x if whole else np.concatenate([x[:h], x[s:e], x[len(x) - t:]]))
    return out


def combine_windows(pooled: Any, plan: WindowPlan, mode: str) -> Any:
    """Document vectors ``(n, dim)`` from window vectors ``(W, dim)`` (torch, float32): the
    token-count-weighted ``mean`` of a document's windows, its ``first`` window, or the ``max``."""
    import torch

    if plan.single:
        return pooled
    n = len(plan.windows)
    dev = pooled.device
    doc = torch.from_numpy(plan.doc).to(dev)
    if mode == "first":
        first = np.concatenate([[0], np.cumsum(plan.windows)[:-1]]).astype(np.int64)
        return pooled[torch.from_numpy(first).to(dev)]
    if mode == "max":
        out = pooled.new_full((n, pooled.shape[1]), float("-inf"))
        return out.scatter_reduce(0, doc.unsqueeze(1).expand_as(pooled), pooled, reduce="amax")
    w = torch.from_numpy(plan.n_tokens.astype(np.float32)).to(dev)
    out = torch.zeros((n, pooled.shape[1]), dtype=pooled.dtype, device=dev)
    out.index_add_(0, doc, pooled * w.unsqueeze(1))
    total = torch.zeros(n, dtype=pooled.dtype, device=dev).index_add_(0, doc, w)
    return out / total.clamp(min=1e-9).unsqueeze(1)


def chunk_char_spans(offsets: list[tuple[int, int]], plan: WindowPlan, d: int) -> list[int]:
    """``[start_char, end_char, ...]`` of document ``d``'s windows from its tokens' character
    ``offsets`` (the tokenizer's offset mapping; special tokens are ``(0, 0)``), so that
    ``text[start_char:end_char]`` is the window's text."""
    out: list[int] = []
    for w in np.flatnonzero(plan.doc == d).tolist():
        a, b = int(plan.start[w]), int(plan.end[w])
        real = [offsets[p] for p in range(a, min(b, len(offsets))) if offsets[p][1] > offsets[p][0]]
        out.extend([real[0][0], real[-1][1]] if real else [0, 0])
    return out
