"""Encoder side of the static vectors: sum every counted word occurrence's pooled vector per (shard
row run, word) while the encoder runs, and write one staged part per run.

The encoder actors hand every model batch's hidden states to a :class:`StaticAccumulator` (a token
hook of :meth:`embedjob.stages.encode.TextEncoder.encode_ids`), so nothing runs a second BERT pass. The
contextual vector of one occurrence pools the word's word pieces (``mean`` by default; ``first``,
``last`` or ``max``) from the chosen layer(s), averaged when there are several.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.layout import STATIC_PART_SUFFIX, part_name
from embedjob.schema import ROW, SHARD, WORD_IDS, WORDS, contiguous_runs
from embedjob.stages.encode.flat import ragged_gather
from embedjob.stages.static.config import check_word_pooling, resolve_layers
from embedjob.stages.static.parts import part_table
from embedjob.storage import Storage


def _row_runs(shards: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Run index of every row, and (shard, first row, last row) of each run of consecutive rows of
    one shard — the write stage's cut (:func:`embedjob.schema.contiguous_runs`)."""
    run_of = np.empty(len(rows), dtype=np.int64)
    runs = []
    for k, (shard, r0, r1, positions) in enumerate(contiguous_runs(shards, rows)):
        run_of[positions] = k
        runs.append((shard, r0, r1))
    return run_of, runs


@dataclass
class _CallState:
    """The word-slot bookkeeping of one encoder call (a slot = one (row run, word) pair; slots are
    numbered by run, then word, so each run's part is a slice of the sums)."""

    runs: list[tuple[str, int, int]]  # (shard, first row, last row) per run
    run_bounds: np.ndarray  # (runs + 1,): run k's slots are run_bounds[k]:run_bounds[k + 1]
    slot_run: np.ndarray  # run of each slot
    slot_word: pa.Array  # word of each slot (string)
    counts: np.ndarray  # occurrences per slot
    tok_inst: np.ndarray  # per token of the kept docs (one after another): its instance, -1 = none
    tok_base: np.ndarray  # (kept docs + 1,): where each kept doc's tokens start in tok_inst
    first_tok: np.ndarray  # per instance (word occurrence): index in tok_inst of its first piece
    inst_slot: np.ndarray  # per instance: its slot
    sums: Any  # torch (slots, dim) float32 on the encoder's device
    pieces: Optional["_CallPieces"] = None  # where every occurrence's pieces are consecutive


@dataclass
class _CallPieces:
    """The pieces of one encoder call's counted occurrences, ascending (:func:`call_pieces`): each
    one's index in the kept docs' tokens, slot, and its occurrence's first piece and end."""

    q: np.ndarray
    slot: np.ndarray
    first: np.ndarray
    end: np.ndarray


def _list_parts(col: pa.ChunkedArray) -> tuple[np.ndarray, Any]:
    """(offsets, values) of a list column: row ``r`` holds ``values[offsets[r]:offsets[r + 1]]``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy()
    values = arr.values
    if pa.types.is_integer(values.type):
        values = values.to_numpy(zero_copy_only=False)
    return off - off[0], (values[int(off[0]):int(off[-1])] if len(off) else values)


def word_slots(words: pa.Array, offsets: np.ndarray, run_of: np.ndarray,
               keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """One slot per (row run, word) among the kept rows' word occurrences (row ``r`` holds
    ``words[offsets[r]:offsets[r + 1]]``), numbered in order of first occurrence: the slot of each
    kept occurrence (kept rows in order), and the run and word of each slot. Arrow's dictionary
    encoding and numpy, no Python per occurrence (nor per slot: the slots' words are an Arrow array)."""
    n_rows = len(offsets) - 1
    occ_row = np.repeat(np.arange(n_rows), np.diff(offsets))
    kept = np.flatnonzero(keep[occ_row]) if len(occ_row) else np.zeros(0, np.int64)
    if not len(kept):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), pa.array([], type=pa.string())
    enc = pc.dictionary_encode(words if len(kept) == len(words) else words.take(pa.array(kept)))
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    runs = run_of[occ_row[kept]].astype(np.int64)
    if len(runs) and runs[0] == runs[-1] and bool((runs == runs[0]).all()):  # one run: the words' codes are the slots
        return codes, np.full(len(enc.dictionary), runs[0], dtype=np.int64), enc.dictionary
    # Arrow's hash encoding numbers the distinct keys in order of first occurrence (no sort)
    keys = pc.dictionary_encode(pa.array(runs * len(enc.dictionary) + codes))
    ordered = keys.dictionary.to_numpy()
    slot_words = enc.dictionary.take(pa.array(ordered % len(enc.dictionary)))
    return keys.indices.to_numpy(zero_copy_only=False).astype(np.int64), ordered // len(enc.dictionary), slot_words


def _instances(wid_flat: np.ndarray, w_off: np.ndarray, x_off: np.ndarray,
               keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept rows' tokens one after another, each as its word occurrence (an *instance*: the
    kept rows' occurrences numbered in row order, as :func:`word_slots` numbers them; -1 = none);
    where each kept row's tokens start; and each instance's first piece (an index into the tokens)."""
    n_rows = len(w_off) - 1
    tok_row = np.repeat(np.arange(n_rows), np.diff(w_off))
    kept_tok = keep[tok_row] if len(tok_row) else np.zeros(0, bool)
    t = wid_flat[:len(tok_row)][kept_tok].astype(np.int64)
    n_inst = np.where(keep, np.diff(x_off), 0)
    inst_base = np.cumsum(n_inst) - n_inst  # first instance of each row (kept rows only)
    tok_inst = np.where(t >= 0, t + inst_base[tok_row[kept_tok]], -1)
    lens = np.diff(w_off)[keep]
    tok_base = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=tok_base[1:])
    first_tok = np.zeros(int(n_inst.sum()), dtype=np.int64)
    at = np.flatnonzero(tok_inst >= 0)
    g = tok_inst[at]
    if len(g) < 2 or bool((g[1:] >= g[:-1]).all()):  # occurrences ascend (BERT): runs, no sort
        new = np.ones(len(g), dtype=bool)
        np.not_equal(g[1:], g[:-1], out=new[1:])
        first_tok[g[new]] = at[new]
    else:
        seen, first_at = np.unique(g, return_index=True)  # positions ascend: each one's first piece
        first_tok[seen] = at[first_at]
    return tok_inst, tok_base, first_tok


def window_pieces(st: "_CallState", docs: np.ndarray, spans: np.ndarray, width: int):
    """One model batch's pieces to pool: row ``r`` is a window of kept doc ``docs[r]``
    (``spans[r]``: column 0's position, the covered positions [a, b), the owned ones [lo, hi)). An
    occurrence is taken by the window that owns its first piece, its pieces in that window pooled.

    Returns (flat positions ``r * width + column`` of the pieces, each piece's occurrence numbered
    by row then instance, each occurrence's slot, the number of occurrences), or None; numpy over all
    rows at once (the per-row loop it replaced is ``tests/test_feed.py``'s reference)."""
    col0, a, b, lo, hi = spans.T
    base = st.tok_base[docs]
    n = np.maximum(np.minimum(b, st.tok_base[docs + 1] - base) - a, 0)
    rr = np.repeat(np.arange(len(docs)), n)
    p = a[rr] + np.arange(len(rr)) - np.repeat(np.cumsum(n) - n, n)
    g = st.tok_inst[base[rr] + p]
    m = g >= 0
    rr, p, g = rr[m], p[m], g[m]
    fp = st.first_tok[g] - base[rr]
    m = (fp >= lo[rr]) & (fp < hi[rr])
    rr, p, g = rr[m], p[m], g[m]
    if not len(p):
        return None
    n_inst = max(len(st.first_tok), 1)
    key = rr * n_inst + g
    if len(key) == 1 or bool((key[1:] >= key[:-1]).all()):  # rows, positions and words ascend (BERT): runs
        new = np.ones(len(key), dtype=bool)
        np.not_equal(key[1:], key[:-1], out=new[1:])
        uniq, inst = key[new], np.cumsum(new) - 1
    else:
        uniq, inst = np.unique(key, return_inverse=True)
    return rr * width + p - col0[rr], inst.reshape(-1), st.inst_slot[uniq % n_inst], len(uniq)


def call_pieces(tok_inst: np.ndarray, first_tok: np.ndarray, inst_slot: np.ndarray,
                pooling: str) -> Optional[_CallPieces]:
    """The call's counted pieces for :func:`batch_pieces` (``first`` pooling: each occurrence's first
    piece alone), where every occurrence's pieces are consecutive (any tokenizer's words, in
    practice); None where one's are not, which :func:`window_pieces` handles."""
    q = np.flatnonzero(tok_inst >= 0)
    g = tok_inst[q]
    cnt = np.bincount(g, minlength=len(first_tok))
    first = first_tok[g]
    if len(q) and not bool((q - first < cnt[g]).all()):  # pieces elsewhere than right after the first
        return None
    keep = q == first if pooling == "first" else slice(None)
    return _CallPieces(q[keep], inst_slot[g][keep], first[keep], (first + cnt[g])[keep])


def batch_pieces(st: "_CallState", docs: np.ndarray, spans: np.ndarray, width: int, pooling: str):
    """:func:`window_pieces` and the pooling in one, for ``mean``, ``first`` and ``last`` where
    :func:`call_pieces` applies: (flat positions ``r * width + column`` of the pieces to add, each
    one's slot, each one's weight (None: 1)), or None. A window's pieces are a range of the call's
    (two binary searches per row); ``mean`` weighs each piece 1 / its occurrence's pieces in the
    window, so the slot's sum gets the occurrence's mean at once."""
    P = st.pieces
    col0, a, b, lo, hi = spans.T
    base = st.tok_base[docs]
    end = base + np.maximum(np.minimum(b, st.tok_base[docs + 1] - base), a)  # one past the window's last token
    i0 = np.searchsorted(P.q, base + a)
    n = np.searchsorted(P.q, end) - i0
    seg = ragged_gather(i0, n)
    rr = np.repeat(np.arange(len(docs)), n)
    f = P.first[seg]
    own = (f >= (base + lo)[rr]) & (f < (base + hi)[rr])  # the window owns the occurrence's first piece
    if not bool(own.all()):
        seg, rr, f = seg[own], rr[own], f[own]
    if not len(seg):
        return None
    q = P.q[seg]
    weight = None
    if pooling != "first":
        e = np.minimum(P.end[seg], end[rr])  # the occurrence's pieces in this window end here
        if pooling == "mean":
            weight = (1.0 / (e - f)).astype(np.float32)
        else:
            last = q == e - 1
            seg, rr, q = seg[last], rr[last], q[last]
    return rr * width + q - (base + col0)[rr], P.slot[seg], weight


def slots_by_run(slot_run: np.ndarray, slot_word: pa.Array, n_runs: int) -> tuple[np.ndarray, np.ndarray]:
    """The slots ordered by run, then word (Arrow's UTF-8 byte order, which is Python's string
    order, as the parts are sorted), and where each run's start in that order (``n_runs + 1``
    bounds: run k's slots are ``order[bounds[k]:bounds[k + 1]]``)."""
    rank = np.empty(len(slot_word), dtype=np.int64)
    rank[pc.sort_indices(slot_word).to_numpy()] = np.arange(len(slot_word))
    order = np.lexsort((rank, slot_run))
    return order, np.searchsorted(slot_run[order], np.arange(n_runs + 1))


class StaticAccumulator:
    """Held by an encoder actor: sums every counted word occurrence's pooled vector per (shard row
    run, word) while the encoder runs, then writes one staged part per run.

    Use per encoder call: ``hook = acc.hook_for(batch, keep)``, ``encoder.encode_ids(..., token_hook=hook)``,
    ``out = acc.attach(out)``."""

    def __init__(self, encoder, *, out_url: str, storage_options: Optional[dict[str, Any]] = None,
                 word_pooling: str = "mean", layers: Union[str, list[int]] = "last", **_ignored: Any):
        self.encoder = encoder
        self.torch = encoder.torch
        self.pooling = check_word_pooling(word_pooling)
        self.out = Storage(out_url, storage_options or {})
        # The encoder returns these hidden states to the hook (None = last_hidden_state only).
        encoder.output_hidden_layers = resolve_layers(layers, encoder.model.config.num_hidden_layers)
        self.dim = encoder.dim
        self._state: Optional[_CallState] = None
        self._buffer = None  # the sums' memory, kept from call to call (zeroed, grown when a call needs more)

    # one encoder call ----------------------------------------------------------------------------
    def hook_for(self, batch: pa.Table, keep: np.ndarray):
        """Prepare the word-slot bookkeeping of one encoder call; returns the token hook."""
        run_of, runs = _row_runs(batch.column(SHARD).to_numpy(zero_copy_only=False).astype(str),
                                 batch.column(ROW).to_numpy())
        w_off, wid_flat = _list_parts(batch.column(WORD_IDS))
        x_off, words_flat = _list_parts(batch.column(WORDS))
        occ_slot, slot_run, slot_word = word_slots(words_flat, x_off, run_of, keep)
        order, bounds = slots_by_run(slot_run, slot_word, len(runs))  # slots renumbered by run, then word
        if len(slot_word):
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            occ_slot, slot_run, slot_word = rank[occ_slot], slot_run[order], slot_word.take(pa.array(order))
        tok_inst, tok_base, first_tok = _instances(wid_flat, w_off, x_off, keep)
        counts = np.bincount(occ_slot, minlength=len(slot_word)).astype(np.int64)
        st = self._state = _CallState(runs, bounds, slot_run, slot_word, counts, tok_inst, tok_base, first_tok,
                                      occ_slot, self._zeroed_sums(len(slot_word)))
        if self.pooling != "max":
            st.pieces = call_pieces(tok_inst, first_tok, occ_slot, self.pooling)
        return self._hook

    def _zeroed_sums(self, n: int):
        """(n, dim) float32 zeros on the encoder's device, in memory kept from call to call: fresh
        memory for every call's sums (slots x dim x 4 bytes, 30 MB at 384 dimensions on mixed-en's
        calls) is paid again in page faults each time."""
        buf = self._buffer
        if buf is None or buf.shape[0] < n:
            size = max(n, int(1.25 * buf.shape[0]) if buf is not None else 0)
            buf = self._buffer = self.torch.empty((size, self.dim), dtype=self.torch.float32, device=self.encoder.device)
        return buf[:n].zero_()

    def _hook(self, layers, mask, idx: np.ndarray, spans: np.ndarray) -> None:
        """One model batch: row ``r`` is a window of document ``idx[r]`` (``spans[r]``: the position of
        its column 0, the positions it covers and those it owns, :meth:`WindowPlan.spans`). An
        occurrence is taken by the window that owns its first piece (the one where it has the most
        context), so overlapping windows count it once; its pieces are pooled from that window."""
        torch = self.torch
        st = self._state
        h = layers[0].float() if len(layers) == 1 else torch.stack([x.float() for x in layers]).mean(0)
        B, S, D = h.shape
        docs, spans = np.asarray(idx, dtype=np.int64), np.asarray(spans, dtype=np.int64)
        if st.pieces is not None:  # each piece weighed and added to its slot at once
            got = batch_pieces(st, docs, spans, S, self.pooling)
            if got is not None:
                pos, slots, weight = got
                vec = h.reshape(B * S, D).index_select(0, torch.from_numpy(pos).to(h.device))
                if weight is not None:
                    vec = vec * torch.from_numpy(weight).to(h.device).unsqueeze(1)
                st.sums.index_add_(0, torch.from_numpy(slots).to(h.device), vec)
            return
        taken = window_pieces(st, docs, spans, S)
        if taken is None:
            return
        pos, inst, slots, n_inst = taken
        vec = self._pool(h.reshape(B * S, D), pos, inst, n_inst)
        st.sums.index_add_(0, torch.from_numpy(slots).to(h.device), vec)

    def _pool(self, flat, pos_a: np.ndarray, inst_a: np.ndarray, n_inst: int):
        """One vector per word occurrence (``n_inst`` of them) from its pieces' rows ``pos_a`` of
        ``flat`` (tokens x dim); ``inst_a`` is each piece's occurrence."""
        torch = self.torch
        dev = flat.device
        D = flat.shape[1]
        if self.pooling in ("first", "last"):
            # pieces of one occurrence are consecutive, in position order
            if self.pooling == "first":
                _, pick = np.unique(inst_a, return_index=True)
            else:
                _, rev = np.unique(inst_a[::-1], return_index=True)
                pick = len(inst_a) - 1 - rev
            return flat.index_select(0, torch.from_numpy(pos_a[pick]).to(dev))
        tok_vec = flat.index_select(0, torch.from_numpy(pos_a).to(dev))
        inst_t = torch.from_numpy(inst_a).to(dev)
        if self.pooling == "mean":
            vec = torch.zeros((n_inst, D), dtype=torch.float32, device=dev).index_add_(0, inst_t, tok_vec)
            n = torch.bincount(inst_t, minlength=n_inst).clamp_(min=1).unsqueeze(1)
            return vec / n
        # max
        vec = torch.full((n_inst, D), float("-inf"), dtype=torch.float32, device=dev)
        return vec.scatter_reduce_(0, inst_t.unsqueeze(1).expand(-1, D), tok_vec, "amax")

    def attach(self, out: pa.Table) -> pa.Table:
        """Write this call's staged parts (one per shard row run, also for runs without words, so the
        parts tile the shard) and drop the word columns from the encoder's output."""
        st, self._state = self._state, None
        if st is None:
            raise RuntimeError("StaticAccumulator.attach called without hook_for (one call per encoder batch)")
        sums = st.sums.cpu().numpy()
        for (shard, r0, r1), a, b in zip(st.runs, st.run_bounds[:-1], st.run_bounds[1:]):
            table = part_table(st.slot_word.slice(a, b - a), st.counts[a:b], sums[a:b], self.dim)
            self.out.write_arrow(part_name(shard, r0, r1, STATIC_PART_SUFFIX), table)
        return out.drop_columns([c for c in (WORD_IDS, WORDS) if c in out.column_names])
