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


@dataclass
class _Encoding:
    """A slow tokenizer's output for one text, shaped like the Rust ``tokenizers.Encoding``."""

    ids: list[int]
    word_ids: Optional[list[Optional[int]]]
    offsets: Optional[list[tuple[int, int]]]


class Tokenizer:
    """The model's fast tokenizer: texts -> token id arrays (special tokens included), at most
    ``max_tokens`` per document (default ``max_length``: truncation; more for windows).

    Memory stays bounded whatever the texts: they are tokenised in calls of at most ``call_chars``
    characters, and a text longer than ``piece_chars`` in whitespace-cut pieces whose tokens are kept only up to the cap
    (with windows the rest is only counted, so ``doc_tokens`` is the whole document's count)."""

    def __init__(self, model_path: str, max_length: int, max_tokens: Optional[int] = None,
                 call_chars: int = CALL_CHARS, piece_chars: int = PIECE_CHARS, *, prompt: str = "",
                 do_lower_case: bool = False, tokenizer_kwargs: Optional[dict] = None, trust_remote_code: bool = False):
        self.tok = load_tokenizer(model_path, do_lower_case, tokenizer_kwargs, trust_remote_code)
        self.prompt = prompt or ""
        self.special_head, self.tail = special_layout(self.tok)
        # sentence-transformers' prompt_length: the prompt's tokens with the leading special ones
        self.prompt_length = prompt_length(self.tok, self.prompt) if self.prompt else 0
        self.head = self.prompt_length if self.prompt else self.special_head
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

    @classmethod
    def from_settings(cls, settings: Any) -> "Tokenizer":
        """The tokenizer an :class:`~embedjob.stages.encode.settings.EncoderSettings` describes (cap,
        prompt, lower-casing and tokenizer arguments of the model's Transformer module)."""
        return cls(settings.model_path, settings.max_length, settings.max_document_tokens(),
                   prompt=settings.prompt, do_lower_case=settings.do_lower_case,
                   tokenizer_kwargs=settings.tokenizer_kwargs, trust_remote_code=settings.trust_remote_code)

    def _call(self, texts: list[str], special: bool, words: bool) -> list:
        """The Rust tokenizer's encodings of ``texts``: what ``self.tok(texts, ...)`` computes
        (transformers sets the same truncation state, then calls ``encode_batch``), without its
        per-token conversion into Python dicts and lists that nothing here reads."""
        from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

        trunc = special and not self.whole_documents
        if special and self.prompt:  # the prompt is tokenised with the text, as sentence-transformers does
            texts = [self.prompt + t for t in texts]
        tok = self.tok
        if not getattr(tok, "is_fast", False):  # a slow tokenizer: transformers' own call
            enc = tok(texts, truncation=trunc, max_length=self.max_length if trunc else None,
                      add_special_tokens=special, return_attention_mask=False, return_token_type_ids=False,
                      return_offsets_mapping=words)
            return [_Encoding(enc["input_ids"][j], enc.word_ids(j) if words else None,
                              enc["offset_mapping"][j] if words else None) for j in range(len(texts))]
        kw = dict(padding_strategy=PaddingStrategy.DO_NOT_PAD,
                  truncation_strategy=TruncationStrategy.LONGEST_FIRST if trunc else TruncationStrategy.DO_NOT_TRUNCATE,
                  max_length=self.max_length if trunc else None, stride=0, pad_to_multiple_of=None)
        try:
            tok.set_truncation_and_padding(**kw, padding_side=None)
        except TypeError:  # transformers before padding_side (a bare GPU host's older install)
            tok.set_truncation_and_padding(**kw)
        backend = tok.backend_tokenizer
        split = bool(getattr(tok, "split_special_tokens", False))
        if getattr(backend, "encode_special_tokens", split) != split:
            backend.encode_special_tokens = split
        if not words and hasattr(backend, "encode_batch_fast"):
            # ids only: the Rust tokenizer skips its character offsets (tokenizers >= 0.21), about 15%
            # of its time, with the same ids (tests/test_feed.py); offsets only when words are asked
            return backend.encode_batch_fast(texts, add_special_tokens=special)
        return backend.encode_batch(texts, add_special_tokens=special)

    def _encode_group(self, texts: list[str], group: list[int], out: Tokenized, words: bool) -> None:
        encs = self._call([texts[k] for k in group], True, words)
        cap = self.max_tokens
        for j, k in enumerate(group):
            e = encs[j]
            ids = e.ids
            out.doc_tokens[k] = len(ids)
            wid = e.word_ids if words else None
            offs = e.offsets if words else None
            if words and self.prompt:
                wid, offs = self._strip_prompt(wid, offs)
            t = self.tail
            if len(ids) > cap:  # keep the head and the closing [SEP]
                ids = ids[:cap - t] + ids[len(ids) - t:]
                if words:
                    wid, offs = wid[:cap - t] + [None] * t, offs[:cap - t] + [(0, 0)] * t
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
            enc = self._call([text[a:b]], first, words)[0]
            ids = enc.ids
            piece_wids = enc.word_ids if words else None
            piece_offs = enc.offsets if words else None
            if first and words and self.prompt:
                piece_wids, piece_offs = self._strip_prompt(piece_wids, piece_offs)
            if first:  # [CLS] ... [SEP]: the closing tokens go back on at the end
                ids, sep = ids[:len(ids) - self.tail], ids[len(ids) - self.tail:]
                total = self.tail
            total += len(ids)
            room = self.max_tokens - self.tail - len(head)
            if room > 0:
                head.extend(ids[:room])
                if words:  # word ids and offsets shifted to the whole text (a = 0 for [CLS]'s piece)
                    keep = min(room, len(ids))
                    wids.extend(w if w is None else w + word_base for w in piece_wids[:keep])
                    offs.extend((s + a, e + a) for s, e in piece_offs[:keep])
            if words:
                word_base += max((w for w in piece_wids if w is not None), default=-1) + 1
            if not self.whole_documents and len(head) >= self.max_tokens - self.tail:
                break  # truncation: the rest of the text is never read
        out.ids[k] = head + sep
        out.doc_tokens[k] = total if self.whole_documents else len(head) + self.tail
        if words:
            out.word_ids[k] = wids + [None] * self.tail  # type: ignore[index]
            out.offsets[k] = offs + [(0, 0)] * self.tail  # type: ignore[index]

    def _strip_prompt(self, wids: list, offs: list) -> tuple[list, list]:
        """Word ids and offsets of a text tokenised after the prompt, as if without it: the prompt's
        tokens count as special ones (no word, offsets (0, 0)), the text's offsets index the text."""
        n = len(self.prompt)
        w2, o2 = [], []
        for w, (s, e) in zip(wids, offs):
            if w is None or e <= n:
                w2.append(None)
                o2.append((0, 0))
            else:
                w2.append(w)
                o2.append((max(s - n, 0), e - n))
        return w2, o2

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode(texts).ids]


def load_tokenizer(model_path: str, do_lower_case: bool = False, kwargs: Optional[dict] = None,
                   trust_remote_code: bool = False) -> Any:
    """The model's fast tokenizer, with the Transformer module's tokenizer arguments, lower-casing
    added to its normaliser as sentence-transformers adds it (``do_lower_case``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, use_fast=True, trust_remote_code=trust_remote_code,
                                        **(kwargs or {}))
    if do_lower_case and getattr(tok, "is_fast", False):
        from tokenizers.normalizers import Lowercase, Sequence

        norm = tok.backend_tokenizer.normalizer
        has = isinstance(norm, Lowercase) or (isinstance(norm, Sequence) and any(isinstance(n, Lowercase) for n in norm))
        if not has:
            rest = list(norm) if isinstance(norm, Sequence) else [norm] if norm is not None else []
            tok.backend_tokenizer.normalizer = Sequence([Lowercase()] + rest)
    return tok


def special_layout(tok: Any) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text's own (1 and 1 for
    ``[CLS] .. [SEP]`` and ``<s> .. </s>``, 0 and 1 for a decoder closing with EOS...)."""
    probe = "hello world. this is a test"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe)["input_ids"]
    for head in range(len(full) - len(plain) + 1):
        if full[head:head + len(plain)] == plain:
            return head, len(full) - head - len(plain)
    raise ValueError("the tokenizer's special tokens do not wrap a text's own tokens (probe "
                     f"{probe!r}: {full} vs {plain})")


def prompt_length(tok: Any, prompt: str) -> int:
    """Tokens of ``prompt`` alone, leading special tokens included and a closing special one
    excluded: what sentence-transformers leaves out of pooling with ``include_prompt: false``."""
    ids = tok(prompt)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in set(tok.all_special_ids) else 0)


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
