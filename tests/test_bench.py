"""Smoke tests of every ``embedjob bench`` subcommand: each runs the real command (``embedjob.cli.main``,
in this process, so the module's one local Ray serves the benches that use one) on a tiny corpus made
here and the tiny random BERT of conftest.py, in seconds, and checks that its output holds the
figures it promises. They say nothing of the figures' values (tiny data, a random model): the
benchmarks themselves measure those."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.bench.proc_cpu import ROLES, process_role
from embedjob.cli import BENCHES, main

# The long-document sources `bench windows` samples (embedjob.bench.windows.SOURCES).
SOURCES = ("linux_kernel_docs", "kjv_chapters", "austen_chapters", "shakespeare_chunks")


def _wordsim_words() -> list[str]:
    from gensim.test.utils import datapath

    words = set()
    with open(datapath("wordsim353.tsv"), encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                words.update(w.lower() for w in line.split("\t")[:2] if w.isalpha())
    return sorted(words)


def make_corpus(folder, n: int = 240, n_shards: int = 3) -> str:
    """``n`` documents (``id``, ``text``, ``source``, ``label``) in ``n_shards`` Parquet files: sentences
    of WordSim-353 words drawn from 4 topics (so the static bench finds its pairs), one in five long
    enough for several windows of the tiny model (128 positions)."""
    rng = random.Random(0)
    words = _wordsim_words()
    topics = [words[i::4] for i in range(4)]
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        rows: dict[str, list] = {"id": [], "text": [], "source": [], "label": []}
        for i in range(s, n, n_shards):
            sentences = 2 + (i % 7) * (6 if i % 5 == 0 else 1)
            text = " ".join(" ".join(rng.choice(topics[i % 4]) for _ in range(8)).capitalize() + "."
                            for _ in range(sentences))
            rows["id"].append(f"doc-{i:05d}")
            rows["text"].append(text)
            rows["source"].append(SOURCES[i % 4])
            rows["label"].append(f"L{(i // 4) % 3}")
        pq.write_table(pa.table(rows), os.path.join(folder, f"part-{s:05d}.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("bench-corpus"))


def bench_json(capsys, *argv: str) -> dict:
    """Run ``embedjob bench ARGV --json`` and return the JSON object it printed last."""
    capsys.readouterr()
    assert main(["bench", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_every_bench_has_a_smoke_test():
    """Every `embedjob bench NAME` has a ``test_bench_NAME...`` in some test file of this folder."""
    import re

    names = set()
    for path in os.listdir(os.path.dirname(os.path.abspath(__file__))):
        if path.startswith("test_") and path.endswith(".py"):
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), path), encoding="utf-8") as f:
                names.update(re.findall(r"^def test_bench_([a-z0-9]+)", f.read(), flags=re.M))
    assert set(BENCHES) <= names, sorted(set(BENCHES) - names)


def bench_json_object(capsys, *argv: str) -> dict:
    """Run ``embedjob bench ARGV --json`` for a bench that prints one indented JSON object."""
    capsys.readouterr()
    assert main(["bench", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_bench_feed(capsys, corpus):
    # the near-free model it builds, the job's own per-shard stages on one shard, the parts in-process
    res = bench_json_object(capsys, "feed", "--corpus", corpus, "--shards", "1", "--rounds", "1", "--static", "on",
                            "--dim", "48")
    assert res["shards"] == 1 and res["rounds"] == 1 and list(res["modes"]) == ["static on"] and res["dim"] == 48
    r = res["modes"]["static on"][0]
    assert r["encoded_tokens"] > 0 and r["per_core"] > 0 and r["tokenizer_per_core"] > 0
    assert r["feed_efficiency"] > 0 and r["efficiency_with_model"] > 0
    assert r["startup"]["encoded_tokens"] < r["encoded_tokens"] and r["startup_cpu_s"] > 0 and "steady_feed_efficiency" in r
    assert r["settled_s"] >= 0  # measured once the previous run's actors had shut down
    # the forward pass as the encoder actors timed it in the same run, left out of the feed efficiency
    assert 0 < r["model_cpu_s"] < r["cpu_s"] and 0 < r["feed_s_per_mtok"] < r["pipeline_s_per_mtok"]
    assert {"tokenize", "model", "static", "write"} <= set(r["parts_s_per_mtok"]), r["parts_s_per_mtok"]
    # MiniLM's tokenizer: the tokenize part went through the chunk cache, which met every chunk once new
    c = r["chunk_cache"]
    assert 0 < c["new_chunks"] < c["chunks"] and c["resets"] == 0, c
    # the CPU by process: every process of the tree has a role, the encoder's and the task workers' grow
    roles = r["cpu_by_role"]
    assert set(roles) == set(ROLES) and abs(sum(roles.values()) - r["cpu_s"]) < 0.1 * len(roles), (roles, r["cpu_s"])
    assert roles["encoder actors"] > r["model_cpu_s"] and roles["task workers"] > 0 and roles["Ray's daemons"] > 0
    assert roles["other"] == 0, roles  # no process left unnamed
    # start-up out (on this tiny corpus only the keys are checked: the difference of two short runs is noise)
    assert set(r["steady_role_s_per_mtok"]) == set(ROLES) and r["steady_feed_efficiency_job_processes"] > 0
    assert r["actor_max_tokens_per_s"] > 0


def test_bench_feed_model_width(tmp_path, capsys):
    """`bench feed --dim`: the near-free model at a real model's width (what the static sums, their
    staged parts and the commit's merge grow with); an odd width is refused in one line."""
    import json

    from embedjob.bench.feed import build_feed_model

    path = build_feed_model(str(tmp_path), 48)
    assert json.loads((tmp_path / "feed-model" / "config.json").read_text())["hidden_size"] == 48
    assert json.loads((tmp_path / "feed-model" / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 48
    assert path == str(tmp_path / "feed-model")
    with pytest.raises(ValueError, match="--dim 33: an even number"):
        build_feed_model(str(tmp_path / "odd"), 33)
    from embedjob.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "feed", "--dim", "33"])
    assert "argument --dim: '33': an even number of at least 2" in capsys.readouterr().err


def test_bench_feed_widths(capsys, corpus):
    """`bench feed --widths`: the parts in-process at each width, static vectors on and off, and the
    static vectors' extra per width and per dimension; a repeated width, or --dim beside it, refused."""
    res = bench_json_object(capsys, "feed", "--corpus", corpus, "--shards", "1", "--rounds", "1", "--widths", "16,48")
    assert res["widths"] == [16, 48] and res["shards"] == 1
    parts = res["parts_s_per_mtok"]
    assert set(parts) == {"16 on", "16 off", "48 on", "48 off"}
    assert parts["48 on"]["static"] > 0 and parts["48 off"]["static"] == 0 and parts["48 on"]["model"] > 0
    assert set(res["static_extra_s_per_mtok"]) == {"16", "48"} and isinstance(res["static_extra_per_dim"], float)
    from embedjob.cli import main

    for argv, said in ((["--widths", "32,32"], "distinct even widths"), (["--dim", "48", "--widths", "32"], "not allowed")):
        with pytest.raises(SystemExit):
            main(["bench", "feed", *argv])
        assert said in capsys.readouterr().err


def test_feed_width_summary_fits_the_static_extra_per_dimension():
    """The medians over rounds, the total around the model (the model left out), the static extra
    (on minus off; the actor's from its own parts) and the least-squares slopes per dimension."""
    import numpy as np

    from embedjob.bench.feed_width import width_summary

    def parts(static, model, io, commit):
        return {"tokenize": 0.4, "static": static, "model": model, "encoder_io": io, "commit": commit}

    runs = {"32 on": [parts(0.2, 5, 0.1, 0.3), parts(0.4, 5, 0.1, 0.3), parts(0.3, 5, 0.1, 0.3)],
            "32 off": [parts(0, 5, 0.1, 0.1)],
            "384 on": [parts(0.9, 50, 0.2, 1.5)], "384 off": [parts(0, 50, 0.1, 0.1)],
            "768 on": [parts(1.7, 90, 0.2, 2.7)], "768 off": [parts(0, 90, 0.1, 0.1)]}
    res = width_summary(runs, [32, 384, 768])
    assert res["parts_s_per_mtok"]["32 on"]["static"] == pytest.approx(0.3)
    assert res["around_model_s_per_mtok"]["32 on"] == pytest.approx(0.4 + 0.3 + 0.1 + 0.3)
    assert res["static_extra_s_per_mtok"] == pytest.approx({32: 0.5, 384: 2.4, 768: 4.4})
    assert res["static_actor_extra_s_per_mtok"] == pytest.approx({32: 0.3, 384: 1.0, 768: 1.8})
    slope = np.polyfit([32, 384, 768], [0.5, 2.4, 4.4], 1)[0]
    assert res["static_extra_per_dim"] == pytest.approx(slope) and 0.005 < slope < 0.006
    assert width_summary({k: runs[k] for k in ("32 on", "32 off")}, [32])["static_extra_per_dim"] is None


@pytest.mark.parametrize("cmdline, role", [
    ("ray::MapWorker(MapBatches(EncodeActor))", "encoder actors"),
    ("ray::MapWorker(MapBatches(EncodeActor)).__call__", "encoder actors"),
    ("ray::ProgressCounter.add", "progress actor"),
    ("ray::_StatsActor", "Ray Data's actors"), ("ray::ActorLocationTracker", "Ray Data's actors"),
    ("ray::_AutoscalingCoordinatorActor", "Ray Data's actors"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "Ray's daemons"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=x", "Ray's daemons"),
    ("ray::DashboardAgent", "Ray's daemons"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py", "Ray's daemons"),
    ("ray::ReadShards->MapBatches(preprocess_batch)", "task workers"), ("ray::IDLE", "task workers"),
    ("/usr/bin/sleep 10", "other"),
])
def test_bench_feed_names_the_role_of_each_process(cmdline, role):
    assert process_role(cmdline) == role


@pytest.mark.slow
def test_bench_faults(capsys, tiny_model, tmp_path):
    # one kill (a subprocess job per run: about two minutes), then the exactly-once checks against a clean run
    res = bench_json_object(capsys, "faults", "--kills", "1", "--docs", "24", "--shards", "2", "--model", tiny_model,
                            "--max-minutes", "8", "--run-timeout", "300", "--workdir", str(tmp_path))
    assert res["ok"] and res["kills"] == 1 and not res["unexpected_exits"], res
    assert res["checks"]["ok"], res["checks"]


def test_bench_index_corpus(capsys, corpus, tiny_model, tmp_path):
    # The command of issue 30 (it crashed with AttributeError: 'EncoderSettings' object has no attribute 'items').
    res = bench_json(capsys, "index", "--corpus", corpus, "--model", tiny_model, "--limit", "150",
                     "--queries", "15", "--kind", "hnsw", "--batch-size", "1", "--repeat", "1",
                     "--cache", str(tmp_path), "--sweep", "16,32")
    assert res["n_vectors"] == 135 and res["n_queries"] == 15 and res["dim"] == 32 and res["kind"] == "hnsw"
    for key in ("recall_at_10", "qps_exact", "qps_ann", "qps_exact_cpu", "qps_ann_cpu", "speedup", "build_seconds"):
        assert res[key] is not None and res[key] >= 0, key
    assert [r["ef_search"] for r in res["sweep"]] == [16, 32]
    assert any(f.startswith("bench-index-") for f in os.listdir(tmp_path))  # the vectors were cached


def test_bench_vectors(capsys, corpus, tiny_model, tmp_path):
    res = bench_json(capsys, "vectors", "--corpus", corpus, "--model", tiny_model, "--limit", "150",
                     "--queries", "15", "--shard-rows", "50", "--encode-sample", "10", "--lance-index", "none",
                     "--cache", str(tmp_path))
    assert res["documents"] == 135 and res["queries"] == 15 and res["shards"] == 3
    assert set(res["dtypes"]) == {"float32", "float16", "int8", "binary"}
    for dtype, row in res["dtypes"].items():
        assert row["bytes_per_vector"] == {"float32": 128, "float16": 64, "int8": 32, "binary": 4}[dtype]
        assert 0 <= row["recall_at_10"] <= 1
        assert row["lance"]["write_seconds"] >= 0 and row["lance_write_share_of_encode"] >= 0
    assert res["dtypes"]["float32"]["recall_at_10"] == 1.0


def test_bench_windows(capsys, corpus, tiny_model):
    res = bench_json(capsys, "windows", "--corpus", corpus, "--model", tiny_model, "--limit", "12", "--k", "3",
                     "--sources", "austen,kernel")
    assert set(res) == {"austen", "kernel"}
    for r in res.values():
        assert r["documents"] == 12
        for mode in ("truncate", "windows", "snapped"):
            assert 0 <= r[f"{mode}_knn_accuracy"] <= 1 and r[f"{mode}_tokens_encoded"] > 0
        assert r["windows_tokens_encoded"] >= r["truncate_tokens_encoded"]
        assert 0 <= r["snapped_sentence_boundaries"] <= 1 and r["windows_seconds_per_token_vs_truncate"] > 0


# slow (suite time): test_bench_encode_batching runs the same encoder path, test_cli the bench's flags
@pytest.mark.slow
def test_bench_encode(capsys, corpus, tiny_model, ray_local):
    res = bench_json(capsys, "encode", "--corpus", corpus, "--model", tiny_model, "--limit", "40", "--rounds", "1",
                     "--dtype", "float32")
    assert res["documents"] == 40 and res["tokens"] > 0
    for key in ("sentence_transformers_tokens_per_s", "encoder_tokens_per_s", "ratio_vs_sentence_transformers",
                "pipeline_tokens_per_s", "pipeline_end_to_end_tokens_per_s", "pipeline_vs_encoder"):
        assert res[key] > 0, key
    assert res["min_cosine"] > 0.999  # the same model and texts: the same vectors
    assert res["pipeline_rows"] == 40
    long = res["long_documents"]
    assert long["documents_over_max_length"] > 0
    assert long["windows"]["tokens_encoded"] > long["truncate"]["tokens_encoded"]


def test_bench_encode_batching(capsys, corpus, tiny_model):
    res = bench_json(capsys, "encode", "--corpus", corpus, "--model", tiny_model, "--limit", "30", "--rounds", "1",
                     "--batching", "--dtype", "float32")
    assert res["documents"] == 30 and res["padded_tokens_per_s"] > 0 and res["packed_tokens_per_s"] > 0
    assert res["packed_vs_padded"] > 0 and 0 <= res["padding_fraction"] < 1
    assert res["min_cosine_packed_vs_padded"] > 0.999


def test_bench_static(capsys, corpus, tiny_model, ray_local):
    res = bench_json(capsys, "static", "--corpus", corpus, "--limit", "60", "--set", f"encode.model={tiny_model}",
                     "--min-count", "1", "--w2v-epochs", "1", "--w2v-dim", "16", "--w2v-workers", "1")
    assert res["documents"] == 60 and res["bert_words"] > 100 and res["pairs_used"] > 100
    for key in ("bert_spearman", "word2vec_spearman", "job_seconds", "encode_docs_per_second"):
        assert isinstance(res[key], float), key


def test_bench_word2vec(capsys, corpus, tmp_path):
    # Last: it runs embedjob's trainer on a Ray of its own (shutting down the module's).
    res = bench_json(capsys, "word2vec", "--corpus", corpus, "--epochs", "1", "--vector-size", "16",
                     "--min-count", "1", "--cache", str(tmp_path))
    assert res["documents"] == 240 and res["tokens_per_epoch"] > 0
    for side in ("gensim", "embedjob"):
        assert res[side]["words_per_s"] > 0 and res[side]["vocabulary"] > 100
        assert isinstance(res[side]["wordsim_spearman"], float)


def test_bench_feed_cuts_a_labelled_subset_into_equal_shards(tmp_path):
    """--where source=a,c: the rows of every shard whose column is one of the values, in corpus order,
    in N shards of equal size; a missing column or no matching row is one line naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedjob.bench.feed import subset_shards

    urls = []
    for k in range(3):
        urls.append(str(tmp_path / f"in-{k}.parquet"))
        pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(6)], "text": ["t"] * 6,
                                 "source": ["a", "b", "c"] * 2}), urls[-1])
    out = tmp_path / "out"
    out.mkdir()
    got = subset_shards(urls, "source=a,c", 3, str(out))
    tables = [pq.read_table(u) for u in got]
    assert [t.num_rows for t in tables] == [4, 4, 4]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert ids == [f"{k}-{i}" for k in range(3) for i in (0, 2, 3, 5)]
    with pytest.raises(ValueError, match="no column 'label'"):
        subset_shards(urls, "label=x", 2, str(out))
    with pytest.raises(ValueError, match="no row"):
        subset_shards(urls, "source=z", 2, str(out))
    with pytest.raises(ValueError, match="COLUMN=V1"):
        subset_shards(urls, "source", 2, str(out))
