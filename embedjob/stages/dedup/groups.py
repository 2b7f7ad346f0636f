"""Groups of duplicates from pairs, and which document each group keeps. Plain numpy and scipy:
no Ray, no storage.

A group is a connected component of the graph whose edges are the pairs (cosine >= threshold):
``a~b`` and ``b~c`` put ``a``, ``b`` and ``c`` in one group even when ``a`` and ``c`` are further
apart. Documents in no pair are in no group (and are kept).

Example::

    members, group = connected_groups(np.array([0, 1, 5]), np.array([1, 2, 6]))
    # members [0 1 2 5 6], group [0 0 0 1 1]
    keep = keep_first(group, np.array(["d0", "d1", "d2", "d5", "d6"], dtype=object))
    # [True False False True False]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from embedjob.stages.dedup.pairs import EPS


def connected_groups(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(members, group)``: the positions in any pair (sorted) and their group, numbered from 0
    in the order of each group's smallest position."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    members, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    m = len(members)
    ia, ib = inverse[: len(a)], inverse[len(a):]
    graph = coo_matrix((np.ones(len(a), np.int8), (ia, ib)), shape=(m, m))
    _, label = connected_components(graph, directed=False)
    # renumber by first appearance: members are sorted, so a group's number follows its smallest member
    _, first = np.unique(label, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return members, rank[label]


def _pick(group: np.ndarray, score: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """True for the member of each group with the highest ``score`` (ties: the smallest id)."""
    keep = np.zeros(len(group), bool)
    if not len(group):
        return keep
    # sort by group, then score descending, then id ascending: the first row of each group wins
    id_rank = np.argsort(np.argsort(ids.astype(str), kind="stable"), kind="stable")
    order = np.lexsort((id_rank, -np.asarray(score, dtype=np.float64), group))
    g = group[order]
    first = np.ones(len(g), bool)
    first[1:] = g[1:] != g[:-1]
    keep[order[first]] = True
    return keep


def keep_first(group: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Keep the smallest id of each group."""
    return _pick(group, np.zeros(len(group)), ids)


def keep_longest(group: np.ndarray, ids: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Keep the document with the most tokens of each group (ties: the smallest id)."""
    return _pick(group, np.asarray(n_tokens, dtype=np.float64), ids)


def keep_central(group: np.ndarray, ids: np.ndarray, centrality: np.ndarray) -> np.ndarray:
    """Keep the document nearest its group's mean direction (``centrality``: cosine to it)."""
    return _pick(group, np.round(np.asarray(centrality, dtype=np.float64), 6), ids)


def group_sums(x: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum of the unit rows ``x`` of each group (``group[i]`` of row i; -1: in none), (n_groups, dim):
    added up shard by shard, it gives each group's mean direction in bounded memory."""
    sums = np.zeros((n_groups, x.shape[1]), np.float64)
    sel = group >= 0
    np.add.at(sums, group[sel], x[sel].astype(np.float64))
    return sums


def centrality(x: np.ndarray, group: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Cosine of each row with its group's mean direction (``sums``: :func:`group_sums` over all
    shards); NaN for rows in no group."""
    out = np.full(len(x), np.nan)
    sel = group >= 0
    if sel.any():
        c = sums[group[sel]]
        norms = np.linalg.norm(c, axis=1)
        out[sel] = (x[sel].astype(np.float64) * c).sum(axis=1) / np.where(norms > 0, norms, 1.0)
    return out


def dropped_at(a: np.ndarray, b: np.ndarray, cos: np.ndarray, thresholds: Sequence[float]) -> dict[str, dict[str, int]]:
    """For each threshold (of those the pairs cover): pairs, groups and documents dropped (group
    members minus one per group) when only pairs with cosine >= it count."""
    out = {}
    for t in sorted(set(float(x) for x in thresholds)):
        sel = cos >= t - EPS
        members, group = connected_groups(a[sel], b[sel])
        groups = int(group.max()) + 1 if len(group) else 0
        out[f"{t:g}"] = {"pairs": int(sel.sum()), "groups": groups, "dropped": int(len(members) - groups)}
    return out
