"""The model's fast tokenizer for the encoder: texts -> token ids (special tokens included), cut at
the cap the encode settings give (``max_length`` when truncating, ``max_windows`` windows' worth
otherwise), with each document's whole token count, and word ids and character offsets when the
static word vectors or the chunk spans need them.

Memory stays bounded whatever the texts: they are tokenised in calls of at most ``CALL_CHARS``
characters, and a longer text in whitespace-cut pieces (:func:`piece_spans`) that tokenise exactly
as the whole text would. Numpy and transformers only, like the rest of the encoder core. Example::

    tok = Tokenizer(model_path, max_length=256, max_tokens=14242)
    t = tok.encode(["a cat", "a dog"])   # t.ids: [[101, 1037, 4937, 102], ...]; t.doc_tokens: [4, 4]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional, Sequence

import numpy as np

from embedjob.stages.encode.windows import SENTENCE_END_TOKENS


@dataclass
class Tokenized:
    """A tokenizer call: token ids per document (cut to the tokenizer's cap, ending with [SEP]),
    each document's whole token count, and (when asked) word ids and character offsets per token."""

    ids: list[list[int]]
    doc_tokens: np.ndarray  # (n,) int64 tokens of the whole document (special tokens included)
    word_ids: Optional[list[list[Optional[int]]]] = None
    offsets: Optional[list[list[tuple[int, int]]]] = None

    def capped(self, k: int) -> bool:
        """True when document ``k`` lost tokens to the cap."""
        return int(self.doc_tokens[k]) > len(self.ids[k])


# A fast tokenizer holds 130-220 MiB per million characters while it works (ids, offsets, tokens,
# word ids of every token), whatever is cut afterwards. So texts are tokenised in calls of at most
# CALL_CHARS characters, and a text longer than PIECE_CHARS in pieces of about that size, with the
# freed heap handed back between pieces: a 64-million-character document peaks like a
# 2-million-character one (tests/test_windows.py). Smaller calls cost speed (1<<18 was 4-6% slower).
CALL_CHARS = 1 << 20
PIECE_CHARS = 1 << 18
# How far past a piece's nominal end the cut may move to find whitespace.
CUT_SLACK = 4096
_CUT = re.compile(r"[^ \t\n\r][ \t\n\r]")  # not \s: BERT drops \x1c-\x1f, \x0b, \x0c rather than split there


def piece_spans(text: str, piece_chars: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``text``, each about ``piece_chars`` long, cut just before
    a run of spaces, tabs or newlines (``"a| b"``) so that no word, and no BERT pre-token, spans two pieces: each
    piece then tokenises as it does inside the whole text. A stretch of ``CUT_SLACK`` characters
    with no whitespace is cut where it is (a >4k-character "word" is [UNK] either way)."""
    spans, a, n = [], 0, len(text)
    while n - a > piece_chars:
        m = _CUT.search(text, a + piece_chars - 1, a + piece_chars + CUT_SLACK)
        b = m.start() + 1 if m else a + piece_chars
        spans.append((a, b))
        a = b
    spans.append((a, n))
    return spans


class Tokenizer:
    """The model's fast tokenizer: texts -> token id arrays (special tokens included), at most
    ``max_tokens`` per document (default ``max_length``: truncation; more for windows).

    Memory stays bounded whatever the texts: they are tokenised in calls of at most ``call_chars``
    characters, and a text longer than ``piece_chars`` in whitespace-cut pieces whose tokens are kept only up to the cap
    (with windows the rest is only counted, so ``doc_tokens`` is the whole document's count)."""

    def __init__(self, model_path: str, max_length: int, max_tokens: Optional[int] = None,
                 call_chars: int = CALL_CHARS, piece_chars: int = PIECE_CHARS):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path, use_fast=True)
        self.max_length = max_length
        self.max_tokens = max(max_tokens or max_length, max_length)
        self.call_chars = call_chars
        self.piece_chars = min(piece_chars, call_chars)
        if self.whole_documents:
            # whole documents are tokenised on purpose: no "longer than the maximum" warning
            self.tok.model_max_length = 1 << 40

    @property
    def whole_documents(self) -> bool:
        """Documents are read whole (windows): tokens past the cap are counted; else truncated."""
        return self.max_tokens > self.max_length

    @cached_property
    def sentence_end_ids(self) -> np.ndarray:
        """Ids of the vocabulary's sentence-ending tokens (``.``, ``!``, ``?``...), for snapping windows."""
        vocab = self.tok.get_vocab()
        return np.array(sorted({vocab[t] for t in SENTENCE_END_TOKENS if t in vocab}), dtype=np.int64)

    def encode(self, texts: Sequence[str], *, words: bool = False) -> Tokenized:
        """Tokenise ``texts``; ``words`` adds word ids and offsets (the static vectors' alignment)."""
        texts = list(texts)
        out = Tokenized([None] * len(texts), np.zeros(len(texts), dtype=np.int64),  # type: ignore[list-item]
                        [None] * len(texts) if words else None,  # type: ignore[list-item]
                        [None] * len(texts) if words else None)  # type: ignore[list-item]
        group: list[int] = []
        chars = 0
        for k, t in enumerate(texts):
            if len(t) > self.piece_chars:
                self._encode_long(t, k, out, words)
                continue
            if group and chars + len(t) > self.call_chars:
                self._encode_group(texts, group, out, words)
                group, chars = [], 0
            group.append(k)
            chars += len(t)
        if group:
            self._encode_group(texts, group, out, words)
        return out

    def _call(self, texts: list[str], special: bool, words: bool):
        trunc = special and not self.whole_documents
        return self.tok(texts, truncation=trunc, max_length=self.max_length if trunc else None,
                        add_special_tokens=special, return_attention_mask=False, return_token_type_ids=False,
                        return_offsets_mapping=words)

    def _encode_group(self, texts: list[str], group: list[int], out: Tokenized, words: bool) -> None:
        enc = self._call([texts[k] for k in group], True, words)
        cap = self.max_tokens
        for j, k in enumerate(group):
            ids = enc["input_ids"][j]
            out.doc_tokens[k] = len(ids)
            wid = enc.word_ids(j) if words else None
            offs = enc["offset_mapping"][j] if words else None
            if len(ids) > cap:  # keep the head and the closing [SEP]
                ids = ids[:cap - 1] + ids[-1:]
                if words:
                    wid, offs = wid[:cap - 1] + [None], offs[:cap - 1] + [(0, 0)]
            out.ids[k] = ids
            if words:
                out.word_ids[k], out.offsets[k] = wid, offs  # type: ignore[index]

    def _encode_long(self, text: str, k: int, out: Tokenized, words: bool) -> None:
        """One text longer than a call, piece by piece: the same ids, word ids and offsets as one
        call would give (pieces are cut at whitespace), holding one piece's tokens at a time."""
        head: list[int] = []
        wids: list[Optional[int]] = []
        offs: list[tuple[int, int]] = []
        total, word_base, sep = 0, 0, None
        for i, (a, b) in enumerate(piece_spans(text, self.piece_chars)):
            if i:
                release_free_memory()
            first = i == 0
            enc = self._call([text[a:b]], first, words)
            ids = enc["input_ids"][0]
            if first:  # [CLS] ... [SEP]: the closing token goes back on at the end
                ids, sep = ids[:-1], ids[-1:]
                total = 1
            total += len(ids)
            room = self.max_tokens - 1 - len(head)
            piece_wids = enc.word_ids(0) if words else None
            if room > 0:
                head.extend(ids[:room])
                if words:  # word ids and offsets shifted to the whole text (a = 0 for [CLS]'s piece)
                    keep = min(room, len(ids))
                    wids.extend(w if w is None else w + word_base for w in piece_wids[:keep])
                    offs.extend((s + a, e + a) for s, e in enc["offset_mapping"][0][:keep])
            if words:
                word_base += max((w for w in piece_wids if w is not None), default=-1) + 1
            if not self.whole_documents and len(head) >= self.max_tokens - 1:
                break  # truncation: the rest of the text is never read
        out.ids[k] = head + sep
        out.doc_tokens[k] = total if self.whole_documents else len(head) + 1
        if words:
            out.word_ids[k] = wids + [None]  # type: ignore[index]
            out.offsets[k] = offs + [(0, 0)]  # type: ignore[index]

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode(texts).ids]


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the variable-size
    buffers of many batches or tokenizer calls do not pile up in the allocator's free lists."""
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
