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
import pyarrow.compute as pc
from gensim.parsing import preprocess_string

from embedjob.schema import DOC_TOKENS, INPUT_IDS, TOKENS, WORD_IDS, WORDS

_NORM_CACHE: dict[int, tuple[Any, dict[str, str], Callable[[list[str]], list[str]]]] = {}
_NORM_CACHE_MAX = 500_000
# Joins new words for one run of the filter chain (normalize_words): a word no filter changes, that
# no filter joins with its neighbours and that is no stop word, in the case the chain gives back.
_SENTINEL = "zqxjkv"
_JOIN_WORDS = 4096


def _entry(filters) -> tuple[Any, dict[str, str], Callable[[list[str]], list[str]]]:
    """``filters``' cache of normalised words, and its :func:`normalize_words` as one function (the
    same object from call to call: the chunk cache keeps the words' forms per function)."""
    entry = _NORM_CACHE.get(id(filters))
    if entry is None or entry[0] is not filters:
        # keeps `filters` alive, so the id stays its own
        entry = _NORM_CACHE[id(filters)] = (filters, {}, lambda words: normalize_words(words, filters))
    return entry


def normalize_word(word: str, filters: list[Callable[[str], str]]) -> str:
    """The vocabulary word for one surface word: the gensim filter chain (a list of gensim filters, or
    the preprocess stage's equal ``FilterChain``) applied to the word alone; "" when the chain drops it (stop word, too short, number) or splits it into several tokens."""
    cache = _entry(filters)[1]
    got = cache.get(word)
    if got is None:
        toks = filters(word) if callable(filters) else preprocess_string(word, filters)
        got = toks[0] if len(toks) == 1 else ""
        if len(cache) >= _NORM_CACHE_MAX:
            cache.clear()
        cache[word] = got
    return got


def _norms_cached(filters) -> dict[str, str]:
    """The words :func:`normalize_word` has done for ``filters`` (empty before its first call)."""
    entry = _NORM_CACHE.get(id(filters))
    return entry[1] if entry is not None and entry[0] is filters else {}


def normalizer(filters) -> Callable[[list[str]], list[str]]:
    """:func:`normalize_words` for ``filters`` as a function of the words alone, the same object for
    the same ``filters`` (what :meth:`~embedjob.stages.encode.tokenizer.Tokenizer.encode_flat` takes)."""
    return _entry(filters)[2]


def normalize_words(words: list[str], filters) -> list[str]:
    """:func:`normalize_word` of each word: the cached ones looked up in one pass (no Python call
    per word), the new ones by one run of the chain over thousands of them joined by a sentinel word
    (:func:`_normalize_joined`), word by word where that cannot be told apart."""
    cache = _norms_cached(filters)
    out = list(map(cache.get, words))
    todo = [k for k, got in enumerate(out) if got is None]
    if len(todo) > 1:
        for a in range(0, len(todo), _JOIN_WORDS):
            part = todo[a:a + _JOIN_WORDS]
            got = _normalize_joined([words[k] for k in part], filters)
            if got is None:
                continue
            cache = _entry(filters)[1]
            if len(cache) + len(part) >= _NORM_CACHE_MAX:
                cache.clear()
            for k, v in zip(part, got):
                out[k] = cache[words[k]] = v
    for k in todo:
        if out[k] is None:
            out[k] = normalize_word(words[k], filters)
    return out


def _normalize_joined(words: list[str], filters) -> Optional[list[str]]:
    """The chain over ``words`` joined by a sentinel word, cut back at the sentinels: each word's
    tokens as :func:`normalize_word` has them; None when that cannot be sure (the chain changes the
    sentinel, a word holds it or a tag bracket, which ``strip_tags`` matches across words)."""
    run = filters if callable(filters) else (lambda text: preprocess_string(text, filters))
    mark = run(_SENTINEL)
    if len(mark) != 1:
        return None
    mark = mark[0]
    for w in words:
        if "<" in w or ">" in w or _SENTINEL in w.lower() or mark in w.lower():
            return None
    out: list[str] = []
    toks: list[str] = []
    for t in run(f" {_SENTINEL} ".join(words)):
        if t == mark:
            out.append(toks[0] if len(toks) == 1 else "")
            toks = []
        else:
            toks.append(t)
    out.append(toks[0] if len(toks) == 1 else "")
    return out if len(out) == len(words) else None


def align_words(table: pa.Table, texts: list[Optional[str]], empty: np.ndarray, tok, filters) -> pa.Table:
    """Add the columns that map every BERT token to a vocabulary word occurrence.

    ``_word_ids`` (list<int32>, one per token of ``_input_ids``): index into the row's ``_words``,
    -1 for special tokens and for words that are not counted; ``_words`` (list<string>): one
    vocabulary word per counted word occurrence. ``_input_ids`` is (re)written from the same
    tokenisation so the two always agree (same truncation or cap), and ``_doc_tokens`` (the whole
    document's token count) when whole documents are tokenised (``encode.long_documents: windows``).
    A word cut by truncation or the cap is not counted (its pieces are incomplete)."""
    n = len(texts)
    todo = np.flatnonzero(~np.asarray(empty, dtype=bool))
    todo_texts = [texts[i] for i in todo.tolist()]
    whole = tok.whole_documents
    enc = tok.encode_flat(todo_texts, words=True, normalize=normalizer(filters))
    n_tok = np.zeros(n, dtype=np.int32)
    n_tok[todo] = enc.doc_tokens
    aligned = None
    if len(todo):
        truncated = enc.doc_tokens > enc.counts if whole else enc.counts >= tok.max_length
        doc_words = None
        if TOKENS in table.column_names:
            doc_words = table.column(TOKENS).combine_chunks().take(pa.array(todo))
        aligned = align_batch(todo_texts, enc.word_ids, enc.offsets, enc.counts, truncated, doc_words, filters,
                              enc.word_norms, enc.norms)
    wid_arr, words_arr = _scatter(aligned, todo, n)
    table = _with_alignment(table, enc.list_array(n, todo), wid_arr, words_arr)
    return table.append_column(DOC_TOKENS, pa.array(n_tok, type=pa.int32())) if whole else table


def align_batch(texts: list[str], word_ids: np.ndarray, offsets: np.ndarray, counts: np.ndarray,
                truncated: np.ndarray, doc_words: Optional[pa.ListArray], filters,
                word_norms: Optional[np.ndarray] = None, norms: Optional[pa.Array] = None) -> tuple[pa.Array, pa.Array]:
    """:func:`_align_doc` over a batch of documents at once: ``(_word_ids, _words)`` as list arrays,
    one row per text, from the tokenizer's flat arrays (word id per token, -1: none; character
    offsets per token; tokens per text). Numpy over the tokens and words, Arrow for the words'
    surface strings, their distinct values and the membership in each document's gensim tokens
    (``doc_words``; None: no check); Python only once per distinct surface string (the filter
    chain, cached). ``word_norms`` and ``norms`` (the chunk cache's, :meth:`Tokenizer.encode_flat`
    with ``normalize``): the words' normalised forms already known, as indices into ``norms`` (-2:
    not known), so only the others' surfaces are cut. Documents whose word ids do not ascend (no
    BERT tokenizer's) take the per-document path."""
    d = len(texts)
    counts = np.asarray(counts, dtype=np.int64)
    t_off = np.zeros(d + 1, dtype=np.int64)
    np.cumsum(counts, out=t_off[1:])
    w = np.asarray(word_ids, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = np.flatnonzero(w >= 0)
    wr = w[real]
    dr = np.repeat(np.arange(d), counts)[real]
    same_doc = dr[1:] == dr[:-1]
    if bool((same_doc & (wr[1:] < wr[:-1])).any()):
        per_doc = [(w[a:b], offs[a:b]) for a, b in zip(t_off[:-1].tolist(), t_off[1:].tolist())]
        return _align_each(texts, [[None if x < 0 else x for x in pw.tolist()] for pw, _ in per_doc],
                           [po.tolist() for _, po in per_doc], truncated, doc_words, filters)
    new = np.ones(len(wr), dtype=bool)
    new[1:] = ~same_doc | (wr[1:] != wr[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(wr) - 1).astype(np.int64)
    word_doc = dr[first]
    n_words = len(first)
    is_last = np.ones(n_words, dtype=bool)
    is_last[:-1] = word_doc[1:] != word_doc[:-1]
    skip = is_last & np.asarray(truncated, dtype=bool)[word_doc]  # a word cut at the cap is not counted
    if word_norms is not None and norms is not None:
        idx = np.asarray(word_norms)[real[first]].astype(np.int64)
        unknown = np.flatnonzero(idx < 0)
        norm = norms
    else:
        idx, unknown, norm = np.zeros(n_words, dtype=np.int64), np.arange(n_words), pa.array([], type=pa.string())
    if len(unknown):  # the words' surface strings, normalised once per distinct one
        at = real[first[unknown]]
        enc = pc.dictionary_encode(_surfaces(texts, word_doc[unknown], offs[at, 0], offs[real[last[unknown]], 1]))
        idx[unknown] = len(norm) + enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        norm = pa.concat_arrays([norm, pa.array(normalize_words(enc.dictionary.to_pylist(), filters),
                                                type=pa.string())])
    values = norm.take(pa.array(idx))
    counted = pc.not_equal(values, "").to_numpy(zero_copy_only=False) & ~skip if n_words else np.zeros(0, bool)
    if doc_words is not None and n_words:
        if norm is norms and len(unknown) == 0:  # the cache's forms, each distinct: compared by code
            at = np.flatnonzero(counted)
            counted[at] = _codes_in_doc_words(idx[at], norm, word_doc[at], doc_words)
        else:
            counted &= _in_doc_words(values, word_doc, doc_words)
    return _alignment_arrays(counted, values, word_doc, real, new, d, t_off)


def _surfaces(texts: list[str], word_doc: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    """Each word's surface string ``texts[doc][start:end]``, cut from the batch's joined UTF-8 bytes
    (character offsets turned into byte offsets) without a Python string per word. Each text is
    joined only up to its last word's end, so a huge document cut at the cap costs its head only."""
    keep = np.zeros(len(texts), dtype=np.int64)
    if len(ends):
        np.maximum.at(keep, word_doc, ends)
    joined = "".join([t[:k] for t, k in zip(texts, keep.tolist())])
    data = joined.encode("utf-8")
    base = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(keep, out=base[1:])
    gs, ge = base[word_doc] + starts, base[word_doc] + ends
    if len(data) != len(joined):  # not ASCII: character -> byte offsets
        cp = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        pos = np.zeros(len(cp) + 1, dtype=np.int64)
        np.cumsum(1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000), out=pos[1:])
        gs, ge = pos[gs], pos[ge]
    bounds = np.empty(2 * len(gs), dtype=np.int64)
    bounds[0::2], bounds[1::2] = gs, ge
    if not len(bounds):
        return pa.array([], type=pa.string())
    if not bool((np.diff(bounds) >= 0).all()):  # words out of text order (no BERT tokenizer's): Python slices
        return pa.array([texts[k][a:b] for k, a, b in zip(word_doc.tolist(), starts.tolist(), ends.tolist())],
                        type=pa.string())
    spans = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), pa.py_buffer(data))
    return spans.take(pa.array(np.arange(0, len(bounds), 2))).cast(pa.string())


def _in_doc_words(values: pa.Array, word_doc: np.ndarray, doc_words: pa.ListArray) -> np.ndarray:
    """Whether each word's vocabulary string is among its document's gensim tokens."""
    flat = doc_words.flatten()
    lens = pc.list_value_length(doc_words).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    tok_doc = np.repeat(np.arange(len(lens)), lens)
    codes = pc.dictionary_encode(pa.concat_arrays([values, flat.cast(pa.string())]))
    c = codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    k = max(len(codes.dictionary), 1)
    # Arrow's hash set (np.isin sorts both sides: 8x slower here)
    return pc.is_in(pa.array(word_doc * k + c[:len(values)]),
                    value_set=pa.array(tok_doc * k + c[len(values):])).to_numpy(zero_copy_only=False)


def _codes_in_doc_words(codes: np.ndarray, norms: pa.Array, word_doc: np.ndarray, doc_words: pa.ListArray) -> np.ndarray:
    """:func:`_in_doc_words` for words given as codes into ``norms`` (distinct strings): only the
    documents' tokens are hashed as strings, against the forms these words use."""
    used = pc.dictionary_encode(pa.array(codes, type=pa.int64()))  # the codes used, numbered densely
    forms = norms.take(used.dictionary)
    lens = pc.list_value_length(doc_words).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    tok_doc = np.repeat(np.arange(len(lens)), lens)
    tok = pc.index_in(doc_words.flatten().cast(pa.string()), value_set=forms).fill_null(-1)
    tok = tok.to_numpy(zero_copy_only=False).astype(np.int64)
    found = tok >= 0
    k = max(len(forms), 1)
    word_keys = word_doc * k + used.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return pc.is_in(pa.array(word_keys), value_set=pa.array(tok_doc[found] * k + tok[found])).to_numpy(
        zero_copy_only=False)


def _alignment_arrays(counted: np.ndarray, values: pa.Array, word_doc: np.ndarray, real: np.ndarray,
                      new: np.ndarray, d: int, t_off: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """The list arrays of :func:`align_batch` from its per-word decisions."""
    per_doc = np.bincount(word_doc[counted], minlength=d)
    w_off = np.zeros(d + 1, dtype=np.int64)
    np.cumsum(per_doc, out=w_off[1:])
    local = np.cumsum(counted) - 1 - w_off[word_doc]
    local[~counted] = -1
    wid = np.full(int(t_off[-1]), -1, dtype=np.int32)
    wid[real] = local[np.cumsum(new) - 1]
    words = values.filter(pa.array(counted))
    return (pa.ListArray.from_arrays(pa.array(t_off.astype(np.int32)), pa.array(wid, type=pa.int32())),
            pa.ListArray.from_arrays(pa.array(w_off.astype(np.int32)), words))


def _align_each(texts, word_ids, offsets, truncated, doc_words, filters) -> tuple[pa.Array, pa.Array]:
    """:func:`align_batch` document by document (:func:`_align_doc`)."""
    allowed = doc_words.to_pylist() if doc_words is not None else None
    wid_col, words_col = [], []
    for k, text in enumerate(texts):
        wid, words = _align_doc(text, word_ids[k], offsets[k], bool(truncated[k]),
                                set(allowed[k] or []) if allowed is not None else None, filters)
        wid_col.append(wid)
        words_col.append(words)
    lengths = np.fromiter(map(len, wid_col), dtype=np.int64, count=len(wid_col))
    off = np.zeros(len(wid_col) + 1, dtype=np.int32)
    np.cumsum(lengths, out=off[1:])
    flat = np.concatenate(wid_col) if wid_col else np.zeros(0, np.int32)
    return (pa.ListArray.from_arrays(pa.array(off), pa.array(flat, type=pa.int32())),
            pa.array(words_col, type=pa.list_(pa.string())))


def _scatter(aligned: Optional[tuple[pa.Array, pa.Array]], todo: np.ndarray, n: int) -> tuple[pa.Array, pa.Array]:
    """The batch's rows from the aligned ones (``todo``): empty rows get empty lists."""
    empty_wid = pa.array([[]] * n, type=pa.list_(pa.int32()))
    empty_words = pa.array([[]] * n, type=pa.list_(pa.string()))
    if aligned is None:
        return empty_wid, empty_words
    if len(todo) == n:
        return aligned
    out = []
    for arr, typ in zip(aligned, (pa.int32(), pa.string())):
        lens = np.zeros(n, dtype=np.int64)
        lens[todo] = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        off = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lens, out=off[1:])
        out.append(pa.ListArray.from_arrays(pa.array(off), arr.flatten().cast(typ)))
    return out[0], out[1]


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
    cache = _norms_cached(filters)
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


def _with_alignment(table: pa.Table, ids_arr: pa.Array, wid_arr: pa.Array, words_arr: pa.Array) -> pa.Table:
    """``table`` with ``_input_ids`` set (replaced when present) and ``_word_ids``, ``_words`` appended."""
    if INPUT_IDS in table.column_names:
        table = table.set_column(table.column_names.index(INPUT_IDS), INPUT_IDS, ids_arr)
    else:
        table = table.append_column(INPUT_IDS, ids_arr)
    table = table.append_column(WORD_IDS, wid_arr)
    return table.append_column(WORDS, words_arr)
