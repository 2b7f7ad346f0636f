"""Reading a shard's blocks: ``_shard``, ``_row``, the id column and the text column (as strings,
checked for UTF-8), ``rows_per_block`` rows at a time. pyarrow, fsspec and embedjob's ground floor
only (no pydantic, no Ray), so that a bare GPU host runs the job's own read (``.ci/gpu-check
--feed``); :mod:`embedjob.stages.read` builds the Ray Data source on it."""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat

from embedjob.errors import InputError, one_line
from embedjob.schema import ROW, SHARD
from embedjob.storage import Storage


def read_shard_blocks(shard: Any, storage_options: dict[str, Any], id_column: str, text_column: str,
                      rows_per_block: int) -> Iterator[pa.Table]:
    """Blocks of one shard: ``_shard``, ``_row``, id column, text column (cast to string)."""
    store = Storage(shard.url, storage_options)
    start = 0
    try:
        with store.open("", "rb") as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=rows_per_block, columns=[id_column, text_column]):
                t = pa.Table.from_batches([rb])
                n = t.num_rows
                ids = t.column(id_column).cast(pa.string())
                text = t.column(text_column)
                _check_utf8(text, ids, shard.url, text_column, start)
                if not pat.is_string(text.type):
                    text = text.cast(pa.string())
                yield pa.table({
                    SHARD: pa.array([shard.key] * n, type=pa.string()),
                    ROW: pa.array(range(start, start + n), type=pa.int64()),
                    id_column: ids,
                    text_column: text,
                })
                start += n
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read Parquet shard {shard.url} (at row {start}): {one_line(str(e))}") from e


def _check_utf8(text: pa.ChunkedArray, ids: pa.ChunkedArray, url: str, text_column: str, start: int) -> None:
    """Parquet does not check that strings are UTF-8: invalid bytes would only fail deep in the
    preprocess task. Raises :class:`InputError` naming the file, row, id and byte offset."""
    if pat.is_null(text.type):
        return
    try:
        text.validate(full=True)
        return
    except pa.ArrowInvalid as e:
        invalid = one_line(str(e))
    try:
        raws = text.cast(pa.large_binary()).to_pylist()
    except pa.ArrowException:
        raws = []
    for i, raw in enumerate(raws):
        try:
            if raw is not None:
                raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"shard {url}, row {start + i} (id {ids[i].as_py()!r}): column {text_column!r} is not valid "
                f"UTF-8 at byte {e.start} of the document ({e.reason}: {raw[e.start:e.start + 4]!r})"
            ) from None
    raise InputError(f"shard {url}, rows {start}-{start + len(text) - 1}: column {text_column!r}: {invalid}")
