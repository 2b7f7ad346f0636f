"""Read stage: find and check the input shards, then read them with Ray Data.

Checking happens on the driver before any Ray work: every shard's Parquet footer is read (in
parallel threads) so that a corrupt file, a missing column or a non-string text column is an
error naming the file and column at launch, not an hour in.

Reading is a Ray Data datasource with one read task per shard, yielding blocks of at most
``rows_per_block`` rows that carry the shard key (``_shard``) and the row's index in its shard
(``_row``): the identity that makes per-shard outputs and exactly-once commits possible.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.types as pat
from pydantic import Field

from embedjob._config_base import Section
from embedjob.errors import InputError
from embedjob.layout import failed_marker
from embedjob.schema import ROW
from embedjob.stages.blocks import _check_utf8, read_shard_blocks  # noqa: F401 - where the job reads blocks
from embedjob.storage import Storage, StorageError, list_shards, shard_key

logger = logging.getLogger(__name__)


class InputConfig(Section):
    url: str = Field(
        "data/gensim-corpus",
        description="Folder (searched recursively for *.parquet), glob or single Parquet file to read; "
        "any fsspec URL (path, file://, memory://, s3://, gs://).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options for the input's fsspec filesystem, e.g. {client_kwargs: {endpoint_url: ...}}.",
    )
    id_column: str = Field("id", description="Column holding each document's unique id (kept in every output).")
    text_column: str = Field("text", description="Column holding the document text (string).")
    on_empty_text: Literal["keep", "skip", "fail"] = Field(
        "keep",
        description="Rows whose text is null or blank: 'keep' writes them with a null vector and "
        "0 tokens, 'skip' leaves them out of the outputs; both count them in the stats. "
        "'fail' stops the job naming the shard and id.",
    )
    on_bad_shard: Literal["fail", "skip"] = Field(
        "fail",
        description="A shard that cannot be read or processed: 'fail' stops the job naming the file "
        "(committed shards stay); 'skip' records it in the manifest and finishes with a non-zero exit.",
    )
    create_sample_if_missing: bool = Field(
        False,
        description="When the input URL holds no shards, first build the sample corpus there (real text from "
        "gensim's test data: Lee news corpus + Wikipedia sample). Used by jobs/local.yaml.",
    )
    rows_per_block: int = Field(
        4096, ge=1, description="Rows per Ray Data block read from a shard (the unit of work and of retries)."
    )
    on_duplicate_id: Literal["fail", "warn"] = Field(
        "fail",
        description="An id that occurs more than once (in one shard or across shards), found before any work "
        "from the id column alone: 'fail' stops the job naming the id and its shards; 'warn' logs it, counts "
        "duplicates in the manifest and goes on (the index then holds one vector per row, not per id).",
    )



@dataclass
class ShardInfo:
    key: str  # deterministic output name
    url: str
    num_rows: int = 0
    size: Optional[int] = None
    version: Optional[str] = None  # ETag, mtime or generation: what changes when the file changes
    error: Optional[str] = None  # set when the shard cannot be used (on_bad_shard=skip)

    def fingerprint(self) -> dict[str, Any]:
        return {"url": self.url, "size": self.size, "version": self.version, "rows": self.num_rows}


def _version_of(info: dict[str, Any]) -> Optional[str]:
    for k in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "created"):
        if info.get(k) is not None:
            return str(info[k])
    return None


def inspect_shard(url: str, storage_options: dict[str, Any], id_column: str, text_column: str) -> ShardInfo:
    """Footer-level check of one shard; raises :class:`InputError` naming the file and column."""
    store = Storage(url, storage_options)
    try:
        info = store.fs.info(store.path())
        with store.open("", "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            num_rows = pf.metadata.num_rows
    except (OSError, pa.ArrowException, ValueError) as e:
        raise InputError(f"cannot read Parquet shard {url}: {e}") from None
    missing = [c for c in (id_column, text_column) if c not in schema.names]
    if missing:
        which = ", ".join(f"{c!r}" for c in missing)
        setting = " / ".join(
            s for c, s in ((id_column, "input.id_column"), (text_column, "input.text_column")) if c in missing
        )
        raise InputError(
            f"shard {url} has no column {which} (set by {setting}); available columns: {', '.join(schema.names)}"
        )
    ttype = schema.field(text_column).type
    if not (pat.is_string(ttype) or pat.is_large_string(ttype) or pat.is_null(ttype)
            or (hasattr(pat, "is_string_view") and pat.is_string_view(ttype))):
        raise InputError(
            f"shard {url}: text column {text_column!r} has type {ttype}, expected string "
            f"(input.text_column names the column holding document text)"
        )
    return ShardInfo(key="", url=url, num_rows=num_rows, size=info.get("size"), version=_version_of(info))


def discover_shards(url: str, storage_options: dict[str, Any], id_column: str, text_column: str,
                    *, on_bad_shard: str = "fail", threads: int = 16) -> list[ShardInfo]:
    """List and check every shard at ``url``. With ``on_bad_shard='skip'`` a bad shard is returned
    with ``error`` set instead of raising."""
    try:
        urls = list_shards(url, storage_options)
    except StorageError as e:
        raise InputError(str(e)) from None

    def check(u: str) -> ShardInfo:
        try:
            return inspect_shard(u, storage_options, id_column, text_column)
        except InputError as e:
            if on_bad_shard == "fail":
                raise
            logger.warning("skipping bad shard (input.on_bad_shard=skip): %s", e)
            return ShardInfo(key="", url=u, error=str(e))

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        infos = list(pool.map(check, urls))
    keys = {}
    for s in infos:
        s.key = shard_key(s.url, url)
        if s.key in keys:
            raise InputError(f"shards {keys[s.key]} and {s.url} map to the same output name {s.key!r}")
        keys[s.key] = s.url
    return infos


def _read_ids(shard: ShardInfo, storage_options: dict[str, Any], id_column: str) -> pa.Array:
    """The id column of one shard as strings (one column read: no text is touched)."""
    store = Storage(shard.url, storage_options)
    try:
        with store.open("", "rb") as f:
            col = pq.ParquetFile(f).read(columns=[id_column]).column(id_column)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise InputError(f"cannot read the id column {id_column!r} of shard {shard.url}: {e}") from None
    return col.combine_chunks().cast(pa.string()) if col.num_chunks else pa.array([], pa.string())


def _hash_ids(ids: pa.Array):
    import numpy as np
    import pandas as pd

    if len(ids) == 0:
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(ids.to_numpy(zero_copy_only=False), categorize=False)


def check_ids(shards: list[ShardInfo], storage_options: dict[str, Any], id_column: str, *,
              on_bad_shard: str = "fail", on_duplicate_id: str = "fail", threads: int = 16) -> dict[str, Any]:
    """Null and duplicate ids of the readable shards, from their id columns alone.

    A null id is an :class:`InputError` naming the shard and row (with ``on_bad_shard='skip'`` the
    shard is marked bad instead). Ids are hashed (64-bit) per shard and the hashes compared across
    the corpus; only shards holding a repeated hash are read again to name the ids. Duplicates
    raise with ``on_duplicate_id='fail'``; with ``'warn'`` they are logged. Returns the counts for
    the manifest: ``{"rows", "duplicate_rows", "duplicated_ids", "examples"}``."""
    import numpy as np

    usable = [s for s in shards if not s.error]

    def scan(s: ShardInfo):
        ids = _read_ids(s, storage_options, id_column)
        if ids.null_count:
            row = int(pc.index(pc.is_null(ids), True).as_py())
            raise InputError(f"shard {s.url}: id column {id_column!r} is null at row {row} "
                             f"({ids.null_count} null id(s) in the shard); every row needs a unique id (input.id_column)")
        return _hash_ids(ids)

    def safe_scan(s: ShardInfo):
        try:
            return scan(s)
        except InputError as e:
            if on_bad_shard == "fail":
                raise
            logger.warning("skipping bad shard (input.on_bad_shard=skip): %s", e)
            s.error = str(e)
            return np.zeros(0, np.uint64)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(usable) or 1))) as pool:
        hashes = list(pool.map(safe_scan, usable))
    rows = int(sum(len(h) for h in hashes))
    stats: dict[str, Any] = {"rows": rows, "duplicate_rows": 0, "duplicated_ids": 0, "examples": []}
    if rows == 0:
        return stats
    allh = np.concatenate(hashes)
    uniq, counts = np.unique(allh, return_counts=True)
    repeated = uniq[counts > 1]
    if len(repeated) == 0:
        return stats
    # name the ids: re-read only the shards that hold a repeated hash (64-bit collisions are ruled out here)
    where: dict[str, list[tuple[str, int]]] = {}
    for s, h in zip(usable, hashes):
        hit = np.flatnonzero(np.isin(h, repeated))
        if len(hit):
            ids = _read_ids(s, storage_options, id_column)
            for r in hit.tolist():
                where.setdefault(ids[r].as_py(), []).append((s.url, r))
    dups = {i: w for i, w in where.items() if len(w) > 1}
    if not dups:
        return stats
    stats["duplicated_ids"] = len(dups)
    stats["duplicate_rows"] = int(sum(len(w) - 1 for w in dups.values()))
    stats["examples"] = [{"id": i, "at": [{"shard": u, "row": r} for u, r in w[:5]]}
                         for i, w in sorted(dups.items())[:10]]
    first_id, first_at = sorted(dups.items())[0]
    places = ", ".join(f"{u} row {r}" for u, r in first_at[:3]) + (" ..." if len(first_at) > 3 else "")
    more = f" (and {len(dups) - 1} more duplicated id(s))" if len(dups) > 1 else ""
    msg = (f"id {first_id!r} occurs {len(first_at)} times: {places}{more}; {stats['duplicate_rows']} duplicate row(s) "
           f"in column {id_column!r}")
    if on_duplicate_id == "fail":
        raise InputError(f"{msg}. Ids must be unique (input.id_column); set input.on_duplicate_id=warn to go on")
    logger.warning("%s (input.on_duplicate_id=warn: going on; the manifest counts them)", msg)
    return stats


class ShardDatasource:
    """Factory of a Ray Data ``Datasource`` over checked shards (one read task per shard)."""

    @staticmethod
    def create(shards: list[ShardInfo], storage_options: dict[str, Any], id_column: str, text_column: str,
               rows_per_block: int, *, on_bad_shard: str = "fail", out_url: Optional[str] = None,
               out_options: Optional[dict[str, Any]] = None, skip_rows: Optional[dict[str, Any]] = None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        class _ShardDatasource(Datasource):
            def get_name(self) -> str:
                return "ReadShards"

            def estimate_inmemory_data_size(self) -> Optional[int]:
                return sum(s.size or 0 for s in shards) * 3

            def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
                tasks = []
                for s in shards:
                    meta = BlockMetadata(num_rows=s.num_rows, size_bytes=(s.size or 0) * 3,
                                         input_files=[s.url], exec_stats=None)

                    def read_fn(s=s, skip=(skip_rows or {}).get(s.key)):
                        blocks = read_shard_blocks(s, storage_options, id_column, text_column, rows_per_block)
                        if skip is not None:  # output.reuse: rows whose vectors the commit copies
                            blocks = drop_rows(blocks, skip)
                        if on_bad_shard == "skip" and out_url is not None:
                            return _record_failure(blocks, s, out_url, out_options or {})
                        return blocks

                    tasks.append(ReadTask(read_fn, meta))
                return tasks

        return _ShardDatasource()


def drop_rows(blocks: Iterator[pa.Table], rows: Any) -> Iterator[pa.Table]:
    """``blocks`` without the rows (``_row``) in ``rows``; blocks left empty are not yielded."""
    for b in blocks:
        keep = ~np.isin(b.column(ROW).to_numpy(), rows)
        if keep.all():
            yield b
        elif keep.any():
            yield b.filter(pa.array(keep))


def _record_failure(blocks: Iterator[pa.Table], shard: ShardInfo, out_url: str,
                    out_options: dict[str, Any]) -> Iterator[pa.Table]:
    """on_bad_shard=skip: a shard that fails mid-read stops yielding and leaves a failure record
    beside its staged parts (the driver reports it; the shard is never committed)."""
    try:
        yield from blocks
    except InputError as e:
        logger.warning("shard %s failed and is skipped (input.on_bad_shard=skip): %s", shard.url, e)
        Storage(out_url, out_options).write_json(failed_marker(shard.key), {"reason": str(e)})
