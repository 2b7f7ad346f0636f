"""output.reuse: a rerun encodes only new and changed documents (issue 29). Real local Ray, real
files, the tiny model; each test runs the job twice or more on the same output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.pipeline import run_job
from embedjob.stages.reuse import lookup as reuse_lookup
from tests.conftest import SAMPLE_TEXTS
from tests.helpers import kill_driver_when, small_job, small_job_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [f"{t} number {i}" for i in range(8) for t in SAMPLE_TEXTS]  # 96 documents
IDS = [f"doc-{i:05d}" for i in range(len(TEXTS))]


def _write(folder, ids, texts, n_shards):
    """Contiguous cuts of (ids, texts) into ``n_shards`` files (the folder's old files go)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    bounds = np.linspace(0, len(ids), n_shards + 1).astype(int)
    for s in range(n_shards):
        a, b = bounds[s], bounds[s + 1]
        pq.write_table(pa.table({"id": ids[a:b], "text": texts[a:b]}), os.path.join(folder, f"part-{s:05d}.parquet"))


def _vectors(out):
    t = pq.read_table(os.path.join(out, "vectors"), columns=["id", "vector"])
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id twice in vectors/"
    return dict(zip(ids, np.asarray(t.column("vector").to_pylist(), dtype=np.float32)))


def _docs(res):
    return res.manifest["totals"]["documents"]


def _job(tmp_path, model, **sections):
    return small_job(tmp_path / "in", tmp_path / "out", model, **sections)


def test_repartition_edit_append_and_recipe_change(ray_local, tmp_path, tiny_model, monkeypatch):
    chunked = {"encode": {"write_chunks": True, "max_length": 12}}
    _write(tmp_path / "in", IDS, TEXTS, 4)
    first = run_job(_job(tmp_path, tiny_model, **chunked))
    assert _docs(first)["encoded"] == len(IDS) and _docs(first)["reused"] == 0
    before = _vectors(tmp_path / "out")
    chunks_before = pq.read_table(tmp_path / "out" / "chunks").sort_by([("id", "ascending"), ("chunk", "ascending")])
    # the same documents re-partitioned from 4 shards into 7: nothing encoded, the same vectors by id
    monkeypatch.setattr(reuse_lookup, "ROWS_PER_PARTITION", 20)  # 5 partitions: the join runs partition by partition
    _write(tmp_path / "in", IDS, TEXTS, 7)
    res = run_job(_job(tmp_path, tiny_model, **chunked))
    assert res.ok
    assert _docs(res) == {"encoded": 0, "reused": len(IDS), "removed": 0}
    assert res.manifest["stages"]["reuse"]["partitions"] == 5
    after = _vectors(tmp_path / "out")
    assert sorted(after) == sorted(IDS)
    assert all(np.array_equal(before[i], after[i]) for i in IDS)  # copied, bit for bit
    chunks_after = pq.read_table(tmp_path / "out" / "chunks").sort_by([("id", "ascending"), ("chunk", "ascending")])
    cols = ["id", "chunk", "start_char", "end_char", "n_tokens", "vector"]
    assert chunks_after.select(cols).equals(chunks_before.select(cols))
    tokens = pq.read_table(tmp_path / "out" / "tokens")
    assert sorted(tokens.column("id").to_pylist()) == sorted(IDS)
    assert not (tmp_path / "out" / "_tmp" / "_reuse").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "vectors").iterdir()) == [f"part-{s:05d}.parquet" for s in range(7)]
    # two rows of one shard edited: two documents encoded, the shard's others copied, the rest unchanged
    texts = list(TEXTS)
    texts[3], texts[7] = "An edited text about rivers.", "Another edited text, about mountains."
    n0 = len(pq.read_table(tmp_path / "in" / "part-00000.parquet"))  # the only file rewritten
    pq.write_table(pa.table({"id": IDS[:n0], "text": texts[:n0]}), tmp_path / "in" / "part-00000.parquet")
    res = run_job(_job(tmp_path, tiny_model, **chunked))
    assert _docs(res)["encoded"] == 2 and _docs(res)["reused"] == n0 - 2
    assert res.manifest["stages"]["reuse"]["changed"] == 2 and res.manifest["totals"]["skipped_unchanged"] == 6
    after = _vectors(tmp_path / "out")
    assert not np.allclose(before[IDS[3]], after[IDS[3]])
    assert all(np.array_equal(before[i], after[i]) for i in IDS if i not in (IDS[3], IDS[7]))
    # a shard appended: only its documents are encoded
    new_ids = [f"new-{i}" for i in range(10)]
    pq.write_table(pa.table({"id": new_ids, "text": [f"A new document {i} about boats." for i in range(10)]}),
                   tmp_path / "in" / "part-00007.parquet")
    res = run_job(_job(tmp_path, tiny_model, **chunked))
    assert _docs(res)["encoded"] == 10 and _docs(res)["reused"] == 0
    assert sorted(_vectors(tmp_path / "out")) == sorted(IDS + new_ids)
    # a recipe change (pooling) encodes every document again
    res = run_job(_job(tmp_path, tiny_model, encode={**chunked["encode"], "pooling": "cls"}))
    assert _docs(res)["encoded"] == len(IDS) + 10 and _docs(res)["reused"] == 0


def test_reuse_off_and_overwrite_encode_everything():
    from embedjob.stages.reuse.stage import off_reason
    from embedjob.stages.write import OutputConfig

    assert off_reason(OutputConfig()) is None
    assert off_reason(OutputConfig(reuse="off")) == "output.reuse is off"
    assert "overwrite" in off_reason(OutputConfig(overwrite=True))


STATIC = {"static": {"enabled": True, "min_count": 1, "postprocess": "none"}}


def _static(out):
    """The static word vectors by word (float64) and their counts."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors.load_word2vec_format(str(out / "static" / "vectors.bin"), binary=True)
    return ({w: kv[w].astype(np.float64) for w in kv.index_to_key},
            {w: kv.get_vecattr(w, "count") for w in kv.index_to_key})


def _same_static(a, b):
    (va, ca), (vb, cb) = _static(a), _static(b)
    assert ca == cb  # counts are exact: each occurrence counted once
    assert all(np.allclose(va[w], vb[w], atol=1e-5) for w in va)


def test_static_vectors_with_reuse_equal_a_clean_run(ray_local, tmp_path, tiny_model):
    """Static word vectors on: re-partitioning 4 shards into 7 encodes nothing (the old shards' parts
    are carried whole); editing 2 rows encodes again the other documents of their old part (an old
    contribution cannot be taken out of a sum), unchanged shards holding some included; an appended
    shard encodes its own. The static vectors equal a clean run's on the same corpus."""
    _write(tmp_path / "in", IDS, TEXTS, 4)
    first = run_job(_job(tmp_path, tiny_model, **STATIC))
    assert first.ok and _docs(first)["encoded"] == len(IDS)
    shutil.copytree(tmp_path / "out" / "static", tmp_path / "first_static" / "static")
    _write(tmp_path / "in", IDS, TEXTS, 7)  # 4 -> 7: every old part's documents survive, unchanged
    res = run_job(_job(tmp_path, tiny_model, **STATIC))
    assert _docs(res) == {"encoded": 0, "reused": len(IDS), "removed": 0}
    assert res.manifest["stages"]["reuse"]["static"]["homes_carried"] == 4
    assert len(list((tmp_path / "out" / "static" / "carried").iterdir())) == 4
    _same_static(tmp_path / "out", tmp_path / "first_static")
    # 2 rows of part-00000 (rows 0-12) edited: their old part (old shard 0, 24 documents) is encoded again; the
    # unchanged part-00001 holds some of them and is processed again, its others copied
    texts = list(TEXTS)
    texts[3], texts[7] = "An edited text about rivers.", "Another edited text, about mountains."
    n0 = len(pq.read_table(tmp_path / "in" / "part-00000.parquet"))
    pq.write_table(pa.table({"id": IDS[:n0], "text": texts[:n0]}), tmp_path / "in" / "part-00000.parquet")
    new_ids = [f"new-{i}" for i in range(10)]  # and a shard appended: its 10 documents encoded
    pq.write_table(pa.table({"id": new_ids, "text": [f"A new document {i} about boats." for i in range(10)]}),
                   tmp_path / "in" / "part-00007.parquet")
    res = run_job(_job(tmp_path, tiny_model, **STATIC))
    st = res.manifest["stages"]["reuse"]["static"]
    assert res.ok and _docs(res)["encoded"] == 24 + 10 and st["homes_encoded_again"] == 1
    assert st["unchanged_shards_processed_again"] == ["part-00001"] and st["documents_encoded_again"] == 22
    assert _docs(res)["reused"] == 3  # part-00001's rows of old shard 1 (rows 13-26 of 0-95: 11 of shard 0)
    # the encoded-again home's carried part is named by no marker any more: removed; the other 3 stay
    assert res.manifest["stages"]["static"]["carried_parts_removed"] == 1
    assert len(list((tmp_path / "out" / "static" / "carried").iterdir())) == 3
    fresh = run_job(small_job(tmp_path / "in", tmp_path / "fresh", tiny_model, **STATIC))
    assert fresh.ok
    _same_static(tmp_path / "out", tmp_path / "fresh")
    got, want = _vectors(tmp_path / "out"), _vectors(tmp_path / "fresh")
    assert sorted(got) == sorted(want) and all(np.allclose(got[i], want[i], atol=1e-5) for i in want)


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True])
def test_kill_during_reuse_then_rerun_is_exactly_once(ray_local, tmp_path, tiny_model, static):
    """Killed mid-commits, rerun: each id once, reused rows bit for bit, the rest as a run without the
    kill; with static word vectors on, the static vectors too (no home counted twice or dropped)."""
    _write(tmp_path / "in", IDS, TEXTS, 4)
    job = {"input": {"rows_per_block": 4}, "encode": {"rows_per_call": 4, "actors": 1},
           **(STATIC if static else {})}
    run_job(_job(tmp_path, tiny_model, **job))
    before = _vectors(tmp_path / "out")
    # re-partitioned into 8 with edited documents: without static one in each new shard (every shard
    # encodes one); with static two of old shard 1 (its part is encoded again, the 3 others carried)
    texts = list(TEXTS)
    where = [30, 40] if static else range(6, len(IDS), 12)
    edited = [IDS[i] for i in where]
    for i in where:
        texts[i] = f"Edited document {i} about a long journey across the sea."
    _write(tmp_path / "in", IDS, texts, 8)
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({**small_job_data(tmp_path / "in", tmp_path / "out", tiny_model, **job),
                                "ray": {"num_cpus": 2}}))
    env = {**os.environ, "RAY_ADDRESS": "", "EMBEDJOB_DEBUG_ENCODE_DELAY": "1.0"}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", "run", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done = tmp_path / "out" / "_done"

    def reused_commits():
        return [p for p in done.glob("part-*.json") if "reuse" in json.loads(p.read_text())]

    kill_driver_when(proc, lambda: len(reused_commits()) >= 2)
    assert 2 <= len(reused_commits()) < 8
    res = run_job(_job(tmp_path, tiny_model, **job))
    assert res.ok
    after = _vectors(tmp_path / "out")
    assert sorted(after) == sorted(IDS)  # every id exactly once
    if not static:
        assert all(np.array_equal(before[i], after[i]) for i in IDS if i not in edited)
    fresh = tmp_path / "fresh"
    run_job(small_job(tmp_path / "in", fresh, tiny_model, **job))
    ref = _vectors(fresh)
    assert all(np.allclose(ref[i], after[i], atol=1e-5) for i in IDS)  # as a run without the kill
    assert len(pq.read_table(tmp_path / "out" / "tokens").column("id")) == len(IDS)
    if static:
        _same_static(tmp_path / "out", fresh)


def test_bench_reuse_smoke(ray_local, tmp_path, tiny_model, capsys):
    from embedjob.cli import main

    _write(tmp_path / "corpus", IDS[:24], TEXTS[:24], 2)
    capsys.readouterr()
    assert main(["bench", "reuse", "--corpus", str(tmp_path / "corpus"), "--shards", "2", "--into", "3",
                 "--model", tiny_model, "--workdir", str(tmp_path / "work"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["documents"] == 24 and res["first"]["encoded"] == 24
    assert res["rerun"]["encoded"] == 0 and res["rerun"]["reused"] == 24
    assert res["rerun_share_of_first"] > 0


def test_merge_puts_reused_rows_in_row_order_with_their_windows():
    """copy.merge, without Ray: int8 vectors as stored, and each document's windows kept together."""
    from embedjob.stages.reuse.copy import ReusedRows, _chunk_groups, merge
    from embedjob.vector_codec import codec_of, encode, with_codec

    def vec_table(ids, x):
        arr, codec = encode(np.asarray(x, np.float32), "int8", int8_max=1.0)
        t = pa.table({"id": ids, "vector": arr, "n_tokens": pa.array([5] * len(ids), pa.int32()),
                      "text_hash": pa.array([bytes([i]) * 16 for i in range(len(ids))], pa.binary(16))})
        return t.replace_schema_metadata(with_codec(t.schema, codec).metadata)

    def chunk_table(ids, chunks):
        return pa.table({"id": ids, "chunk": pa.array(chunks, pa.int32()),
                         "vector": pa.array([[0.5, 0.5]] * len(ids), pa.list_(pa.float32()))})

    new = vec_table(["b", "d"], [[0.1, 0.2], [0.3, -0.4]])
    old = vec_table(["a", "c"], [[-0.1, 0.9], [0.5, 0.5]])
    old_chunks = chunk_table(["a", "a", "c"], [0, 1, 0])
    assert _chunk_groups(old_chunks, old).tolist() == [0, 0, 1]
    reused = ReusedRows(np.array([0, 2]), old, pa.table({"id": ["a", "c"], "tokens": [["x"], ["y"]]}),
                        old_chunks, np.array([0, 0, 2]))
    v, t, c, rows = merge(reused, new, pa.table({"id": ["b", "d"], "tokens": [["p"], ["q"]]}),
                          chunk_table(["b", "d", "d"], [0, 0, 1]), np.array([1, 3]), np.array([1, 3, 3]))
    assert rows.tolist() == [0, 1, 2, 3] and v.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert t.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert list(zip(c.column("id").to_pylist(), c.column("chunk").to_pylist())) == [
        ("a", 0), ("a", 1), ("b", 0), ("c", 0), ("d", 0), ("d", 1)]
    assert codec_of(v.schema)["dtype"] == "int8" and v.column("vector").type.value_type == pa.int8()
    assert v.column("vector")[0].as_py() == old.column("vector")[0].as_py()  # as stored, not re-quantised


def test_lance_rerun_merges_changed_rows_by_id(ray_local, tmp_path, tiny_model):
    """output.lance with reuse: a rerun puts its 2 edited documents into the dataset by id and deletes
    the 3 removed ones in one new version (then the index's); the first version's fragments stay."""
    import lance

    ids, texts = IDS[:48], list(TEXTS[:48])
    lance_out = {"output": {"lance": True, "carry_columns": ["text"], "lance_index": "ivf_hnsw_sq",
                            "lance_index_min_rows": 10}}
    _write(tmp_path / "in", ids, texts, 4)
    assert run_job(_job(tmp_path, tiny_model, **lance_out)).ok
    uri = str(tmp_path / "out" / "lance" / "docs.lance")
    v1 = lance.dataset(uri)
    files_v1 = {f.fragment_id: [d.path for d in f.metadata.files] for f in v1.get_fragments()}
    texts[5], texts[30] = "An edited text about rivers.", "Another edited text, about mountains."
    _write(tmp_path / "in", ids[:-3], texts[:-3], 5)  # 2 edited, 3 removed, cut into 5 shards
    res = run_job(_job(tmp_path, tiny_model, **lance_out))
    assert _docs(res) == {"encoded": 2, "reused": 43, "removed": 3}
    stats = res.manifest["stages"]["lance"]
    assert (stats["mode"], stats["upserted"], stats["deleted"], stats["committed"]) == ("merge", 2, 3, True)
    assert stats["deleted_ids_from"] == "lookup"  # the join's removed ids, not the dataset's id column
    ds = lance.dataset(uri)
    assert stats["index"]["built"]  # the index is built again over the merged version: the merge, then the index
    assert ds.version == v1.version + 2 and [v["version"] for v in ds.versions()][-3:] == [v1.version, v1.version + 1,
                                                                                          ds.version]
    frag_ids = {f.fragment_id for f in ds.get_fragments()}
    assert [set(i["fragment_ids"]) for i in ds.list_indices() if "vector" in i["fields"]] == [frag_ids]
    files_v2 = {f.fragment_id: [d.path for d in f.metadata.files] for f in ds.get_fragments()}
    assert all(files_v2.get(i) == p for i, p in files_v1.items())  # every first-version fragment kept as it was
    assert len(files_v2) == len(files_v1) + 1  # and one fragment of the merged rows
    got = ds.to_table(columns=["id", "vector", "text"])
    assert sorted(got.column("id").to_pylist()) == sorted(ids[:-3])  # every id once
    want = _vectors(tmp_path / "out")
    assert all(np.array_equal(np.asarray(v, np.float32), want[i])
               for i, v in zip(got.column("id").to_pylist(), got.column("vector").to_pylist()))
    assert dict(zip(got.column("id").to_pylist(), got.column("text").to_pylist()))[ids[5]] == texts[5]
    # output.reuse off: the version is rewritten from the shards' fragments (as before issue 29)
    res = run_job(_job(tmp_path, tiny_model, output={**lance_out["output"], "reuse": "off"}))
    assert res.manifest["stages"]["lance"]["mode"] == "overwrite" and lance.dataset(uri).version == ds.version + 2
    assert sorted(lance.dataset(uri).to_table(columns=["id"]).column("id").to_pylist()) == sorted(ids[:-3])


def test_static_homes_plan_without_ray(tmp_path):
    """plan_static, without Ray: a home that lost a document is encoded again, its unchanged holder
    is processed again with its other rows copied (self plan), and a home whose part cannot be found
    is not carried either."""
    from embedjob.stages.reuse.lookup import LookupResult
    from embedjob.stages.reuse.static import plan_static
    from embedjob.storage import Storage

    out = Storage(str(tmp_path))
    previous = {"a": {"commit": "ca", "static_homes": {"h0": [5, 10], "h1": [3, 3]}},  # unchanged
                "b": {"commit": "cb", "static_homes": {"h0": [5, 10]}}}  # rewritten: 1 of its 5 rows edited
    asked = []

    def make_self(key, broken):
        asked.append((key, sorted(broken)))
        return {h: rows for h, rows in {"h1": np.array([7, 8, 9])}.items() if h not in broken}

    def found():
        return LookupResult(homes={"h0": [4, 5]}, by_home={"new": {"h0": np.array([0, 1, 2, 3])}})

    out.write_parquet("static/carried/h1.parquet", pa.table({"word": ["x"]}))
    f = found()
    carry = plan_static(out, f, previous, {"a"}, make_self)
    assert carry.broken == {"h0"} and carry.pulled == ["a"] and carry.dropped == 4 and carry.docs == {"h1": 3}
    assert f.reused["new"].tolist() == [] and f.reused["a"].tolist() == [7, 8, 9]
    out.delete("static/carried/h1.parquet")  # h1's part is gone: a's rows of h1 are encoded again too
    asked.clear()
    f = found()
    carry = plan_static(out, f, previous, {"a"}, make_self)
    assert carry.broken == {"h0", "h1"} and f.reused["a"].tolist() == [] and asked[-1] == ("a", ["h0", "h1"])
    # nothing lost: every home complete, nothing pulled, the matched rows copied
    out.write_parquet("static/carried/h0.parquet", pa.table({"word": ["y"]}))
    f = LookupResult(homes={"h0": [5, 5]}, by_home={"new": {"h0": np.arange(5)}})
    carry = plan_static(out, f, previous, {"a"}, make_self)
    assert (carry.broken, carry.pulled, carry.docs) == (set(), [], {"h0": 10, "h1": 3})
    assert f.reused["new"].tolist() == [0, 1, 2, 3, 4]


def test_copy_reads_only_the_row_groups_of_its_rows(tmp_path):
    """copy._read_stamped with rows: the rows asked for, in order, from the groups that hold them; a
    file of another commit is refused."""
    from embedjob.errors import IncompleteShardError
    from embedjob.stages.reuse.copy import _read_stamped, stamped
    from embedjob.storage import Storage

    out = Storage(str(tmp_path))
    table = pa.table({"id": [f"d{i}" for i in range(50)], "n": list(range(50))})
    out.write_parquet("vectors/a.parquet", stamped(table, "c1"), row_group_size=10)
    take = np.array([3, 15, 16, 42])
    got = _read_stamped(out, "vectors/a.parquet", "c1", "s", take)
    assert got.column("n").to_pylist() == [3, 15, 16, 42]
    with pytest.raises(IncompleteShardError, match="replaced"):
        _read_stamped(out, "vectors/a.parquet", "c2", "s", take)
