"""A tokenizer call in flat arrays (:class:`FlatTokenized`): every document's token ids, word ids and
offsets one after another, with the numpy helpers that cut and join them; what
:meth:`~embedjob.stages.encode.tokenizer.Tokenizer.encode_flat` returns and
:mod:`~embedjob.stages.encode.chunk_cache` gathers. numpy and pyarrow only."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any, Optional

import numpy as np
import pyarrow as pa


def ragged_gather(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without the loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, lengths) + np.arange(total, dtype=np.int64)


@dataclass
class FlatTokenized:
    """A tokenizer call in flat arrays (what :meth:`~embedjob.stages.encode.tokenizer.Tokenizer.encode_flat` returns): the documents'
    tokens one after another, as ``Tokenized`` holds them per document."""

    ids: np.ndarray  # (tokens,) int32: every document's ids, special tokens included, cut at the cap
    counts: np.ndarray  # (n,) int64 tokens kept per document
    doc_tokens: np.ndarray  # (n,) int64, as Tokenized.doc_tokens
    word_ids: Optional[np.ndarray] = None  # (tokens,) int64 word index in the document, -1: no word
    offsets: Optional[np.ndarray] = None  # (tokens, 2) int64 character offsets in the text, (0, 0): none
    # (tokens,) int32: the token's word's normalised form, an index into ``norms``; -1: no word, -2: not
    # known (tokenised directly): encode_flat(normalize=...) through the chunk cache, else None
    word_norms: Optional[np.ndarray] = None
    norms: Optional[pa.Array] = None  # the normalised forms (strings) ``word_norms`` index

    @property
    def starts(self) -> np.ndarray:
        """Each document's first token in the flat arrays."""
        return np.cumsum(self.counts) - self.counts

    def list_array(self, rows: int, at: np.ndarray) -> pa.ListArray:
        """``list<int32>`` of ``rows`` rows: document ``k``'s ids at row ``at[k]``, the other rows empty."""
        lens = np.zeros(rows, dtype=np.int64)
        lens[np.asarray(at, dtype=np.int64)] = self.counts
        off = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(lens, out=off[1:])
        return pa.ListArray.from_arrays(pa.array(off), pa.array(self.ids, type=pa.int32()))

    @classmethod
    def from_tokenized(cls, t: Any) -> "FlatTokenized":
        """From a :class:`~embedjob.stages.encode.tokenizer.Tokenized` (lists per document)."""
        counts = np.fromiter(map(len, t.ids), dtype=np.int64, count=len(t.ids))
        ids = np.fromiter(chain.from_iterable(t.ids), dtype=np.int32, count=int(counts.sum()))
        wid = offs = None
        if t.word_ids is not None:
            wid = np.fromiter((-1 if w is None else w for w in chain.from_iterable(t.word_ids)), dtype=np.int64,
                              count=len(ids))
            offs = np.fromiter(chain.from_iterable(chain.from_iterable(t.offsets)), dtype=np.int64,
                               count=2 * len(ids)).reshape(-1, 2)
        return cls(ids, counts, np.asarray(t.doc_tokens, dtype=np.int64), wid, offs)

    @classmethod
    def merge(cls, parts: list[tuple[np.ndarray, "FlatTokenized"]], n: int) -> "FlatTokenized":
        """``n`` documents from parts of them: ``(positions, tokens)`` pairs."""
        parts = [(np.asarray(at, dtype=np.int64), f) for at, f in parts if len(at)]
        if len(parts) == 1:
            return parts[0][1]
        counts = np.zeros(n, dtype=np.int64)
        doc_tokens = np.zeros(n, dtype=np.int64)
        starts = np.zeros(n, dtype=np.int64)
        base = 0
        for at, f in parts:
            counts[at], doc_tokens[at], starts[at] = f.counts, f.doc_tokens, f.starts + base
            base += len(f.ids)
        take = ragged_gather(starts, counts)
        words = parts[0][1].word_ids is not None
        norms = next((f.norms for _, f in parts if f.norms is not None), None)
        codes = None
        if norms is not None:  # the parts tokenised directly: their words' forms not known (-2)
            codes = np.concatenate([f.word_norms if f.word_norms is not None
                                    else np.where(f.word_ids < 0, -1, -2).astype(np.int32) for _, f in parts])[take]
        return cls(np.concatenate([f.ids for _, f in parts])[take], counts, doc_tokens,
                   np.concatenate([f.word_ids for _, f in parts])[take] if words else None,
                   np.concatenate([f.offsets for _, f in parts])[take] if words else None, codes, norms)


def word_starts(word_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Where a word starts (-2), continues (-1 is kept for no word) in flat word ids: what two
    tokenisations must agree on, whatever numbers they give their words."""
    w = np.asarray(word_ids, dtype=np.int64)
    out = np.where(w < 0, -1, 0)
    if len(w):
        first = np.zeros(len(w), dtype=bool)
        first[(np.cumsum(counts) - counts)[counts > 0]] = True
        new = np.ones(len(w), dtype=bool)
        new[1:] = w[1:] != w[:-1]
        out[(new | first) & (w >= 0)] = -2
    return out
