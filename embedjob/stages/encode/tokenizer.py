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

import logging
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.stages.encode.chunk_cache import ChunkCache, chunk_mode, ends_at_cut
from embedjob.stages.encode.flat import FlatTokenized, ragged_gather, word_starts
from embedjob.stages.encode.windows import SENTENCE_END_TOKENS

logger = logging.getLogger(__name__)


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


# Where chunks do not repeat (hashes, text without spaces), tokenising them costs more than the direct
# call: after COLD_BATCHES calls in a row with more than COLD_SHARE of their chunks new, the next
# BYPASS_CALLS calls are tokenised directly, then the cache is tried again.
COLD_SHARE = 0.5
COLD_BATCHES = 3
BYPASS_CALLS = 16

# The first documents each Tokenizer cuts into chunks are checked against the direct call
# (ids, counts, offsets and words): on any difference the cache is dropped, with a warning.
VERIFY_DOCS = 256

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
        self.head_ids, self.tail_ids = special_ids(self.tok)
        self.special_head, self.tail = len(self.head_ids), len(self.tail_ids)
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
        self._chunk_mode: Any = None  # chunk_mode() on first use; False: texts are not cut
        self._caches: dict[bool, ChunkCache] = {}  # with words (word ids, offsets) or ids alone
        self._verify_left = VERIFY_DOCS
        self._cold = 0  # calls in a row whose chunks were mostly new
        self._bypass = 0  # calls left to tokenise directly

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

    def encode_flat(self, texts: Sequence[str], *, words: bool = False, normalize: Any = None) -> FlatTokenized:
        """:meth:`encode` in flat arrays, the texts cut into chunks whose tokens are cached
        (:mod:`~embedjob.stages.encode.chunk_cache`) where the tokenizer allows it: the same ids,
        counts, word ids and offsets, about a third of the CPU. Texts holding an added token's
        content, texts longer than a piece, and every text of a tokenizer that cannot be cut are
        tokenised directly. ``normalize`` (with ``words``; ``list[str] -> list[str]``, the same
        function from call to call): the cached chunks' words' normalised forms too
        (``word_norms``, ``norms``; -2 for the words of texts tokenised directly)."""
        texts = list(texts)
        cache = self.chunk_cache(words) if texts else None
        if cache is None or self._bypass > 0:
            self._bypass = max(self._bypass - 1, 0) if texts else self._bypass
            return FlatTokenized.from_tokenized(self.encode(texts, words=words))
        arr = pa.array(texts, type=pa.large_string())
        direct = cache.needs_direct(arr) | (pc.utf8_length(arr).to_numpy(zero_copy_only=False) > self.piece_chars)
        cut, rest = np.flatnonzero(~direct), np.flatnonzero(direct)
        parts = []
        if len(rest):
            parts.append((rest, FlatTokenized.from_tokenized(self.encode([texts[i] for i in rest.tolist()], words=words))))
        if len(cut):
            got = self._wrap(*cache.encode(arr if not len(rest) else arr.take(pa.array(cut)), words, normalize),
                             words)
            if normalize is not None:
                got.norms = cache.norms
            if self._verify_left > 0 and not self._verified([texts[i] for i in cut.tolist()], got, words):
                return FlatTokenized.from_tokenized(self.encode(texts, words=words))
            parts.append((cut, got))
            self._cold = self._cold + 1 if cache.new_share > COLD_SHARE else 0
            if self._cold >= COLD_BATCHES:
                if not self.__dict__.get("_told_cold"):
                    self._told_cold = True
                    logger.info("encode: %.0f%% of the last batch's text chunks were new (text that does not repeat "
                                "its chunks): tokenising directly, the chunk cache tried again every %d calls",
                                100 * cache.new_share, BYPASS_CALLS)
                self._cold, self._bypass = 0, BYPASS_CALLS
        return FlatTokenized.merge(parts, len(texts))

    def chunk_cache(self, words: bool = False) -> Optional[ChunkCache]:
        """The chunk cache for this tokenizer (one keeping word ids and offsets, one ids alone), or
        None where its texts cannot be cut into chunks (a slow tokenizer, a normaliser or
        pre-tokenizer :func:`chunk_mode` does not accept, truncation from the left, a prompt not
        ending at a cut, a prompt filling the cap, a cache that differed from the direct call)."""
        if self._chunk_mode is None:
            self._chunk_mode = False
            mode = chunk_mode(self.tok.backend_tokenizer) if getattr(self.tok, "is_fast", False) else None
            if not self.whole_documents and getattr(self.tok, "truncation_side", "right") != "right":
                mode = None  # truncation keeps the text's end: the direct call cuts it
            prompt_ids: list[int] = []
            if mode and self.prompt:
                if not ends_at_cut(self.prompt, mode):
                    mode = None
                prompt_ids = list(self.tok(self.prompt, add_special_tokens=False)["input_ids"])
            if mode and len(self.head_ids) + len(prompt_ids) + len(self.tail_ids) < self.max_tokens:
                self._chunk_mode = mode
                self._lead = np.array(list(self.head_ids) + prompt_ids, dtype=np.int32)
        if not self._chunk_mode:
            return None
        if words not in self._caches:
            self._caches[words] = ChunkCache(self.tok.backend_tokenizer, self._chunk_mode, words=words)
        return self._caches[words]

    def _wrap(self, ids: np.ndarray, counts: np.ndarray, wid: Optional[np.ndarray], offs: Optional[np.ndarray],
              codes: Optional[np.ndarray], words: bool) -> FlatTokenized:
        """Texts' own tokens -> the model's: the special tokens (and the prompt's) around them, cut at
        the cap as :meth:`encode` cuts (the head and the closing special tokens kept)."""
        lead, tail = self._lead, np.array(self.tail_ids, dtype=np.int32)
        h, t, n = len(lead), len(tail), len(counts)
        keep = np.minimum(counts, self.max_tokens - h - t)
        kept = h + keep + t
        whole = h + counts + t
        out_start = np.cumsum(kept) - kept
        src = ragged_gather(np.cumsum(counts) - counts, keep)
        dst = ragged_gather(out_start + h, keep)
        out = np.empty(int(kept.sum()), dtype=np.int32)
        out[dst] = ids[src]
        lead_at = (out_start[:, None] + np.arange(h)).reshape(-1)
        tail_at = ((out_start + h + keep)[:, None] + np.arange(t)).reshape(-1)
        out[lead_at], out[tail_at] = np.tile(lead, n), np.tile(tail, n)
        w = o = c = None
        if words:
            w = np.full(len(out), -1, dtype=np.int64)
            o = np.zeros((len(out), 2), dtype=np.int64)
            w[dst], o[dst] = wid[src], offs[src]
        if codes is not None:
            c = np.full(len(out), -1, dtype=np.int32)
            c[dst] = codes[src]
        return FlatTokenized(out, kept, whole if self.whole_documents else kept, w, o, c)

    def _verified(self, texts: list[str], got: FlatTokenized, words: bool) -> bool:
        """The first documents cut into chunks equal the direct call's; else the cache is dropped."""
        k = min(self._verify_left, len(texts))
        self._verify_left -= k
        ref = FlatTokenized.from_tokenized(self.encode(texts[:k], words=words))
        n = int(got.counts[:k].sum())
        same = (np.array_equal(ref.counts, got.counts[:k]) and np.array_equal(ref.doc_tokens, got.doc_tokens[:k])
                and np.array_equal(ref.ids, got.ids[:n]))
        if same and words:
            same = np.array_equal(ref.offsets, got.offsets[:n]) and np.array_equal(
                word_starts(ref.word_ids, ref.counts), word_starts(got.word_ids[:n], ref.counts))
        if not same:
            logger.warning("encode: the chunk-cached tokenisation differed from the model's tokenizer on a "
                           "document of this batch; tokenising directly from now on")
            self._chunk_mode, self._caches = False, {}
        return same

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


def special_ids(tok: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's own (``[CLS]`` and ``[SEP]``,
    ``<s>`` and ``</s>``, none and EOS for a decoder...)."""
    probe = "hello world. this is a test"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe)["input_ids"]
    for head in range(len(full) - len(plain) + 1):
        if full[head:head + len(plain)] == plain:
            return list(full[:head]), list(full[head + len(plain):])
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
