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
    """The word-slot bookkeeping of one encoder call (a slot = one (row run, word) pair)."""

    runs: list[tuple[str, int, int]]  # (shard, first row, last row) per run
    slot_run: np.ndarray  # run of each slot
    slot_word: list[str]  # word of each slot
    counts: np.ndarray  # occurrences per slot
    tok_inst: list[np.ndarray]  # per kept doc: instance (word occurrence) index per token, -1 = none
    first_pos: list[np.ndarray]  # per kept doc: token position of each instance's first piece
    inst_slot: list[np.ndarray]  # per kept doc: slot of each instance
    sums: Any  # torch (slots, dim) float32 on the encoder's device


def _list_parts(col: pa.ChunkedArray) -> tuple[np.ndarray, Any]:
    """(offsets, values) of a list column: row ``r`` holds ``values[offsets[r]:offsets[r + 1]]``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy()
    values = arr.values
    if pa.types.is_integer(values.type):
        values = values.to_numpy(zero_copy_only=False)
    return off - off[0], (values[int(off[0]):int(off[-1])] if len(off) else values)


def _first_positions(t: np.ndarray, n_inst: int) -> np.ndarray:
    """Token position of each instance's first piece (``t``: instance per token, -1 = none)."""
    first = np.zeros(n_inst, dtype=np.int64)
    at = np.flatnonzero(t >= 0)
    tt = t[at]
    if len(tt) and bool((tt[1:] >= tt[:-1]).all()):  # instances ascend (BERT's words): runs
        new = np.empty(len(tt), dtype=bool)
        new[0] = True
        np.not_equal(tt[1:], tt[:-1], out=new[1:])
        first[tt[new]] = at[new]
    elif len(tt):
        seen, first_at = np.unique(tt, return_index=True)  # positions ascend: each one's first piece
        first[seen] = at[first_at]
    return first


def word_slots(words: pa.Array, offsets: np.ndarray, run_of: np.ndarray,
               keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One slot per (row run, word) among the kept rows' word occurrences (row ``r`` holds
    ``words[offsets[r]:offsets[r + 1]]``), numbered in order of first occurrence: the slot of each
    kept occurrence (kept rows in order), and the run and word of each slot. Arrow's dictionary
    encoding and numpy, no Python per occurrence."""
    n_rows = len(offsets) - 1
    occ_row = np.repeat(np.arange(n_rows), np.diff(offsets))
    kept = np.flatnonzero(keep[occ_row]) if len(occ_row) else np.zeros(0, np.int64)
    if not len(kept):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    enc = pc.dictionary_encode(words.take(pa.array(kept)))
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    key = run_of[occ_row[kept]].astype(np.int64) * len(enc.dictionary) + codes
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    slot_of_uniq = np.empty(len(uniq), dtype=np.int64)
    by_first = np.argsort(first, kind="stable")
    slot_of_uniq[by_first] = np.arange(len(uniq))
    ordered = uniq[by_first]
    slot_words = enc.dictionary.take(pa.array(ordered % len(enc.dictionary))).to_pylist()
    return slot_of_uniq[inv.reshape(-1)], ordered // len(enc.dictionary), slot_words


def slots_by_run(slot_run: np.ndarray, slot_word: list[str], n_runs: int) -> list[np.ndarray]:
    """The slots of each run, ordered by word (Python's string order, as the parts are sorted)."""
    rank = np.empty(len(slot_word), dtype=np.int64)
    rank[sorted(range(len(slot_word)), key=slot_word.__getitem__)] = np.arange(len(slot_word))
    order = np.lexsort((rank, slot_run))
    bounds = np.searchsorted(slot_run[order], np.arange(n_runs + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(n_runs)]


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

    # one encoder call ----------------------------------------------------------------------------
    def hook_for(self, batch: pa.Table, keep: np.ndarray):
        """Prepare the word-slot bookkeeping of one encoder call; returns the token hook."""
        run_of, runs = _row_runs(batch.column(SHARD).to_numpy(zero_copy_only=False).astype(str),
                                 batch.column(ROW).to_numpy())
        w_off, wid_flat = _list_parts(batch.column(WORD_IDS))
        x_off, words_flat = _list_parts(batch.column(WORDS))
        occ_slot, slot_run, slot_word = word_slots(words_flat, x_off, run_of, keep)
        tok_inst: list[np.ndarray] = []
        first_pos: list[np.ndarray] = []
        inst_slot: list[np.ndarray] = []
        at = 0
        for row in np.flatnonzero(keep).tolist():
            n_inst = int(x_off[row + 1] - x_off[row])
            t = wid_flat[int(w_off[row]):int(w_off[row + 1])].astype(np.int64)
            tok_inst.append(t)
            first_pos.append(_first_positions(t, n_inst))
            inst_slot.append(occ_slot[at:at + n_inst])
            at += n_inst
        counts = np.bincount(occ_slot, minlength=len(slot_word)).astype(np.int64)
        sums = self.torch.zeros((len(slot_word), self.dim), dtype=self.torch.float32, device=self.encoder.device)
        self._state = _CallState(runs, slot_run, slot_word, counts, tok_inst, first_pos, inst_slot, sums)
        return self._hook

    def _hook(self, layers, mask, idx: np.ndarray, spans: np.ndarray) -> None:
        """One model batch: row ``r`` is a window of document ``idx[r]`` (``spans[r]``: the position of
        its column 0, the positions it covers and those it owns, :meth:`WindowPlan.spans`). An
        occurrence is taken by the window that owns its first piece (the one where it has the most
        context), so overlapping windows count it once; its pieces are pooled from that window."""
        torch = self.torch
        st = self._state
        h = layers[0].float() if len(layers) == 1 else torch.stack([x.float() for x in layers]).mean(0)
        B, S, D = h.shape
        pos, inst, slots = [], [], []
        offset = 0
        for r, j in enumerate(idx):
            col0, a, b, lo, hi = (int(x) for x in spans[r])
            t = st.tok_inst[j]
            p = np.arange(a, min(b, len(t)), dtype=np.int64)
            p = p[t[p] >= 0]
            fp = st.first_pos[j][t[p]]
            p = p[(fp >= lo) & (fp < hi)]
            if not len(p):
                continue
            taken, local = np.unique(t[p], return_inverse=True)
            pos.append(r * S + p - col0)
            inst.append(offset + local)
            slots.append(st.inst_slot[j][taken])
            offset += len(taken)
        if offset == 0:
            return
        vec = self._pool(h.reshape(B * S, D), np.concatenate(pos), np.concatenate(inst), offset)
        st.sums.index_add_(0, torch.from_numpy(np.concatenate(slots)).to(h.device), vec)

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
        for (shard, r0, r1), sl in zip(st.runs, slots_by_run(st.slot_run, st.slot_word, len(st.runs))):
            table = part_table([st.slot_word[s] for s in sl.tolist()], st.counts[sl], sums[sl], self.dim)
            self.out.write_parquet(part_name(shard, r0, r1, STATIC_PART_SUFFIX), table, compression="none")
        return out.drop_columns([c for c in (WORD_IDS, WORDS) if c in out.column_names])
