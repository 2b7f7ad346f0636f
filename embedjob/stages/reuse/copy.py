"""In a shard's commit task: the rows its reuse plan names, copied from their old files and merged,
in row order, with the rows encoded in this run.

Old rows are copied as stored (``output.vector_dtype`` is part of the recipe, so the same codec):
the vector, ``n_tokens`` and ``text_hash`` from ``vectors/<old>.parquet``, the words from
``tokens/<old>.parquet`` and, with ``encode.write_chunks``, the windows from ``chunks/<old>.parquet``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedjob.errors import IncompleteShardError as ReuseError
from embedjob.layout import CHUNKS, TOKENS_DIR, VECTORS, shard_file
from embedjob.schema import CHUNK_VECTORS, ROW, STATIC_HOME, TEXT_HASH
from embedjob.stages.reuse.lookup import COMMIT_META
from embedjob.stages.reuse.static import drop_broken
from embedjob.storage import Storage


@dataclass
class ReusedRows:
    """The reused rows of one shard: their row indices in the shard and their output rows."""

    rows: np.ndarray
    vectors: pa.Table
    tokens: pa.Table
    chunks: Optional[pa.Table]
    chunk_rows: Optional[np.ndarray]

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def _chunk_groups(chunks: pa.Table, vectors: pa.Table) -> np.ndarray:
    """The source row of each chunk row: documents' windows are consecutive (chunk 0 first), in row
    order, one group per row with a vector (a row without text has none)."""
    start = np.asarray(chunks.column("chunk").to_numpy(zero_copy_only=False) == 0)
    group = np.cumsum(start) - 1
    with_text = np.flatnonzero(np.asarray(vectors.column("vector").is_valid().to_numpy(zero_copy_only=False)))
    return with_text[group] if len(group) else np.zeros(0, np.int64)


def load_reused(out: Storage, plan_rel: Optional[str], shard: str,
                static: Optional[dict[str, Any]] = None) -> Optional[ReusedRows]:
    """The shard's planned rows read from their sources (None without a plan). ``static`` (static
    word vectors on): the plan rows of homes not carried (``drop``) are left to the encoder, and
    each copied row keeps its static home (``static_home``, stages/reuse/static.py)."""
    if not plan_rel:
        return None
    names = out.list(f"{plan_rel}/{shard}", suffix=".parquet")
    if not names:
        return None
    plan = pa.concat_tables([out.read_parquet(f"{plan_rel}/{shard}/{n}") for n in names])
    if static is not None:
        plan = drop_broken(plan, set(static.get("drop") or ()))
    if not plan.num_rows:
        return None
    plan = plan.sort_by([("src", "ascending"), ("src_row", "ascending")])
    rows, vecs, toks, chunks, chunk_rows = [], [], [], [], []
    for src in sorted(set(plan.column("src").to_pylist())):
        mine = plan.filter(pc.equal(plan.column("src"), src))
        take = mine.column("src_row").to_numpy()
        commit, at = mine.column("src_commit")[0].as_py(), mine.column("src_prefix")[0].as_py()
        rows.append(mine.column("row").to_numpy())
        has_chunks = out.exists(at + shard_file(CHUNKS, src))
        # without chunks, only the row groups holding the planned rows are read (a reshuffle: N x M small reads)
        v = _read_stamped(out, at + shard_file(VECTORS, src), commit, shard, None if has_chunks else take)
        vecs.append(_with_home(v if not has_chunks else v.take(pa.array(take)), mine, static))
        toks.append(_read_stamped(out, at + shard_file(TOKENS_DIR, src), commit, shard, take))
        if has_chunks:
            c = _read_stamped(out, at + shard_file(CHUNKS, src), commit, shard)
            where = np.full(v.num_rows, -1, np.int64)
            where[take] = rows[-1]
            dest = where[_chunk_groups(c, v)]
            keep = dest >= 0
            chunks.append(c.filter(pa.array(keep)))
            chunk_rows.append(dest[keep])
    schema = vecs[0].schema
    return ReusedRows(np.concatenate(rows), pa.concat_tables([t.cast(schema) for t in vecs]),
                      pa.concat_tables(toks).replace_schema_metadata(None),
                      pa.concat_tables(chunks).replace_schema_metadata(None) if chunks else None,
                      np.concatenate(chunk_rows) if chunk_rows else None)


def _with_home(v: pa.Table, plan: pa.Table, static: Optional[dict[str, Any]]) -> pa.Table:
    """The copied rows with the plan's ``static_home`` (static on; an old file may have none)."""
    if STATIC_HOME in v.column_names:
        v = v.drop_columns([STATIC_HOME])
    if static is None:
        return v
    return v.append_column(STATIC_HOME, plan.column(STATIC_HOME).cast(pa.string())).replace_schema_metadata(
        v.schema.metadata)


def _read_stamped(out: Storage, rel: str, commit: str, shard: str, take: Optional[np.ndarray] = None) -> pa.Table:
    """``rel`` (its rows ``take``, sorted, when given: only the row groups that hold them are read)
    when it is still the file of the commit the plan was made from; else an error that fails this
    shard's commit (its rerun encodes what it cannot copy)."""
    with out.open(rel, "rb") as f:
        pf = pq.ParquetFile(f)
        got = (pf.schema_arrow.metadata or {}).get(COMMIT_META)
        if got is None or got.decode() != commit:
            raise ReuseError(f"shard {shard}: {rel} was replaced after the reuse plan was made; the shard is not "
                             "committed and its rerun encodes these documents")
        if take is None:
            return pf.read()
        sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_of = np.searchsorted(starts, take, side="right") - 1  # each planned row's row group
        groups = np.unique(group_of)
        table = pf.read_row_groups(groups.tolist())
    base = np.concatenate([[0], np.cumsum(sizes[groups])])  # where each read group starts in ``table``
    g = np.searchsorted(groups, group_of)
    return table.take(pa.array(base[g] + take - starts[group_of]))


def with_text_hash(vectors: pa.Table, table: pa.Table) -> pa.Table:
    """``vectors`` with the staged rows' ``text_hash`` column (when the preprocess stage wrote one)."""
    if TEXT_HASH not in table.column_names:
        return vectors
    return vectors.append_column(TEXT_HASH, table.column(TEXT_HASH)).replace_schema_metadata(vectors.schema.metadata)


def without_hash(vectors: pa.Table) -> pa.Table:
    """``vectors`` without ``text_hash`` and ``static_home`` (the Lance dataset keeps its own columns)."""
    return vectors.drop_columns([c for c in (TEXT_HASH, STATIC_HOME) if c in vectors.column_names])


def chunk_rows_of(table: pa.Table) -> np.ndarray:
    """The shard row of each chunk row ``chunks_table(table)`` makes."""
    counts = pc.list_value_length(table.column(CHUNK_VECTORS)).fill_null(0).to_numpy()
    return np.repeat(table.column(ROW).to_numpy(), counts)


def _by_row(new: Optional[pa.Table], old: Optional[pa.Table], new_rows: np.ndarray, old_rows: np.ndarray,
            ) -> tuple[Optional[pa.Table], np.ndarray]:
    """``new`` and ``old`` rows as one table in row order (stable: a document's windows stay in order)."""
    if old is None or not old.num_rows:
        return new, new_rows
    if new is None or not new.num_rows:
        both, rows = old, old_rows
    else:
        both = pa.concat_tables([new, old.select(new.column_names).cast(new.schema)])
        rows = np.concatenate([new_rows, old_rows])
    order = np.argsort(rows, kind="stable")
    return both.take(pa.array(order)), rows[order]


def merge(reused: ReusedRows, vectors: pa.Table, tokens: pa.Table, chunks: Optional[pa.Table],
          rows: np.ndarray, chunk_rows: Optional[np.ndarray]) -> tuple[pa.Table, pa.Table, Optional[pa.Table], np.ndarray]:
    """(vectors, tokens, chunks, rows) of the whole shard in row order: this run's rows and the reused."""
    meta = (vectors if vectors.num_rows else reused.vectors).schema.metadata
    merged_vectors, merged_rows = _by_row(vectors if vectors.num_rows else None, reused.vectors, rows, reused.rows)
    merged_tokens, _ = _by_row(tokens if tokens.num_rows else None, reused.tokens, rows, reused.rows)
    merged_chunks = chunks
    if reused.chunks is not None:
        merged_chunks, _ = _by_row(chunks if chunks is not None and chunks.num_rows else None, reused.chunks,
                                   chunk_rows if chunk_rows is not None else np.zeros(0, np.int64), reused.chunk_rows)
    return merged_vectors.replace_schema_metadata(meta), merged_tokens, merged_chunks, merged_rows


def new_commit_id() -> str:
    return uuid.uuid4().hex


def stamped(table: pa.Table, commit: str) -> pa.Table:
    """``table`` with the commit stamp in its schema metadata (the lookup trusts only stamped files)."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), COMMIT_META: commit.encode()})
