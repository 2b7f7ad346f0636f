import pyarrow as pa
import pytest

from embedjob.storage import Storage, StorageError, list_shards, shard_key


@pytest.mark.parametrize("root", ["local", "memory"])
def test_roundtrip(tmp_path, root):
    url = str(tmp_path / "out") if root == "local" else "memory://embedjob-test/out"
    s = Storage(url)
    s.write_json("a/b.json", {"x": 1})
    assert s.read_json("a/b.json") == {"x": 1}
    s.write_parquet("t/p.parquet", pa.table({"a": [1, 2]}))
    assert s.read_parquet("t/p.parquet").column("a").to_pylist() == [1, 2]
    assert s.list("t") == ["p.parquet"]
    assert s.list("missing") == []
    s.delete("a", recursive=True)
    assert not s.exists("a/b.json")


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
    assert s.read_json("m.json") == {"ok": True}
    assert s.list("v") == ["p.parquet"]
    assert list_shards(f"s3://{bucket}/out/v", opts) == [f"s3://{bucket}/out/v/p.parquet"]
