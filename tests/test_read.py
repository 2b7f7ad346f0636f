"""The read stage without Ray: shard discovery and keys, footer checks, id checks from the id
column alone, and blocks that carry each row's shard and index."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.errors import InputError
from embedjob.schema import ROW, SHARD
from embedjob.stages.read import check_ids, discover_shards, read_shard_blocks


def _shard(path, ids, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts}), path)


def test_shards_are_found_recursively_with_stable_keys(tmp_path):
    _shard(tmp_path / "in" / "b" / "p1.parquet", ["x"], ["t"])
    _shard(tmp_path / "in" / "a.parquet", ["y", "z"], ["t", "u"])
    _shard(tmp_path / "in" / "_skip" / "p.parquet", ["w"], ["t"])  # _-prefixed folders are not input
    shards = discover_shards(str(tmp_path / "in"), {}, "id", "text")
    assert [(s.key, s.num_rows) for s in shards] == [("a", 2), ("b--p1", 1)]
    assert shards[0].fingerprint()["rows"] == 2 and shards[0].size


def test_ids_are_checked_from_the_id_column(tmp_path):
    _shard(tmp_path / "in" / "a.parquet", ["1", "2"], ["t", "u"])
    _shard(tmp_path / "in" / "b.parquet", ["3", "2"], ["v", "w"])
    shards = discover_shards(str(tmp_path / "in"), {}, "id", "text")
    with pytest.raises(InputError, match=r"id '2' occurs 2 times: .*a.parquet row 1, .*b.parquet row 1"):
        check_ids(shards, {}, "id")
    stats = check_ids(shards, {}, "id", on_duplicate_id="warn")
    assert stats["rows"] == 4 and stats["duplicate_rows"] == 1 and stats["examples"][0]["id"] == "2"


def test_blocks_carry_shard_and_row(tmp_path):
    _shard(tmp_path / "in" / "a.parquet", [str(i) for i in range(5)], [f"t{i}" for i in range(5)])
    shard = discover_shards(str(tmp_path / "in"), {}, "id", "text")[0]
    blocks = list(read_shard_blocks(shard, {}, "id", "text", rows_per_block=2))
    assert [b.num_rows for b in blocks] == [2, 2, 1]
    assert sum((b.column(ROW).to_pylist() for b in blocks), []) == [0, 1, 2, 3, 4]
    assert set(blocks[0].column(SHARD).to_pylist()) == {"a"}
