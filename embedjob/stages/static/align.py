"""Preprocessing side of the static vectors: map every BERT token to a vocabulary word occurrence.

A BERT word (the fast tokenizer's pre-tokenised word, found with ``word_ids()``) counts only when the
job's gensim filter chain, applied to the word alone, turns it into exactly one token that is among
the document's own gensim tokens. So ``Cats`` is accumulated as ``cats`` with the default chain
(``cat`` with ``stem_text`` added), stop words are skipped, and the static vectors' keys are the same strings as ``tokens/``
and the Word2Vec vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
from gensim.parsing import preprocess_string

from embedjob.schema import DOC_TOKENS, INPUT_IDS, TOKENS, WORD_IDS, WORDS

_NORM_CACHE: dict[int, tuple[Any, dict[str, str]]] = {}
_NORM_CACHE_MAX = 500_000


def normalize_word(word: str, filters: list[Callable[[str], str]]) -> str:
    """The vocabulary word for one surface word: the gensim filter chain applied to the word alone;
    "" when the chain drops it (stop word, too short, number) or splits it into several tokens."""
    entry = _NORM_CACHE.get(id(filters))
    if entry is None or entry[0] is not filters:
        entry = _NORM_CACHE[id(filters)] = (filters, {})  # keeps `filters` alive, so the id stays its own
    cache = entry[1]
    got = cache.get(word)
    if got is None:
        toks = preprocess_string(word, filters)
        got = toks[0] if len(toks) == 1 else ""
        if len(cache) >= _NORM_CACHE_MAX:
            cache.clear()
        cache[word] = got
    return got


def align_words(table: pa.Table, texts: list[Optional[str]], empty: np.ndarray, tok, filters) -> pa.Table:
    """Add the columns that map every BERT token to a vocabulary word occurrence.

    ``_word_ids`` (list<int32>, one per token of ``_input_ids``): index into the row's ``_words``,
    -1 for special tokens and for words that are not counted; ``_words`` (list<string>): one
    vocabulary word per counted word occurrence. ``_input_ids`` is (re)written from the same
    tokenisation so the two always agree (same truncation or cap), and ``_doc_tokens`` (the whole
    document's token count) when whole documents are tokenised (``encode.long_documents: windows``).
    A word cut by truncation or the cap is not counted (its pieces are incomplete)."""
    n = len(texts)
    todo = [i for i in range(n) if not empty[i]]
    ids_col: list[Any] = [[] for _ in range(n)]
    wid_col: list[Any] = [[] for _ in range(n)]
    words_col: list[list[str]] = [[] for _ in range(n)]
    n_tok = np.zeros(n, dtype=np.int32)
    whole = tok.whole_documents
    if todo:
        enc = tok.encode([texts[i] for i in todo], words=True)
        doc_tokens = table.column(TOKENS).to_pylist() if TOKENS in table.column_names else None
        for k, i in enumerate(todo):
            ids = enc.ids[k]
            allowed = set(doc_tokens[i]) if doc_tokens is not None else None
            truncated = enc.capped(k) if whole else len(ids) >= tok.max_length
            ids_col[i] = ids
            n_tok[i] = enc.doc_tokens[k]
            wid_col[i], words_col[i] = _align_doc(texts[i], enc.word_ids[k], enc.offsets[k],
                                                  truncated, allowed, filters)
    table = _with_alignment(table, ids_col, wid_col, words_col)
    return table.append_column(DOC_TOKENS, pa.array(n_tok, type=pa.int32())) if whole else table


def _align_doc(text: str, word_ids: list[Optional[int]], offsets, truncated: bool,
               allowed: Optional[set[str]], filters) -> tuple[np.ndarray, list[str]]:
    """One document: (word index per token, -1 = not counted; the counted vocabulary words).

    A word's surface string runs from its first piece's start to its last piece's end; words are
    numbered in the order of their first piece. Numpy over the tokens, Python only once per word
    (the slice and a cache look-up): :func:`align_doc_reference` is the per-token original, and
    tests/test_feed.py holds them equal."""
    n = len(word_ids)
    w = np.fromiter((-1 if x is None else x for x in word_ids), dtype=np.int64, count=n)
    out = np.full(n, -1, dtype=np.int32)
    real = np.flatnonzero(w >= 0)
    if not len(real):
        return out, []
    wr = w[real]
    if len(wr) == 1 or bool((wr[1:] >= wr[:-1]).all()):  # word ids ascend (BERT): runs, no sort
        new = np.empty(len(wr), dtype=bool)
        new[0] = True
        np.not_equal(wr[1:], wr[:-1], out=new[1:])
        first_idx = np.flatnonzero(new)
        last_idx = np.append(first_idx[1:] - 1, len(wr) - 1)
        inv = np.cumsum(new) - 1
        order = None
    else:
        uniq, first_idx, inv = np.unique(wr, return_index=True, return_inverse=True)
        _, rev = np.unique(wr[::-1], return_index=True)
        last_idx = len(wr) - 1 - rev
        order = np.argsort(first_idx, kind="stable")  # words in order of their first piece
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = offs[real[first_idx], 0]
    ends = offs[real[last_idx], 1]
    skip = int(wr[-1]) if truncated else None  # the last word may be cut: not counted
    ids = wr[first_idx]
    seq = range(len(first_idx)) if order is None else order.tolist()
    entry = _NORM_CACHE.get(id(filters))
    cache = entry[1] if entry is not None and entry[0] is filters else {}
    local = np.full(len(first_idx), -1, dtype=np.int32)
    words: list[str] = []
    s_l, e_l, id_l = starts.tolist(), ends.tolist(), ids.tolist()
    for u in seq:
        if id_l[u] == skip:
            continue
        surface = text[s_l[u]:e_l[u]]
        v = cache.get(surface)
        if v is None:
            v = normalize_word(surface, filters)
        if v and (allowed is None or v in allowed):
            local[u] = len(words)
            words.append(v)
    out[real] = local[inv]
    return out, words


def align_doc_reference(text: str, word_ids: list[Optional[int]], offsets, truncated: bool,
                        allowed: Optional[set[str]], filters) -> tuple[list[int], list[str]]:
    """The per-token original of :func:`_align_doc` (kept as the reference the tests compare with)."""
    last_word = None
    if truncated:
        last_word = next((w for w in reversed(word_ids) if w is not None), None)
    spans: dict[int, list[int]] = {}
    for w, (a, b) in zip(word_ids, offsets):
        if w is None:
            continue
        sp = spans.get(w)
        if sp is None:
            spans[w] = [a, b]
        else:
            sp[1] = b
    local: dict[int, int] = {}
    words: list[str] = []
    for w, (a, b) in spans.items():
        if w == last_word:
            continue
        v = normalize_word(text[a:b], filters)
        if v and (allowed is None or v in allowed):
            local[w] = len(words)
            words.append(v)
    return [-1 if w is None else local.get(w, -1) for w in word_ids], words


def _with_alignment(table: pa.Table, ids_col: list[Any], wid_col: list[Any],
                    words_col: list[list[str]]) -> pa.Table:
    """``table`` with ``_input_ids`` set (replaced when present) and ``_word_ids``, ``_words`` appended."""
    ids_arr = pa.array(ids_col, type=pa.list_(pa.int32()))
    lengths = np.fromiter((len(x) for x in wid_col), dtype=np.int64, count=len(wid_col))
    offsets = np.zeros(len(wid_col) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in wid_col]) if len(wid_col) else np.zeros(0, np.int32)
    wid_arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
    if INPUT_IDS in table.column_names:
        table = table.set_column(table.column_names.index(INPUT_IDS), INPUT_IDS, ids_arr)
    else:
        table = table.append_column(INPUT_IDS, ids_arr)
    table = table.append_column(WORD_IDS, wid_arr)
    return table.append_column(WORDS, pa.array(words_col, type=pa.list_(pa.string())))
