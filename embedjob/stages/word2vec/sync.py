"""The syncs that combine the models of workers that do not share memory, over ``torch.distributed``
(gloo): an ``all_reduce`` of each trainable matrix, of only the rows some worker's segment can have
changed when the sync is sparse, FastText's n-gram matrix at every n-th sync only.

By default the models' *updates* since the last sync are summed (``sync_mode='sum'``), which keeps
single-process quality; Spark-style averaging (``'average'``) divides every update by the number of
models and so learns that many times more slowly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


def combine_synced(summed, last, world: int) -> None:
    """Turn ``summed`` (in place), the ``all_reduce`` SUM of the workers' copies of one matrix, into
    the synced weights.

    ``last`` given ('sum' mode): ``last + sum_i(w_i - last) = summed - (world - 1) * last``, and
    ``last`` becomes the new weights; ``last`` None ('average' mode): ``summed / world``."""
    if world <= 1:
        return
    if last is not None:
        summed.sub_(last, alpha=world - 1)
        last.copy_(summed)
    else:
        summed.div_(world)


class ModelSync:
    """Combines the models of the sync groups at every sync (see :meth:`exchange`)."""

    def __init__(self, arrays: list[np.ndarray], *, n_models: int, group, keep_last: bool,
                 ngram_pos: Optional[int], ngram_every: int):
        """``arrays``: the model's trainable matrices (updated in place); ``n_models``: models that a
        sync combines; ``group``: the process group of their leaders (None = every rank);
        ``keep_last``: keep the weights of the last sync ('sum' mode, on the leaders);
        ``ngram_pos``: index of FastText's n-gram matrix in ``arrays``, exchanged at every
        ``ngram_every``-th sync only (None = no such matrix)."""
        self.tensors = [torch.from_numpy(a) for a in arrays]
        # 'sum' needs the weights of the last sync: new = last + sum_i(worker_i - last).
        self.last = [t.clone() for t in self.tensors] if keep_last else []
        self.n_models = n_models
        self.group = group
        self.ngram_pos = ngram_pos
        self.ngram_every = ngram_every if ngram_pos is not None else 1
        self.rows: list[list[Optional[torch.Tensor]]] = []  # per segment and matrix: rows to exchange
        self.rows_moved = 0  # rows exchanged
        self.rows_full = 0  # rows a full exchange of every matrix at every sync would move

    def agree_rows(self, seg_rows: list[list[Optional[np.ndarray]]]) -> None:
        """Agree on the rows a sync exchanges after segment ``k``: the union over workers of the rows
        their segment ``k`` can change (None = all rows). Agreed once before training, so every sync is
        a plain all_reduce of those rows. Every rank must call this (it runs collectives)."""
        for per_segment in seg_rows:
            per_array: list[Optional[torch.Tensor]] = []
            for i, t in enumerate(self.tensors):
                r = per_segment[i]
                if self.n_models <= 1 or r is None or (i == self.ngram_pos and self.ngram_every > 1):
                    # FastText's n-gram matrix exchanged at every n-th sync only carries the changes
                    # of several segments: it is exchanged whole.
                    per_array.append(None)
                    continue
                mask = torch.zeros(t.shape[0], dtype=torch.uint8)
                mask[torch.from_numpy(r)] = 1
                dist.all_reduce(mask, op=dist.ReduceOp.MAX)
                idx = torch.nonzero(mask).flatten()
                # nearly every row: exchanging the whole matrix is cheaper than gathering and scattering rows
                per_array.append(None if len(idx) > 0.9 * t.shape[0] else idx)
            self.rows.append(per_array)

    def exchange(self, k: int, sync_no: int, final: bool) -> None:
        """Sync number ``sync_no``, after segment ``k``: combine the groups' models (run by each
        group's leader, over ``group``). FastText's n-gram matrix is skipped unless this is an
        ``ngram_every``-th sync or the ``final`` one."""
        for i, t in enumerate(self.tensors):
            self.rows_full += t.shape[0]
            if i == self.ngram_pos and not final and (sync_no + 1) % self.ngram_every:
                continue
            idx = self.rows[k][i]
            if idx is None:
                self.rows_moved += t.shape[0]
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
                combine_synced(t, self.last[i] if self.last else None, self.n_models)
                continue
            self.rows_moved += len(idx)
            block = t.index_select(0, idx)
            dist.all_reduce(block, op=dist.ReduceOp.SUM, group=self.group)
            prev = self.last[i].index_select(0, idx) if self.last else None
            combine_synced(block, prev, self.n_models)
            t.index_copy_(0, idx, block)
            if self.last:
                self.last[i].index_copy_(0, idx, block)

    def moved_fraction(self) -> float:
        """Rows exchanged / rows a full exchange at every sync would have moved (for the report)."""
        return round(self.rows_moved / max(self.rows_full, 1), 4)
