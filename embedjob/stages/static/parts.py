"""Static-vector part tables and the shard commit's merge of the staged parts.

Every encoder call writes its sums per (shard, contiguous row run) to a staged part named by the row
range (``_tmp/<shard>/<r0>-<r1>.static.arrow``, an Arrow IPC file); a retried call rewrites the same name. At shard
commit :func:`commit_static_parts` picks staged parts whose row ranges tile the shard exactly (a stale
part of a differently-cut retry is ignored; no tiling -> the commit fails and the shard is redone) and
writes ``static/parts/<shard>.parquet`` before the shard's marker.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob.errors import StaticVectorsError
from embedjob.layout import PARTS_DIR, shard_file
from embedjob.stages.reuse.copy import stamped

if TYPE_CHECKING:
    from embedjob.storage import Storage

_PART_RE = re.compile(r"(\d+)-(\d+)\.static\.arrow$")


def part_table(words: Union[list[str], pa.Array], counts: np.ndarray, sums: np.ndarray, dim: int) -> pa.Table:
    """The parts' schema: ``word`` (string), ``count`` (int64 occurrences), ``sum``
    (fixed_size_list<float32>[dim], sum of the occurrences' vectors)."""
    flat = pa.array(np.ascontiguousarray(sums, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.table({
        "word": words.cast(pa.string()) if isinstance(words, pa.Array) else pa.array(words, type=pa.string()),
        "count": pa.array(np.asarray(counts, dtype=np.int64), type=pa.int64()),
        "sum": pa.FixedSizeListArray.from_arrays(flat, dim),
    })


def part_sums(table: pa.Table) -> np.ndarray:
    """The ``sum`` column of a part table as a (rows, dim) array: a view of Arrow's buffer where
    the column is one chunk without nulls (no copy of rows x dim floats)."""
    col = table.column("sum")
    dim = col.type.list_size
    chunks = [_chunk_sums(c, dim) for c in col.chunks if len(c)]
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)


def _chunk_sums(arr: pa.FixedSizeListArray, dim: int) -> np.ndarray:
    if arr.null_count or arr.values.null_count:
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return arr.values.slice(arr.offset * dim, len(arr) * dim).to_numpy().reshape(-1, dim)


def choose_tiling(ranges: list[tuple[int, int]], n_rows: Optional[int] = None) -> Optional[list[int]]:
    """Indices of ranges (inclusive ``(first, last)`` rows) that cover ``0 .. n_rows-1`` exactly once,
    or None. ``n_rows`` defaults to the largest last row + 1. Depth-first, remembering dead ends,
    so it is linear in the number of ranges for the usual one-or-two-candidates-per-row case."""
    if not ranges:
        return [] if not n_rows else None
    end = (max(b for _, b in ranges) + 1) if n_rows is None else n_rows
    if end <= 0:
        return [] if end == 0 else None
    starts: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(ranges):
        if b >= a:
            starts.setdefault(a, []).append(i)
    for lst in starts.values():  # prefer longer runs (fewer parts), then later-listed
        lst.sort(key=lambda i: (-ranges[i][1], -i))
    # An explicit stack (no recursion limit): each frame is a row position and its untried candidates;
    # path[k] is the range that led from frame k to frame k + 1.
    dead: set[int] = set()
    path: list[int] = []
    frames = [(0, iter(starts.get(0, [])))]
    while frames:
        pos, candidates = frames[-1]
        i = next(candidates, None)
        if i is None:  # every range starting here leads to a dead end
            dead.add(pos)
            frames.pop()
            if path:
                path.pop()
            continue
        nxt = ranges[i][1] + 1
        if nxt == end:
            return path + [i]
        if nxt in dead or nxt > end:
            continue
        path.append(i)
        frames.append((nxt, iter(starts.get(nxt, []))))
    return None


# Words summed (and written as one row group) at a time at commit: the merge holds this many words'
# sums, not the shard's whole vocabulary (words x dim x 4 bytes: 160 MB at 768 dimensions for a
# mixed-en shard of 11k documents, and it grows with the shard).
MERGE_WORDS = 4096


class MergedParts:
    """The sum of ``count`` and ``sum`` by ``word`` over part tables, in word order (Arrow's UTF-8
    byte order, which is Python's string order): ``words`` (a string array) and ``counts`` whole,
    the sums a batch of words at a time (:meth:`batches`).

    Arrow's dictionary encoding finds the distinct words and sorts them, no Python string per row.
    Each table's rows are taken in word order (a staged part's already are, its words distinct), so
    a batch of words is a range of each table's rows, found by two binary searches. The sums are
    float32, as the parts store them and as the encoder summed each call's occurrences, added a
    table at a time in the order the tables come: a word's sum is exact where one part has it, and
    within a float32 rounding per part of :func:`merge_part_tables_reference`'s float64 otherwise."""

    def __init__(self, tables: list[pa.Table]):
        tables = [t for t in tables if t.num_rows]
        self.dim = tables[0].schema.field("sum").type.list_size if tables else 0
        if not tables:
            self.words, self.counts, self._rows = pa.array([], type=pa.string()), np.zeros(0, np.int64), []
            return
        words = pa.concat_arrays([c for t in tables for c in t.column("word").chunks])
        counts = np.concatenate([t.column("count").to_numpy() for t in tables]).astype(np.int64, copy=False)
        enc = pc.dictionary_encode(words)
        by_word = pc.sort_indices(enc.dictionary).to_numpy()
        rank = np.empty(len(by_word), dtype=np.int64)
        rank[by_word] = np.arange(len(by_word))
        inv = rank[enc.indices.to_numpy(zero_copy_only=False)]
        self.counts = np.zeros(len(by_word), dtype=np.int64)
        np.add.at(self.counts, inv, counts)
        self.words = enc.dictionary.take(pa.array(by_word)).cast(pa.string())
        self._rows = []  # per table: its rows' words (ascending), its rows, whether the words are distinct
        start = 0
        for t in tables:
            at, start = inv[start:start + t.num_rows], start + t.num_rows
            rows = part_sums(t)
            if not bool((at[1:] >= at[:-1]).all()):  # not in word order: a stable sort keeps each word's row order
                order = np.argsort(at, kind="stable")
                at, rows = at[order], rows[order]
            self._rows.append((at, rows, bool((at[1:] > at[:-1]).all())))

    def batches(self, words_per_batch: int = MERGE_WORDS):
        """(first word, sums of words [first, first + len)) per batch; the sums are a buffer that the
        next batch reuses."""
        n = len(self.counts)
        buf = np.zeros((min(max(words_per_batch, 1), n), self.dim), dtype=np.float32)
        for w0 in range(0, n, max(words_per_batch, 1)):
            out = buf[:min(n - w0, len(buf))]
            out.fill(0)
            for at, rows, distinct in self._rows:
                i0, i1 = np.searchsorted(at, (w0, w0 + len(out)))
                if i1 > i0:
                    if distinct:  # no add is lost to a repeated index
                        out[at[i0:i1] - w0] += rows[i0:i1]
                    else:
                        np.add.at(out, at[i0:i1] - w0, rows[i0:i1])
            yield w0, out


def merge_part_tables(tables: list[pa.Table], words_per_batch: int = MERGE_WORDS) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """:class:`MergedParts` whole: (sorted words (a string array), counts, float32 sums)."""
    m = MergedParts(tables)
    sums = np.zeros((len(m.counts), m.dim), dtype=np.float32)
    for w0, out in m.batches(words_per_batch):
        sums[w0:w0 + len(out)] = out
    return m.words, m.counts, sums


def merge_part_tables_reference(tables: list[pa.Table]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The original of :func:`merge_part_tables` (a Python string per row, ``np.unique`` over them,
    ``np.add.at``), kept as the reference the tests compare with."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return [], np.zeros(0, np.int64), np.zeros((0, 0), np.float64)
    words = np.concatenate([np.asarray(t.column("word").to_pylist(), dtype=object) for t in tables])
    counts = np.concatenate([t.column("count").to_numpy() for t in tables])
    sums = np.concatenate([part_sums(t) for t in tables]).astype(np.float64)
    uniq, inv = np.unique(words.astype(str), return_inverse=True)
    out_counts = np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)
    out_sums = np.zeros((len(uniq), sums.shape[1]), dtype=np.float64)
    np.add.at(out_sums, inv, sums)
    return uniq.tolist(), out_counts, out_sums


def commit_static_parts(out: "Storage", shard: str, part_paths: list[str], expected_rows: Optional[int] = None,
                        *, commit: Optional[str] = None, skip: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Merge the staged static parts of one shard into ``static/parts/<shard>.parquet``.

    Only parts whose row ranges tile the shard exactly are used (a retried call cut differently may
    leave a stale part beside the complete set; it is ignored), so each row counts once. Raises
    :class:`StaticVectorsError` when no tiling exists (the shard is then not committed and redone).
    Returns a small summary for the shard's marker. ``skip``: rows not encoded (output.reuse copied
    them), which no part covers; ``commit``: stamped in the part's metadata (``embedjob.commit``)."""
    ranges = [_row_range(shard, p) for p in part_paths]
    pick = choose_tiling(*_encoded_ranks(ranges, expected_rows, skip))
    if pick is None:
        have = ", ".join(f"{a}-{b}" for a, b in sorted(ranges)) or "none"
        rows = f"rows 0-{expected_rows - 1}" if expected_rows else "its rows"
        raise StaticVectorsError(
            f"shard {shard}: the staged static parts ({have}) do not cover {rows} exactly once; "
            "the shard is not committed and will be redone"
        )
    tables = [out.read_arrow(part_paths[i]) for i in sorted(pick, key=lambda i: ranges[i])]
    dim = tables[0].schema.field("sum").type.list_size if tables else 0
    merged = MergedParts(tables)
    schema = part_table([], np.zeros(0), np.zeros((0, dim), np.float32), dim).schema
    if commit:
        schema = stamped(schema.empty_table(), commit).schema
    rel = shard_file(PARTS_DIR, shard)
    # a row group per batch of words, written as it is summed
    out.write_parquet_batches(rel, schema, (
        part_table(merged.words.slice(w0, len(sums)), merged.counts[w0:w0 + len(sums)], sums, dim)
        for w0, sums in merged.batches()))
    words, counts = merged.words, merged.counts
    return {"part": rel, "words": len(words), "occurrences": int(counts.sum()),
            "staged_parts": len(pick), "stale_parts_ignored": len(part_paths) - len(pick)}


def _encoded_ranks(ranges: list[tuple[int, int]], expected_rows: Optional[int],
                   skip: Optional[np.ndarray]) -> tuple[list[tuple[int, int]], Optional[int]]:
    """The ranges and row count over the encoded rows only (rows numbered without the ``skip``ped
    ones); a range across a skipped row is made impossible to pick."""
    if skip is None or not len(skip) or expected_rows is None:
        return ranges, expected_rows
    encoded = np.setdiff1d(np.arange(expected_rows), skip)
    rank = np.full(expected_rows + 1, -1, np.int64)
    rank[encoded] = np.arange(len(encoded))
    out = []
    for a, b in ranges:
        ra, rb = (rank[a], rank[b]) if 0 <= a <= b < expected_rows else (-1, -1)
        out.append((int(ra), int(rb)) if ra >= 0 and rb - ra == b - a else (-1, -2))
    return out, len(encoded)


def _row_range(shard: str, path: str) -> tuple[int, int]:
    """(first, last) row of a staged part, from its name."""
    m = _PART_RE.search(path)
    if not m:
        raise StaticVectorsError(f"shard {shard}: staged static part {path!r} is not named <first>-<last>"
                                 ".static.arrow")
    return int(m.group(1)), int(m.group(2))
