import pyarrow as pa
import pytest

from embedjob.storage import Storage, StorageError, list_shards, parquet_list_names, shard_key


@pytest.mark.parametrize("root", ["local", "memory"])
def test_roundtrip(tmp_path, root):
    url = str(tmp_path / "out") if root == "local" else "memory://embedjob-test/out"
    s = Storage(url)
    s.write_json("a/b.json", {"x": 1})
    assert s.read_json("a/b.json") == {"x": 1}
    s.write_parquet("t/p.parquet", pa.table({"a": [1, 2]}))
    assert s.read_parquet("t/p.parquet").column("a").to_pylist() == [1, 2]
    assert s.list("t") == ["p.parquet"]
    staged = pa.table({"w": ["a", "é"], "v": pa.FixedSizeListArray.from_arrays(pa.array([1.5, 2, 3, 4], pa.float32()), 2)})
    s.write_arrow("u/x.arrow", staged)
    assert s.read_arrow("u/x.arrow").equals(staged)
    assert s.list("missing") == []
    s.delete("a", recursive=True)
    assert not s.exists("a/b.json")


def test_parquet_floats_are_written_plain_and_the_rest_keeps_its_dictionary(tmp_path):
    """Floating-point leaves (vectors, word sums; nested in lists, structs and maps too) are written
    without a dictionary or statistics, every other leaf as pyarrow would; the data reads back equal,
    and a caller's own options win."""
    import numpy as np
    import pyarrow.parquet as pq

    n = 300
    t = pa.table({
        "id": pa.array([f"d{i % 7}" for i in range(n)]),
        "tokens": pa.array([["a", "b", "a"]] * n, pa.list_(pa.string())),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.random.default_rng(0).random(4 * n), pa.float32()), 4),
        "s": pa.array([{"k": i, "x": [0.5 * i]} for i in range(n)]),
        "m": pa.array([[("w", 1.5)]] * n, pa.map_(pa.string(), pa.float64())),
        "f": pa.array(np.arange(n, dtype=np.float64)),
    })
    s = Storage(str(tmp_path))
    s.write_parquet("t.parquet", t)
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    floats = {"vector.list.element", "s.x.list.element", "m.key_value.value", "f"}
    assert set(cols) == floats | {"id", "tokens.list.element", "s.k", "m.key_value.key"}
    for path, col in cols.items():
        dictionary = any("DICTIONARY" in e for e in col.encodings)
        assert dictionary == (path not in floats) and col.is_stats_set == (path not in floats), path
        assert ("BYTE_STREAM_SPLIT" in col.encodings) == (path in floats), path
    assert s.read_parquet("t.parquet").equals(t)
    s.write_parquet("u.parquet", t, use_dictionary=True)
    meta = pq.ParquetFile(tmp_path / "u.parquet").metadata.row_group(0)
    assert all(any("DICTIONARY" in e for e in meta.column(i).encodings) for i in range(meta.num_columns))
    s.write_parquet("n.parquet", t, compression="none")  # uncompressed: nothing to split for
    meta = pq.ParquetFile(tmp_path / "n.parquet").metadata.row_group(0)
    assert not any("BYTE_STREAM_SPLIT" in meta.column(i).encodings for i in range(meta.num_columns))
    assert s.read_parquet("n.parquet").equals(t)
    s.write_parquet("e.parquet", pa.table({"f": pa.array([1.0])}))  # no leaf keeps a dictionary
    assert s.read_parquet("e.parquet").column("f").to_pylist() == [1.0]


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    s = Storage(str(tmp_path))
    s.write_bytes("x.bin", b"1" * 100)
    s.write_bytes("x.bin", b"2" * 10)
    assert s.read_bytes("x.bin") == b"2" * 10
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_list_shards_folder_glob_file_and_errors(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "in" / "sub").mkdir(parents=True)
    for p in ["in/b.parquet", "in/a.parquet", "in/sub/c.parquet", "in/_tmp.parquet", "in/notes.txt"]:
        f = tmp_path / p
        if p.endswith(".parquet"):
            pq.write_table(pa.table({"x": [1]}), f)
        else:
            f.write_text("x")
    shards = list_shards(str(tmp_path / "in"))
    assert [s.split("/in/")[1] for s in shards] == ["a.parquet", "b.parquet", "sub/c.parquet"]
    assert len(list_shards(str(tmp_path / "in" / "*.parquet"))) == 3  # glob matches as given
    assert list_shards(str(tmp_path / "in" / "a.parquet")) == [str(tmp_path / "in" / "a.parquet")]
    assert shard_key(shards[2], str(tmp_path / "in")) == "sub--c"
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no Parquet shards found"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))


def test_s3_roundtrip(s3_bucket):
    bucket, opts = s3_bucket
    s = Storage(f"s3://{bucket}/out", opts)
    s.write_json("m.json", {"ok": True})
    s.write_parquet("v/p.parquet", pa.table({"a": [1]}))
    s.write_arrow("w/x.arrow", pa.table({"a": [1.5]}))
    assert s.read_json("m.json") == {"ok": True}
    assert s.read_arrow("w/x.arrow").column("a").to_pylist() == [1.5]
    assert s.list("v") == ["p.parquet"]
    assert list_shards(f"s3://{bucket}/out/v", opts) == [f"s3://{bucket}/out/v/p.parquet"]


def test_arrow_lists_named_as_parquet_reads_them(tmp_path):
    """A staged Arrow IPC table cast to parquet_list_names has the types its Parquet round trip has
    (lists' items named "element"), for flat, fixed-size, large and nested lists, without a copy."""
    import numpy as np

    t = pa.table({
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 3),
        "tokens": pa.array([["a"], ["b", "c"]], pa.list_(pa.string())),
        "big": pa.array([[1], []], pa.large_list(pa.int64())),
        "s": pa.array([{"x": [[0.5]]}, {"x": []}]),
        "n": [1, 2],
    })
    s = Storage(str(tmp_path))
    s.write_parquet("t.parquet", t)
    s.write_arrow("t.arrow", t)
    staged = s.read_arrow("t.arrow")
    assert staged.schema.field("vector").type.value_field.name == "item"
    cast = staged.cast(parquet_list_names(staged.schema))
    assert cast.schema == s.read_parquet("t.parquet").schema and cast.equals(s.read_parquet("t.parquet"))
    assert cast.column("vector").chunk(0).values.buffers()[1].address == staged.column("vector").chunk(0).values.buffers()[1].address


def test_parquet_written_a_table_at_a_time(tmp_path):
    """write_parquet_batches: a row group per table as they come, write_parquet's options (floats
    byte-stream split), committed whole; no table gives an empty file of the schema."""
    import numpy as np
    import pyarrow.parquet as pq

    schema = pa.schema([("w", pa.string()), ("v", pa.list_(pa.float32(), 2))])
    parts = [pa.table({"w": [f"a{i}", f"b{i}"], "v": pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(4, dtype=np.float32) + i), 2)}, schema=schema) for i in range(3)]
    s = Storage(str(tmp_path))
    s.write_parquet_batches("p.parquet", schema, iter(parts))
    f = pq.ParquetFile(tmp_path / "p.parquet")
    assert f.metadata.num_row_groups == 3 and "BYTE_STREAM_SPLIT" in f.metadata.row_group(0).column(1).encodings
    assert s.read_parquet("p.parquet").equals(pa.concat_tables(parts))
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]  # no temporary file left

    def failing():
        yield parts[0]
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        s.write_parquet_batches("p.parquet", schema, failing())
    assert s.read_parquet("p.parquet").equals(pa.concat_tables(parts))  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]
    s.write_parquet_batches("e.parquet", schema, iter([]))
    assert s.read_parquet("e.parquet").schema == pq.read_schema(tmp_path / "p.parquet") and s.read_parquet("e.parquet").num_rows == 0
