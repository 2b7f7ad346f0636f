"""The dedup stage: its algorithms on constructed vectors (planted duplicates found, distinct
vectors never paired, keep policies, partitioned = exact on planted pairs), the stage on vector
shards in the output layout (across shards and runs, clusters joinable in duckdb, a killed commit),
one real job with the packaged MiniLM (near-duplicate texts), bad settings, and the bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.cli import main as cli_main
from embedjob.config import build_config
from embedjob.errors import ConfigError
from embedjob.stages.dedup import DedupConfig
from embedjob.stages.dedup.config import check_dedup, partitions_for
from embedjob.stages.dedup.groups import connected_groups, dropped_at, keep_central, keep_first, keep_longest
from embedjob.stages.dedup.pairs import (
    balance,
    bucket_rows,
    concat_pairs,
    exact_pairs,
    nearest_centroids,
    partition_costs,
    partition_pairs,
    train_kmeans,
    unit_rows,
)
from embedjob.stages.dedup.stage import run_dedup
from embedjob.stages.encode import vectors_to_arrow
from embedjob.storage import Storage
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job, small_job_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _planted(n: int = 2000, dim: int = 48, seed: int = 0):
    """Random unit vectors (no two above cosine ~0.6) with planted copies and small edits:
    returns (x, set of true pairs)."""
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.standard_normal((n, dim)).astype(np.float32))
    plants = {(5, 905): 0.0, (17, 1717): 0.02, (300, 1300): 0.04, (301, 1999): 0.05}  # cosines 1 to ~0.94
    for (a, b), noise in plants.items():
        x[b] = unit_rows((x[a] + noise * rng.standard_normal(dim)).reshape(1, -1).astype(np.float32))[0]
    x[42] = x[5]  # a group of three: 5, 42, 905
    truth = set(plants) | {(5, 42), (42, 905)}
    return x, truth


def _pairs_set(a, b):
    return set(zip(a.tolist(), b.tolist()))


def test_exact_finds_planted_and_never_pairs_distinct():
    x, truth = _planted()
    a, b, cos = exact_pairs(x, 0.9, block_rows=300)  # blocks smaller than the matrix: tiles meet
    assert _pairs_set(a, b) == truth
    assert (a < b).all() and (cos >= 0.9 - 1e-5).all() and (cos <= 1.0).all()
    sims = x @ x.T
    np.fill_diagonal(sims, 0)
    assert int((np.triu(sims) >= 0.9).sum()) == len(truth)  # the construction plants exactly these


def test_exact_incremental_computes_only_pairs_with_new_rows():
    x, truth = _planted()
    a, b, _ = exact_pairs(x, 0.9, block_rows=256, n_old=1000)
    assert _pairs_set(a, b) == {p for p in truth if p[1] >= 1000}


def _partitioned(x, threshold, k, probes, buckets, new=None):
    cent = train_kmeans(x, k, seed=0)
    _, lab = nearest_centroids(x, cent, probes)
    bucket_of = balance(partition_costs(lab, k), buckets)
    parts = []
    for bk in bucket_rows(lab, bucket_of, buckets):
        r = bk["row"]
        parts.append(partition_pairs(x[r], r, bk["part"], bk["base"], threshold,
                                     new=None if new is None else new[r], block_rows=128))
    return concat_pairs(parts)


def test_partitioned_finds_planted_pairs_like_exact():
    x, truth = _planted()
    a, b, cos = _partitioned(x, 0.9, k=16, probes=3, buckets=3)
    assert _pairs_set(a, b) == truth
    new = np.arange(len(x)) >= 1000
    a, b, _ = _partitioned(x, 0.9, k=16, probes=3, buckets=3, new=new)
    assert _pairs_set(a, b) == {p for p in truth if p[1] >= 1000}


def test_routing_sends_each_row_once_per_probe_and_balances():
    lab = np.array([[0, 1], [1, 2], [2, 0], [0, 2]], np.int32)
    bucket_of = np.array([0, 1, 1], np.int32)
    buckets = bucket_rows(lab, bucket_of, 2)
    assert sorted(buckets[0]["row"].tolist()) == [0, 2, 3]
    assert sorted(zip(buckets[1]["row"].tolist(), buckets[1]["part"].tolist())) == [(0, 1), (1, 1), (1, 2), (2, 2), (3, 2)]
    assert buckets[0]["base"].sum() + buckets[1]["base"].sum() == 4  # each row's nearest partition once
    costs = np.array([10.0, 1, 1, 8])
    bucket = balance(costs, 2)
    assert sorted(np.bincount(bucket, weights=costs).tolist()) == [10.0, 10.0]  # largest first, to the least loaded


def test_groups_and_keep_policies():
    members, group = connected_groups(np.array([0, 1, 7]), np.array([1, 2, 9]))
    assert members.tolist() == [0, 1, 2, 7, 9] and group.tolist() == [0, 0, 0, 1, 1]
    ids = np.array(["c", "a", "b", "z", "y"], dtype=object)
    assert keep_first(group, ids).tolist() == [False, True, False, False, True]
    assert keep_longest(group, ids, np.array([5, 5, 9, 3, 3])).tolist() == [False, False, True, False, True]
    assert keep_longest(group, ids, np.array([5, 5, 1, 3, 3])).tolist() == [False, True, False, False, True]  # tie
    assert keep_central(group, ids, np.array([0.9, 0.99, 0.95, 0.5, 0.7])).tolist() == [False, True, False, False, True]
    cos = np.array([0.95, 0.999, 0.92], np.float32)
    at = dropped_at(np.array([0, 1, 7]), np.array([1, 2, 9]), cos, [0.9, 0.99])
    assert at == {"0.9": {"pairs": 3, "groups": 2, "dropped": 3}, "0.99": {"pairs": 1, "groups": 1, "dropped": 1}}


def test_config_defaults_and_partitions():
    c = DedupConfig()
    assert not c.enabled and c.threshold == 0.9 and c.keep == "first"
    assert partitions_for(c, 174_000) == 174
    assert partitions_for(DedupConfig(partition_size=50), 600) == 12


# -- the stage on vector shards ------------------------------------------------------------------
def _write(out: Storage, x: np.ndarray, shard: int, start: int, n: int, n_tokens=None) -> str:
    ids = [f"d{i:05d}" for i in range(start, start + n)]
    toks = np.arange(n, dtype=np.int32) if n_tokens is None else n_tokens
    out.write_parquet(f"vectors/part-{shard:05d}.parquet", pa.table({
        "id": ids, "vector": vectors_to_arrow(x[start:start + n], np.ones(n, bool)), "n_tokens": pa.array(toks)}))
    return out.url(f"vectors/part-{shard:05d}.parquet")


def _ids_pairs(out: Storage):
    t = out.read_parquet("dedup/pairs.parquet")
    return set(zip(t.column("id_a").to_pylist(), t.column("id_b").to_pylist()))


def _named(truth):
    return {(f"d{a:05d}", f"d{b:05d}") for a, b in truth}


@pytest.mark.parametrize("mode", ["exact", "partitioned"])
def test_stage_across_shards_and_runs(tmp_path, ray_local, mode):
    """Shards 0-1, then shard 2 added: the new-old pairs are found, the old pairs reused, not recomputed."""
    x, truth = _planted()
    out = Storage(str(tmp_path / "out"))
    urls = [_write(out, x, s, 700 * s, min(700, 2000 - 700 * s)) for s in range(3)]
    cfg = DedupConfig(enabled=True, mode=mode, partition_size=100, clusters=4)
    first = run_dedup(cfg, out, urls[:2])
    assert _ids_pairs(out) == _named({p for p in truth if p[1] < 1400})
    second = run_dedup(cfg, out, urls)
    assert _ids_pairs(out) == _named(truth)
    assert second["shards_reused"] == 2 and second["documents_new"] == 600
    assert second["pairs_reused"] == first["pairs"] and second["pairs"] == len(truth)
    t = out.read_parquet("dedup/pairs.parquet")
    assert t.column_names == ["id_a", "id_b", "cosine"]
    assert all(a < b for a, b in zip(t.column("id_a").to_pylist(), t.column("id_b").to_pylist()))
    g = out.read_parquet("dedup/groups.parquet")
    assert g.column_names == ["id", "group", "keep"]
    assert sum(g.column("keep").to_pylist()) == second["groups"] == 4
    assert second["dropped"] == g.num_rows - 4 == 5
    assert not out.exists("_tmp/stage-dedup")
    import duckdb  # clusters join the vectors by id

    n, k = duckdb.sql(f"select count(*), count(distinct c.cluster) from '{tmp_path}/out/vectors/*.parquet' v "
                      f"join '{tmp_path}/out/dedup/clusters/*.parquet' c using (id)").fetchall()[0]
    assert n == 2000 and k == 4


def test_keep_longest_and_central_in_the_stage(tmp_path):
    x, _ = _planted()
    out = Storage(str(tmp_path / "out"))
    toks = np.ones(2000, np.int32)
    toks[905] = 50  # the longest of 5, 42, 905
    url = _write(out, x, 0, 0, 2000, toks)
    run_dedup(DedupConfig(enabled=True, keep="longest"), out, [url])
    kept = {r["id"] for r in out.read_parquet("dedup/groups.parquet").to_pylist() if r["keep"]}
    assert "d00905" in kept and "d00005" not in kept
    for mode in ("exact", "partitioned"):  # partitioned: the group means are summed shard by shard
        run_dedup(DedupConfig(enabled=True, keep="central", mode=mode, partition_size=100), out, [url])
        kept = {r["id"] for r in out.read_parquet("dedup/groups.parquet").to_pylist() if r["keep"]}
        assert "d00005" in kept and "d00042" not in kept  # the two equal vectors are nearer their mean than 905


KILL_SCRIPT = """
import os, signal, sys
from embedjob.storage import Storage
from embedjob.stages.dedup import DedupConfig
from embedjob.stages.dedup.stage import run_dedup
method, where = sys.argv[3].split(":")  # _write_with: every committed local write (bytes, Parquet, Arrow)
real = getattr(Storage, method)
def killing(self, *args, **kwargs):
    path = args[-1 if method == "move" else 0]
    if path == where or path.endswith("/" + where):
        os.kill(os.getpid(), signal.SIGKILL)  # killed at this step
    return real(self, *args, **kwargs)
setattr(Storage, method, killing)
out = Storage(sys.argv[1])
run_dedup(DedupConfig(enabled=True, threshold=float(sys.argv[2])), out, [out.url("vectors/part-00000.parquet")])
"""


@pytest.mark.parametrize("kill_at", ["_write_with:groups.parquet", "move:dedup"])
def test_killed_stage_leaves_no_partial_output(tmp_path, kill_at):
    """SIGKILL while the outputs are being written (to the staging folder), or in the commit after
    the previous dedup/ was moved aside: dedup/ is the previous run's whole, or absent, never a mix;
    the rerun puts the previous one back (and reuses it), finishes, and cleans up."""
    x, _ = _planted()
    out = Storage(str(tmp_path / "out"))
    url = _write(out, x, 0, 0, 2000)
    run_dedup(DedupConfig(enabled=True, threshold=0.999), out, [url])
    files = ("pairs.parquet", "groups.parquet", "examples.json", "dedup.json")
    before = {n: (tmp_path / "out" / "dedup" / n).read_bytes() for n in files}
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "0.9", kill_at], cwd=ROOT,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert out.exists("_tmp/stage-dedup")  # what the killed run left, out of sight
    if out.exists("dedup"):
        assert {n: (tmp_path / "out" / "dedup" / n).read_bytes() for n in files} == before
    else:
        assert kill_at.startswith("move")
    again = run_dedup(DedupConfig(enabled=True, threshold=0.999), out, [url])
    assert again["shards_reused"] == 1 and again["pairs_computed"] == 0  # the previous run's pairs, recovered
    assert (tmp_path / "out" / "dedup" / "pairs.parquet").read_bytes() != b""
    assert _ids_pairs(out) == {(a, b) for a, b in _ids_pairs(out)} and len(_ids_pairs(out)) == again["pairs"]
    run_dedup(DedupConfig(enabled=True, threshold=0.9), out, [url])
    assert len(_ids_pairs(out)) == 6 and not out.exists("_tmp/stage-dedup")


# -- a real job: the packaged MiniLM on near-duplicate texts ----------------------------------------
EDITS = {  # a text of SAMPLE_TEXTS -> small edits of it
    0: ["The cat sat on the mat and looked at the dog!", "The cat sat on a mat and looked at the dog."],
    10: ["Heavy storms caused flooding in several coastal towns."],  # an exact copy
    6: ["Scientists discovered a new species of frogs in the rainforest."],
}


def test_job_finds_near_duplicate_texts_across_shards_and_runs(ray_local, tmp_path, minilm_path):
    texts = list(SAMPLE_TEXTS) + [e for k in sorted(EDITS) for e in EDITS[k][:1]]
    ids = write_shards(tmp_path / "in", texts, n_shards=2)
    cfg = small_job(tmp_path / "in", tmp_path / "out", minilm_path, dedup={"enabled": True, "clusters": 3})
    from embedjob.pipeline import run_job

    first = run_job(cfg).manifest["stages"]["dedup"]
    out = Storage(str(tmp_path / "out"))
    want = {tuple(sorted((ids[k], ids[12 + i]))) for i, k in enumerate(sorted(EDITS))}
    assert _ids_pairs(out) == want  # every planted edit found, no two distinct texts paired
    assert first["pairs"] == 3 and first["groups"] == 3 and first["dropped"] == 3 and first["documents"] == 15
    assert first["mode"] == "exact" and "seconds" in first
    assert run_job(cfg).manifest["stages"]["dedup"]["status"] == "skipped-unchanged"  # nothing computed
    # a new shard: duplicates of documents of the old shards are found, the old pairs are reused
    pq.write_table(pa.table({"id": ["new-0", "new-1"], "text": [EDITS[0][1], "An entirely new sentence about tea."]}),
                   tmp_path / "in" / "part-00009.parquet")
    third = run_job(cfg).manifest["stages"]["dedup"]
    assert third["status"] == "done" and third["shards_reused"] == 2 and third["documents_new"] == 2
    assert third["pairs_reused"] == 3
    assert {(ids[0], "new-0"), (ids[12], "new-0")} <= _ids_pairs(out) and third["groups"] == 3
    report = (tmp_path / "out" / "report.html").read_text()
    assert 'id="dedup"' in report and "The cat sat on the mat" in report  # a group with its first lines
    assert "coloured by k-means cluster" in report


def test_bad_dedup_settings_exit_2_with_one_line(tmp_path, capsys, tiny_model):
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match="dedup.threshold"):
            build_config({"dedup": {"threshold": bad}})
    assert build_config({"dedup": {"threshold": 1}}).dedup.threshold == 1.0
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(small_job_data(tmp_path / "in", tmp_path / "out", tiny_model, dedup={"enabled": True})))
    cases = {"dedup.threshold=1.5": "dedup.threshold",
             "dedup.clusters=13": "dedup.clusters=13 is more than the 12 documents",
             "output.vector_dtype=binary": "output.vector_dtype=binary"}
    for override, message in cases.items():
        assert cli_main(["run", str(spec), "--set", override]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out" / "vectors").exists()  # before any work
    check_dedup(DedupConfig(enabled=False, clusters=99), "binary", 3)  # off: nothing to check


def test_clusters_more_than_documents_with_a_vector_fail_in_the_stage(tmp_path):
    x, _ = _planted()
    out = Storage(str(tmp_path / "out"))
    url = _write(out, x, 0, 0, 300)
    with pytest.raises(ConfigError, match="dedup.clusters=301"):
        run_dedup(DedupConfig(enabled=True, clusters=301), out, [url])
    assert not out.exists("dedup")


def test_bench_dedup_smoke(tmp_path, capsys):
    """`embedjob bench dedup` on a tiny job output: recall 1 where exact, the plan where partitioned."""
    x, truth = _planted()
    out = Storage(str(tmp_path / "out"))
    _write(out, x, 0, 0, 600)
    _write(out, x, 1, 600, 600)
    rc = cli_main(["bench", "dedup", "--vectors", str(tmp_path / "out"), "--sizes", "1200", "--modes",
                   "exact,partitioned", "--set", "partition_size=100", "--queries", "1200", "--shard-rows", "400",
                   "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["mode"]: r for r in res["rows"]}
    assert rows["exact"]["recall"] == 1.0 and rows["exact"]["precision"] == 1.0
    assert rows["exact"]["true_pairs_sampled"] == len({p for p in truth if p[1] < 1200})
    assert rows["partitioned"]["plan"]["partitions"] == 12 and rows["partitioned"]["recall"] is not None
    assert rows["partitioned"]["seconds"] > 0 and rows["partitioned"]["driver_peak_rss_mb"] > 0


def test_bench_vectors_are_cached(tmp_path, tiny_model):
    """The bench's own vectors: encoded (or token means) once, read back from the cache."""
    from embedjob.bench.dedup_vectors import corpus_vectors, token_mean_vectors

    ids = write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=2)
    cache = str(tmp_path / "cache")
    for make in (lambda: corpus_vectors(str(tmp_path / "in"), cache, model=tiny_model, max_length=16, backend="torch"),
                 lambda: token_mean_vectors(str(tmp_path / "in"), cache, model=tiny_model, max_length=16)):
        x, got, meta = make()
        assert x.shape == (12, 32) and sorted(got) == sorted(ids) and meta["documents"] == 12
        x2, got2, meta2 = make()  # from the cache: same vectors, same recorded encode time
        assert np.array_equal(x, x2) and got2 == got and meta2["encode_seconds"] == meta["encode_seconds"]
