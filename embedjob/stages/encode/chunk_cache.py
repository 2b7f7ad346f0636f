"""Tokenise a batch as its chunks, each distinct chunk once per process: the same token ids, word
ids and offsets as the model's fast tokenizer gives, at a fraction of its CPU per token.

A text is cut into chunks at bytes where the tokenizer always has a word boundary: ASCII spaces,
tabs, newlines and carriage returns for every tokenizer whose pre-tokenizer removes whitespace, and
also around each ASCII punctuation mark when the pre-tokenizer isolates punctuation (BERT's). No
normaliser this module accepts removes or merges across those characters, and the model tokenises
each pre-token alone, so a text's tokens are its chunks' tokens one after another, with the special
tokens around them (:func:`chunk_mode` lists what is accepted, and why). Corpora repeat their chunks
(Zipf), so the Rust tokenizer runs on the few chunks not seen before and numpy gathers the rest
(``embedjob bench feed`` prints the share of new chunks).

The cut, the distinct chunks and the gather are Arrow and numpy over the batch's UTF-8 bytes;
Python runs once per distinct chunk of a batch (a dict look-up) and once per new chunk. The cache
holds at most ``max_entries`` chunks (more only while one batch has more distinct chunks) and starts
again when a batch's new chunks would overfill it.

Texts with an added token's content (``[MASK]``, a user's added words) are not cut: the tokenizer
matches those before it normalises, across any boundary, so the caller tokenises them directly
(:meth:`ChunkCache.needs_direct`). :class:`~embedjob.stages.encode.tokenizer.Tokenizer` also checks
its first documents against the direct call and stops using the cache, with a warning, on any
difference. Example::

    cache = ChunkCache(backend_tokenizer, chunk_mode(backend_tokenizer), words=True)
    ids, counts, word_ids, offsets, _ = cache.encode(pa.array(["a cat.", "a dog"], pa.large_string()))
    # ids: [1037, 4937, 1012, 1037, 3899]; counts: [3, 2] (no special tokens)

With ``normalize`` (a function of a list of words, e.g. the static vectors' gensim chain word by word)
the cache also keeps each chunk's words' normalised forms, so a batch's words are normalised by a
gather too (``encode``'s fifth array: per token, its word's code into :attr:`ChunkCache.norms`).
"""

from __future__ import annotations

import json
from itertools import repeat
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.stages.encode.flat import ragged_gather

ASCII_WHITESPACE = b" \t\n\r"
ASCII_PUNCTUATION = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"

# Normalisers that map characters one by one (or decompose them) and never remove, merge across or
# create out of nothing an ASCII space or punctuation mark: BERT's (control characters are removed,
# whitespace becomes a space, CJK characters get spaces around them, accents are stripped after NFD),
# lower-casing, canonical or compatibility decomposition, accent stripping.
_CHAR_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFD", "NFKD", "StripAccents"}
# Composition can merge a punctuation mark with the mark after it ("=" + U+0338 is "≠"), never a
# space: with these only whitespace cuts.
_COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
# Pre-tokenizers that split at (and drop) every whitespace character; BertPreTokenizer also isolates
# every punctuation character.
_WHITESPACE_PRE_TOKENIZERS = {"Whitespace", "WhitespaceSplit"}
# The model tokenises each pre-token alone (BPE only without dropout, which is random).
_MODELS = {"WordPiece", "BPE", "WordLevel", "Unigram"}

DEFAULT_MAX_ENTRIES = 1 << 19
# With words, new chunks are tokenised joined by spaces, up to this many characters to a string (the
# Rust tokenizer slows down on very long strings), in one encode_batch call.
_JOIN = 1 << 13


def chunk_mode(backend: Any) -> Optional[str]:
    """How texts can be cut for ``backend`` (a ``tokenizers.Tokenizer``): ``"punct"`` (whitespace and
    ASCII punctuation), ``"space"`` (whitespace only), or None (not at all: the cache is not used)."""
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - a tokenizer that cannot describe itself is tokenised directly
        return None
    model = spec.get("model") or {}
    if model.get("type") not in _MODELS or model.get("dropout") not in (None, 0, 0.0):
        return None
    kinds = _steps(spec.get("normalizer"))
    if kinds is None or not kinds <= _CHAR_NORMALIZERS | _COMPOSING_NORMALIZERS:
        return None
    pre = _steps(spec.get("pre_tokenizer"))
    if not pre or not pre <= _WHITESPACE_PRE_TOKENIZERS | {"BertPreTokenizer"}:
        return None
    if any(a.get("normalized") for a in spec.get("added_tokens") or []) and kinds & {"NFKD", "NFKC"}:
        return None  # a compatibility form could spell an added token out of other characters
    if "BertPreTokenizer" in pre and not kinds & _COMPOSING_NORMALIZERS:
        return "punct"
    return "space"


def ends_at_cut(text: str, mode: str) -> bool:
    """Whether ``text`` (a prompt put before every text) ends with a character the ``mode`` cuts at, so
    that the prompt's tokens and the text's are tokenised apart."""
    end = text[-1:].encode()
    return bool(end) and (end in ASCII_WHITESPACE or (mode == "punct" and end in ASCII_PUNCTUATION))


def _steps(node: Optional[dict]) -> Optional[set[str]]:
    """The step types of a normaliser or pre-tokenizer (a Sequence's members); empty for none."""
    if node is None:
        return set()
    if node.get("type") == "Sequence":
        out: set[str] = set()
        for sub in node.get("normalizers") or node.get("pretokenizers") or []:
            got = _steps(sub)
            if got is None:
                return None
            out |= got
        return out
    return {node.get("type")} if node.get("type") else None


def _byte_table(chars: bytes) -> np.ndarray:
    t = np.zeros(256, dtype=bool)
    t[np.frombuffer(chars, dtype=np.uint8)] = True
    return t


class ChunkCache:
    """Distinct chunks' tokens, word ids (within the chunk) and character offsets (within the chunk),
    in flat arrays; see the module docstring."""

    def __init__(self, backend: Any, mode: str, max_entries: int = DEFAULT_MAX_ENTRIES, *, words: bool = True):
        from tokenizers import Tokenizer as RustTokenizer

        if mode not in ("punct", "space"):
            raise ValueError(f"chunk mode {mode!r}: 'punct' or 'space'")
        # an own copy: the caller's sets truncation and padding per call; this one never truncates
        self.backend = RustTokenizer.from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        if hasattr(backend, "encode_special_tokens"):
            self.backend.encode_special_tokens = backend.encode_special_tokens
        self.mode = mode
        self.with_words = words  # word ids and offsets kept (the static vectors' alignment), or ids alone
        self.sep = _byte_table(ASCII_WHITESPACE)
        self.iso = _byte_table(ASCII_PUNCTUATION if mode == "punct" else b"")
        self.max_entries = max_entries
        self.added = sorted({a["content"] for a in json.loads(self.backend.to_str()).get("added_tokens") or []
                             if a.get("content")})
        self.stats = {"chunks": 0, "new_chunks": 0, "resets": 0}
        self.new_share = 0.0  # of the last batch's chunks, the share not in the cache
        self._normalize: Any = None  # the function the words' codes were made with (None: no codes yet)
        self._reset()

    def _reset(self) -> None:
        self.slots: dict[str, int] = {}
        self.n = 0
        self.start = np.zeros(1 << 12, dtype=np.int64)  # per slot: first token in the flat arrays
        self.length = np.zeros(1 << 12, dtype=np.int64)  # per slot: tokens
        self.words = np.zeros(1 << 12, dtype=np.int64)  # per slot: words (pre-tokens with tokens)
        self.nv = 0
        self.ids = np.zeros(1 << 14, dtype=np.int32)
        cap = 1 << 14 if self.with_words else 0  # ids alone: no word ids or offsets kept (12 bytes a token)
        self.wid = np.zeros(cap, dtype=np.int32)  # word index within the chunk
        self.offs = np.zeros((cap, 2), dtype=np.int32)  # characters within the chunk
        # per slot with words: the chunk's text, its first word in the per-word codes
        self.texts: list[str] = []
        self.wbase = np.zeros(1 << 12 if self.with_words else 0, dtype=np.int64)
        self.nw = 0
        self._reset_norms()

    def _reset_norms(self) -> None:
        """Forget the words' normalised forms (a new cache, or another ``normalize``)."""
        self.wcode = np.full(max(self.nw, 1 << 12) if self.with_words else 0, -2, dtype=np.int32)  # -2: not yet
        self.norm_index: dict[str, int] = {}
        self._norms: list[str] = []
        self._norms_arrow: Optional[pa.Array] = None

    @property
    def norms(self) -> pa.Array:
        """The distinct normalised forms (a string array) the codes of :meth:`encode` index."""
        if self._norms_arrow is None or len(self._norms_arrow) != len(self._norms):
            self._norms_arrow = pa.array(self._norms, type=pa.string())
        return self._norms_arrow

    def needs_direct(self, texts: pa.Array) -> np.ndarray:
        """Texts holding an added token's content, in any case: tokenised directly, not cut."""
        out = np.zeros(len(texts), dtype=bool)
        for content in self.added:
            out |= pc.match_substring(texts, content, ignore_case=True).to_numpy(zero_copy_only=False)
        return out

    def encode(self, texts: pa.Array, words: bool = True, normalize: Any = None
               ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        """``texts`` (a large_string array without nulls) -> (token ids, tokens per text, word id per
        token, character offsets per token (n, 2), word code per token): every text's own tokens, no
        special tokens, word ids counted from 0 in each text, offsets into the text (both None unless
        ``words``). With ``normalize`` (``list[str] -> list[str]``, the same function from call to
        call) the fifth array holds each token's word's normalised form as an index into
        :attr:`norms` (None without ``normalize``)."""
        if words and not self.with_words:
            raise ValueError("this ChunkCache keeps ids alone (words=False): word ids and offsets were not kept")
        if normalize is not None and not words:
            raise ValueError("normalised words need words=True")
        n_docs = len(texts)
        chunks, doc_of, char_start = self._cut(texts)
        self.stats["chunks"] += len(chunks)
        enc = pc.dictionary_encode(chunks)
        distinct = enc.dictionary.to_pylist()
        slot = np.fromiter(map(self.slots.get, distinct, repeat(-1)), dtype=np.int64, count=len(distinct))
        new = np.flatnonzero(slot < 0)
        if len(new) and self.n + len(new) > self.max_entries:  # full: start again with this batch's chunks
            self.stats["resets"] += 1
            self._reset()
            slot[:] = -1
            new = np.arange(len(distinct))
        codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        # the share of this batch's chunks that were new: near 1 where chunks never repeat (hashes,
        # text without spaces), where the cache costs more than it saves (Tokenizer then bypasses it)
        self.new_share = float(np.bincount(codes, minlength=len(distinct))[new].sum()) / max(len(codes), 1)
        if len(new):
            slot[new] = self._add([distinct[i] for i in new.tolist()])
        occ = slot[codes]
        lengths = self.length[occ]
        take = ragged_gather(self.start[occ], lengths)
        ids = self.ids[take]
        counts = np.bincount(doc_of, weights=lengths, minlength=n_docs).astype(np.int64)
        if not words:
            return ids, counts, None, None, None
        # words of the chunks before each one in its text, so that word ids count through the text
        nw = self.words[occ]
        before = np.cumsum(nw) - nw
        per_doc = np.bincount(doc_of, minlength=n_docs)
        base = before - before[(np.cumsum(per_doc) - per_doc)[doc_of]]  # chunks come text by text
        local = self.wid[take]
        word_ids = local.astype(np.int64) + np.repeat(base, lengths)
        offsets = self.offs[take].astype(np.int64) + np.repeat(char_start, lengths)[:, None]
        codes = None
        if normalize is not None:
            self._normalized(slot, normalize)
            codes = self.wcode[np.repeat(self.wbase[occ], lengths) + local]
        return ids, counts, word_ids, offsets, codes

    def _normalized(self, slots: np.ndarray, normalize: Any) -> None:
        """Make the codes of the words of ``slots`` (a batch's distinct chunks) with ``normalize``: once
        per chunk's word for as long as the cache holds it (Python per new word: its surface)."""
        if normalize is not self._normalize:
            self._normalize = normalize
            self._reset_norms()
        todo = slots[self.words[slots] > 0]
        todo = todo[self.wcode[self.wbase[todo]] == -2]
        if not len(todo):
            return
        tok = ragged_gather(self.start[todo], self.length[todo])
        wid = self.wid[tok].astype(np.int64)
        slot_of = np.repeat(todo, self.length[todo])
        new = np.ones(len(tok), dtype=bool)  # a word starts where the slot or its word id changes
        new[1:] = (slot_of[1:] != slot_of[:-1]) | (wid[1:] != wid[:-1])
        first = np.flatnonzero(new)
        last = np.append(first[1:] - 1, len(tok) - 1)
        texts = self.texts
        surfaces = [texts[c][a:b] for c, a, b in zip(slot_of[first].tolist(), self.offs[tok[first], 0].tolist(),
                                                     self.offs[tok[last], 1].tolist())]
        index, norms = self.norm_index, self._norms
        codes = []
        for v in normalize(surfaces):
            k = index.get(v)
            if k is None:
                k = index[v] = len(norms)
                norms.append(v)
            codes.append(k)
        self.wcode[self.wbase[slot_of[first]] + wid[first]] = codes

    def _cut(self, texts: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        """The chunks of ``texts`` (a string array over the texts' own bytes), each chunk's text, and
        its first character's offset in that text."""
        offs = np.frombuffer(texts.buffers()[1], dtype=np.int64, count=len(texts) + 1, offset=texts.offset * 8)
        b0, b1 = int(offs[0]), int(offs[-1])
        data = np.frombuffer(texts.buffers()[2], dtype=np.uint8)[b0:b1] if b1 > b0 else np.zeros(0, np.uint8)
        sep, iso = self.sep[data], self.iso[data]
        keep = ~sep
        doc_start = offs[:-1] - b0
        doc_start = doc_start[(doc_start < len(data)) & (np.diff(offs) > 0)]
        doc_end = offs[1:][np.diff(offs) > 0] - 1 - b0
        first = np.zeros(len(data), dtype=bool)  # a chunk starts after a cut or at a text's start
        if len(data):
            first[1:] = sep[:-1] | iso[:-1] | iso[1:]
            first[0] = True
        first[doc_start] = True
        first &= keep
        last = np.zeros(len(data), dtype=bool)
        if len(data):
            last[:-1] = sep[1:] | iso[1:] | iso[:-1]
            last[-1] = True
        last[doc_end] = True
        last &= keep
        starts = np.flatnonzero(first)
        ends = np.flatnonzero(last) + 1
        doc_of = np.searchsorted(offs - b0, starts, side="right") - 1
        # character offsets: UTF-8 bytes that start a character, counted from the text's first byte
        lead = (data & 0xC0) != 0x80
        if bool(lead.all()):
            char_start = starts - (offs[doc_of] - b0)
        else:
            before = np.zeros(len(data) + 1, dtype=np.int64)
            np.cumsum(lead, out=before[1:])
            char_start = before[starts] - before[offs[doc_of] - b0]
        bounds = np.empty(2 * len(starts), dtype=np.int64)
        bounds[0::2], bounds[1::2] = starts + b0, ends + b0
        if not len(bounds):
            return pa.array([], type=pa.large_string()), doc_of, char_start
        spans = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), texts.buffers()[2])
        return spans.take(pa.array(np.arange(0, len(bounds), 2))), doc_of, char_start

    def _add(self, chunks: list[str]) -> np.ndarray:
        """Tokenise new ``chunks`` (joined by spaces, up to ``_JOIN`` characters to a string: one string
        per chunk costs more per chunk than the offsets that tell the tokens apart) and store them;
        their slots."""
        self.stats["new_chunks"] += len(chunks)
        groups, g, size = [], [], 0
        for c in chunks:
            if g and size + len(c) > _JOIN:
                groups.append(g)
                g, size = [], 0
            g.append(c)
            size += len(c) + 1
        groups.append(g)
        encs = self.backend.encode_batch([" ".join(g) for g in groups], add_special_tokens=False)
        ids_l, wid_l, offs_l, cnt_l, nw_l = [], [], [], [], []
        for g, e in zip(groups, encs):
            ids = np.array(e.ids, dtype=np.int32)
            offs = np.array(e.offsets, dtype=np.int64).reshape(-1, 2)
            wid = np.array(e.word_ids, dtype=np.int64)
            clen = np.fromiter(map(len, g), dtype=np.int64, count=len(g))
            cstart = np.cumsum(clen + 1) - (clen + 1)
            owner = np.searchsorted(cstart, offs[:, 0], side="right") - 1 if len(ids) else np.zeros(0, np.int64)
            cnt = np.bincount(owner, minlength=len(g))
            first = np.cumsum(cnt) - cnt
            has = cnt > 0
            w0 = np.zeros(len(g), dtype=np.int64)
            w0[has] = wid[first[has]]
            nw = np.zeros(len(g), dtype=np.int64)
            nw[has] = wid[first[has] + cnt[has] - 1] - w0[has] + 1
            ids_l.append(ids)
            wid_l.append(wid - np.repeat(w0, cnt))
            offs_l.append(offs - np.repeat(cstart, cnt)[:, None])
            cnt_l.append(cnt)
            nw_l.append(nw)
        words = self.with_words
        return self._store(chunks, np.concatenate(ids_l), np.concatenate(cnt_l),
                           np.concatenate(wid_l) if words else None, np.concatenate(offs_l) if words else None,
                           np.concatenate(nw_l) if words else np.zeros(len(chunks), dtype=np.int64))

    def _store(self, chunks: list[str], ids: np.ndarray, cnt: np.ndarray, wid: Optional[np.ndarray],
               offs: Optional[np.ndarray], nw: np.ndarray) -> np.ndarray:
        """Append new chunks' tokens (``cnt`` each) to the flat arrays; their slots."""
        base, need = self.n, self.n + len(chunks)
        if need > len(self.start):
            size = max(need, 2 * len(self.start))
            self.start, self.length, self.words = (np.resize(a, size) for a in (self.start, self.length, self.words))
            if self.with_words:
                self.wbase = np.resize(self.wbase, size)
        if self.nv + len(ids) > len(self.ids):
            size = max(self.nv + len(ids), 2 * len(self.ids))
            self.ids = np.resize(self.ids, size)
            if self.with_words:
                self.wid, self.offs = np.resize(self.wid, size), np.resize(self.offs, (size, 2))
        end = self.nv + len(ids)
        self.ids[self.nv:end] = ids
        if wid is not None:
            self.wid[self.nv:end] = wid
            self.offs[self.nv:end] = offs
        self.start[base:need] = self.nv + np.cumsum(cnt) - cnt
        self.length[base:need] = cnt
        self.words[base:need] = nw
        if self.with_words:
            self.texts.extend(chunks)
            w_end = self.nw + int(nw.sum())
            if w_end > len(self.wcode):
                grown = np.full(max(w_end, 2 * len(self.wcode)), -2, dtype=np.int32)
                grown[:self.nw] = self.wcode[:self.nw]
                self.wcode = grown
            self.wbase[base:need] = self.nw + np.cumsum(nw) - nw
            self.nw = w_end
        self.nv, self.n = end, need
        self.slots.update(zip(chunks, range(base, need)))
        return np.arange(base, need, dtype=np.int64)
