"""The write stage without Ray: staged parts named by row range, a shard committed exactly once
from its parts (a block that ran twice counts once), a shard with missing rows never committed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.errors import IncompleteShardError
from embedjob.layout import DONE, TMP, shard_marker
from embedjob.reconcile import read_marker
from embedjob.schema import EMPTY, ROW, SHARD, TOKENS
from embedjob.stages.write import BlockWriter, commit_shard
from embedjob.storage import Storage


def _batch(shard: str, rows: list[int]) -> pa.Table:
    n = len(rows)
    return pa.table({
        SHARD: [shard] * n, ROW: pa.array(rows, pa.int64()), "id": [f"{shard}-{r}" for r in rows],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(4 * n, dtype=np.float32)), 4),
        "n_tokens": pa.array([3] * n, pa.int32()), TOKENS: [["a", "b"]] * n, EMPTY: [False] * n,
    })


def test_parts_are_cut_into_contiguous_runs_per_shard(tmp_path):
    out = Storage(str(tmp_path))
    reports = BlockWriter(str(tmp_path), {}, "id")(pa.concat_tables([_batch("s1", [3, 4]), _batch("s0", [0, 1, 5])]))
    got = sorted((r["shard"], r["row_start"], r["row_end"]) for r in reports.to_pylist())
    assert got == [("s0", 0, 1), ("s0", 5, 5), ("s1", 3, 4)]
    assert out.list(f"{TMP}/s0") == ["000000000000-000000000001.arrow", "000000000005-000000000005.arrow"]


def test_a_shard_commits_once_from_overlapping_parts(tmp_path):
    writer = BlockWriter(str(tmp_path), {}, "id")
    writer(_batch("s", [0, 1, 2]))
    writer(_batch("s", [1, 2, 3]))  # a retried block cut differently
    marker = commit_shard(str(tmp_path), {}, "s", 4, "keep", {"stage_hash": "h"}, dim=4)
    vectors = pq.read_table(tmp_path / "vectors" / "s.parquet")
    assert vectors.column("id").to_pylist() == ["s-0", "s-1", "s-2", "s-3"]
    assert marker["rows_out"] == 4 and read_marker(Storage(str(tmp_path)), shard_marker("s"))["stage_hash"] == "h"
    assert not (tmp_path / TMP / "s").exists()


def test_a_shard_with_missing_rows_is_not_committed(tmp_path):
    BlockWriter(str(tmp_path), {}, "id")(_batch("s", [0, 2]))
    with pytest.raises(IncompleteShardError, match="hold 2 rows, the input has 3"):
        commit_shard(str(tmp_path), {}, "s", 3, "keep", {}, dim=4)
    assert not (tmp_path / DONE / "s.json").exists() and not (tmp_path / "vectors" / "s.parquet").exists()
