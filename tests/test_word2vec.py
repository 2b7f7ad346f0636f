"""Word2Vec / FastText data-parallel with Ray Train (issues 5 and 10).

A synthetic corpus with planted structure: words fall into four groups and every document draws
its words from one group, so a good model puts words of a group close together. The building
blocks are tested without Ray; each Ray Train run (tens of seconds of start-up on a busy 2-core
machine) checks as much as it can.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from embedjob.config import ConfigError, JobConfig
from embedjob.stages.word2vec import Word2VecConfig
from embedjob.stages.word2vec.model import apply_init, new_model, word_frequencies
from embedjob.stages.word2vec.segments import split_segments
from embedjob.stages.word2vec.stage import run_word2vec, train_word2vec
from embedjob.storage import Storage
from embedjob.token_shards import plan_slices, read_slices
from embedjob.wordvectors import load_job_vectors

PREFIXES = ["zebra", "quartz", "violet", "marble"]
SUFFIXES = ["ka", "ko", "mi", "nu", "pe", "ri", "so", "tu", "ve", "wy", "xa", "yo"]


def group_of(word: str) -> str:
    return next(p for p in PREFIXES if word.startswith(p))


def synthetic_docs(n_docs: int = 1600, length: int = 20, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        p = PREFIXES[i % len(PREFIXES)]
        # Zipf-ish frequencies inside a group, so counts differ and trimming rules matter.
        probs = 1.0 / np.arange(1, len(SUFFIXES) + 1)
        probs /= probs.sum()
        docs.append([p + SUFFIXES[j] for j in rng.choice(len(SUFFIXES), size=length, p=probs)])
    docs[5] = []  # an empty document, as the preprocess stage writes for empty text
    docs[7] = docs[7] + ["rareword"]  # below min_count=2
    return docs


def write_token_shards(folder, docs, n_shards: int = 3, *, store: Storage | None = None) -> list[str]:
    store = store or Storage(str(folder))
    urls = []
    for s in range(n_shards):
        part = docs[s::n_shards]
        table = pa.table({"id": [f"d{s}-{i}" for i in range(len(part))],
                          "tokens": pa.array(part, type=pa.list_(pa.string()))})
        store.write_parquet(f"tokens/part-{s:05d}.parquet", table, row_group_size=100)
        urls.append(store.url(f"tokens/part-{s:05d}.parquet"))
    return urls


def group_margin(kv) -> float:
    """Mean cosine of same-group pairs minus mean cosine of cross-group pairs."""
    words = [w for w in kv.index_to_key if any(w.startswith(p) for p in PREFIXES)]
    same, cross = [], []
    for i, a in enumerate(words):
        for b in words[i + 1:]:
            (same if group_of(a) == group_of(b) else cross).append(kv.similarity(a, b))
    return float(np.mean(same) - np.mean(cross))


def small_cfg(**kw) -> Word2VecConfig:
    base = dict(vector_size=24, window=3, min_count=2, epochs=5, workers=2, sample=0, seed=3, bucket=4000,
                min_n=3, max_n=5)
    base.update(kw)
    return Word2VecConfig(**base)


# -- building blocks, no Ray ----------------------------------------------------------------------
def test_vocabulary_matches_gensim_rules():
    from gensim.models import Word2Vec

    from embedjob.stages.vocab import dictionary_from_counts

    docs = synthetic_docs(400)
    cfs = {}
    for d in docs:
        for w in d:
            cfs[w] = cfs.get(w, 0) + 1
    from collections import Counter

    dictionary = dictionary_from_counts(Counter(cfs), Counter(), len(docs), sum(cfs.values()))
    for kw in ({"min_count": 2}, {"min_count": 2, "max_final_vocab": 30}):
        cfg = small_cfg(**kw)
        ours = new_model(cfg, word_frequencies(dictionary, cfg.min_count), len(docs))
        ref = Word2Vec(vector_size=24, min_count=cfg.min_count, max_final_vocab=cfg.max_final_vocab, sample=0)
        ref.build_vocab(docs)
        assert set(ours.wv.index_to_key) == set(ref.wv.index_to_key)
        assert "rareword" not in ours.wv.key_to_index
        for w in ref.wv.index_to_key:
            assert ours.wv.get_vecattr(w, "count") == ref.wv.get_vecattr(w, "count")


@pytest.mark.parametrize("model", ["word2vec", "fasttext"])
def test_same_inputs_give_identical_initial_weights(model):
    from embedjob.stages.word2vec.model import trainable_arrays

    freq = {"a": 9, "b": 7, "c": 7, "d": 3}
    cfg = small_cfg(model=model, min_count=1, bucket=100)
    m1, m2 = new_model(cfg, freq, 4), new_model(cfg, dict(freq), 4)
    assert m1.wv.index_to_key == m2.wv.index_to_key and set(m1.wv.index_to_key) == set(freq)
    for x, y in zip(trainable_arrays(m1), trainable_arrays(m2)):
        assert np.array_equal(x, y)


def test_split_segments_balances_tokens():
    docs = [["w"] * n for n in [5, 1, 1, 1, 8, 2, 2, 4, 0, 6]]
    segs = split_segments(docs, 4)
    assert sum(segs, []) == docs
    sizes = [sum(len(d) for d in s) for s in segs]
    assert max(sizes) <= 12 and min(sizes) >= 4
    assert split_segments([], 3) == [[], [], []]
    assert [len(s) for s in split_segments([["a"]], 4)].count(1) == 1


def test_slices_cover_every_row_once(tmp_path):
    docs = [[f"w{i}", "x"] for i in range(250)]
    urls = write_token_shards(tmp_path, docs, n_shards=3)
    for world in (1, 2, 4):
        plan = plan_slices(urls, {}, world)
        got = [d for r in range(world) for d in read_slices(plan[r], {})]
        assert sorted(map(tuple, got)) == sorted(map(tuple, docs))
        sizes = [sum(b - a for _, a, b in p) for p in plan]
        assert max(sizes) - min(sizes) <= len(urls)


def test_apply_init_frozen_sets_lock_factors():
    cfg = small_cfg(min_count=1)
    m = new_model(cfg, {"a": 5, "b": 4, "c": 3}, 3)
    vecs = np.arange(72, dtype=np.float32).reshape(3, 24)
    rows = apply_init(m, ["c", "zz", "a"], vecs, "frozen")  # "zz" is not in the vocabulary
    assert sorted(rows.tolist()) == [0, 2]
    assert np.array_equal(m.wv["c"], vecs[0]) and np.array_equal(m.wv["a"], vecs[2])
    assert m.wv.vectors_lockf.tolist() == [0.0, 1.0, 0.0]


def test_config_errors():
    with pytest.raises(ValueError, match="negative"):
        Word2VecConfig(negative=0, hs=0)
    with pytest.raises(ValueError):
        Word2VecConfig(init_lock="melted")
    assert Word2VecConfig().sync_every == 0.1
    assert JobConfig().word2vec.model == "word2vec"


# -- with Ray Train -------------------------------------------------------------------------------
def test_one_ray_worker_matches_single_process_gensim(ray_local, tmp_path):
    """Equivalence: 1 Ray worker builds gensim's vocabulary and vectors of the same quality."""
    from gensim.models import Word2Vec

    docs = synthetic_docs()
    urls = write_token_shards(tmp_path, docs)
    cfg = small_cfg(workers=1)
    kv, report = train_word2vec(urls, cfg, {})
    ref = Word2Vec([d for d in docs if d], vector_size=24, window=3, min_count=2, epochs=5, sample=0, seed=3,
                   workers=1)
    assert set(kv.index_to_key) == set(ref.wv.index_to_key)
    assert report["vocabulary"] == len(ref.wv)
    assert report["documents"] == sum(1 for d in docs if d)  # empty documents carry no training signal
    assert report["tokens_per_epoch"] == sum(map(len, docs))
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3, 4, 5]
    assert all(e["loss"] > 0 for e in report["epochs"])
    ours, theirs = group_margin(kv), group_margin(ref.wv)
    assert theirs > 0.3
    assert ours > theirs - 0.15, (ours, theirs)


def test_fasttext_two_workers_vectors_for_unseen_words(ray_local, tmp_path):
    from gensim.models.fasttext import FastTextKeyedVectors

    from embedjob.similar import similar_words

    urls = write_token_shards(tmp_path, synthetic_docs())
    # one machine: both workers train one FastText model (n-gram matrix included) in shared memory
    cfg = JobConfig(word2vec=small_cfg(model="fasttext", workers=2, enabled=True))
    out = Storage(str(tmp_path / "out"))
    stats = run_word2vec(cfg.word2vec, out, urls)
    assert stats["model"] == "fasttext" and stats["workers"] == 2
    assert stats["shared_memory_groups"] == [2] and stats["synced_row_fraction"] == 0.0
    kv = load_job_vectors(out.url(), {}, "word2vec")
    assert isinstance(kv, FastTextKeyedVectors)
    unseen = "zebrakx"
    assert unseen not in kv.key_to_index
    vec = kv[unseen]
    assert vec.shape == (24,) and np.linalg.norm(vec) > 0
    neighbours = similar_words(out.url(), unseen, kind="word2vec", n=5)
    assert sum(group_of(w) == "zebra" for w, _ in neighbours) >= 3, neighbours
    assert group_margin(kv) > 0.2
    # vectors.bin holds the vocabulary words in word2vec binary format
    from gensim.models import KeyedVectors

    bin_kv = KeyedVectors.load_word2vec_format(out.path("word2vec/vectors.bin"), binary=True)
    assert set(bin_kv.index_to_key) == set(kv.index_to_key)
    np.testing.assert_allclose(bin_kv["zebraka"], kv["zebraka"], rtol=1e-6)


def _write_init_text(path, words, dim, seed=11):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(words), dim)).astype(np.float32)
    with open(path, "w") as f:
        f.write(f"{len(words)} {dim}\n")
        for w, v in zip(words, vecs):
            f.write(w + " " + " ".join(repr(float(x)) for x in v) + "\n")
    from gensim.models import KeyedVectors

    return KeyedVectors.load_word2vec_format(path, binary=False)  # the values as gensim reads them


def test_frozen_init_on_s3_keeps_words_bit_identical(ray_local, tmp_path, s3_bucket):
    """Two workers, tokens, init file and outputs on S3 (storage options reach the workers)."""
    from gensim.models import KeyedVectors

    bucket, opts = s3_bucket
    store = Storage(f"s3://{bucket}/job", opts)
    urls = write_token_shards(None, synthetic_docs(), store=store)
    frozen = ["zebraka", "zebrako", "quartzmi", "violetnu"]
    init = _write_init_text(tmp_path / "init.txt", frozen + ["notinvocab"], 24)
    store.upload(str(tmp_path / "init.txt"), "init/vectors.txt")
    wcfg = small_cfg(workers=2, init_from=store.url("init/vectors.txt"), init_lock="frozen", enabled=True)
    stats = run_word2vec(wcfg, store, urls)
    assert stats["init_words"] == 4
    kv = load_job_vectors(store.url(), opts, "word2vec")
    for w in frozen:
        assert np.array_equal(kv[w], init[w]), w
    start = new_model(wcfg, {w: kv.get_vecattr(w, "count") for w in kv.index_to_key}, 1)
    assert not np.allclose(kv["zebraso"], start.wv["zebraso"])  # the others trained
    names = store.list("word2vec")
    assert {"vectors.kv", "vectors.bin", "vectors.vocab.txt", "report.json"} <= set(names)
    report = store.read_json("word2vec/report.json")
    assert report["workers"] == 2 and len(report["epochs"]) == 5
    with store.open("word2vec/vectors.bin") as f:
        data = f.read()
    local = tmp_path / "v.bin"
    local.write_bytes(data)
    assert set(KeyedVectors.load_word2vec_format(str(local), binary=True).index_to_key) == set(kv.index_to_key)


def test_trainable_init_from_native_keyedvectors_moves_words(ray_local, tmp_path):
    from gensim.models import KeyedVectors

    urls = write_token_shards(tmp_path, synthetic_docs())
    words = ["zebraka", "marbleko"]
    init = KeyedVectors(24)
    init.add_vectors(words, np.random.default_rng(5).normal(size=(2, 24)).astype(np.float32))
    init.save(str(tmp_path / "init.kv"))
    cfg = small_cfg(workers=1, init_from=str(tmp_path / "init.kv"), init_lock="trainable", init_trust_pickle=True)
    kv, report = train_word2vec(urls, cfg, {})
    assert report["init_words"] == 2
    for w in words:
        assert not np.allclose(kv[w], init[w])
        # started from the file: still closer to it than to a random start
        assert np.corrcoef(kv[w], init[w])[0, 1] > 0.2


def test_init_dimension_mismatch_and_unreadable_file_are_clear_errors(ray_local, tmp_path):
    urls = write_token_shards(tmp_path, synthetic_docs(200))
    _write_init_text(tmp_path / "small.txt", ["zebraka"], 7)
    with pytest.raises(ConfigError, match=r"7-dimensional.*vector_size is 24"):
        train_word2vec(urls, small_cfg(init_from=str(tmp_path / "small.txt")), {})
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01not vectors at all\xff" * 10)
    with pytest.raises(ConfigError, match="junk.bin.*cannot be read"):
        train_word2vec(urls, small_cfg(init_from=str(tmp_path / "junk.bin")), {})
    with pytest.raises(ConfigError, match="missing.txt.*cannot be read"):
        train_word2vec(urls, small_cfg(init_from=str(tmp_path / "missing.txt")), {})


@pytest.mark.slow
def test_bench_on_a_slice_of_the_shared_corpus(tmp_path, capsys):
    from tests.conftest import SHARED_CORPUS

    if not os.path.isdir(SHARED_CORPUS):
        pytest.skip("shared corpus not present")
    from embedjob.cli import main

    assert main(["bench", "word2vec", "--corpus", SHARED_CORPUS, "--workers", "2", "--max-docs-per-shard", "500", "--epochs", "2",
                 "--cache", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("speed_ratio", "analogy_delta", "wordsim_delta"):
        assert key in out


def test_memory_groups_and_shared_arrays(tmp_path):
    """Workers are grouped by machine; a second model mapping the first one's files trains the very
    same weights (what two worker processes on one machine do, here in one process)."""
    from embedjob.stages.word2vec.model import trainable_arrays, trainable_slots
    from embedjob.stages.word2vec.shared_memory import memory_groups, share_arrays

    assert memory_groups(["10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.1"]) == [[0, 2], [1, 3]]
    docs = [d for d in synthetic_docs(400) if d]
    freq: dict[str, int] = {}
    for d in docs:
        for w in d:
            freq[w] = freq.get(w, 0) + 1
    cfg = small_cfg(min_count=1)
    a, b = new_model(cfg, freq, len(docs)), new_model(cfg, freq, len(docs))
    before = [x.copy() for x in trainable_arrays(a)]
    paths = [str(tmp_path / f"m-{i}") for i in range(len(trainable_slots(a)))]
    share_arrays(a, paths, create=True)
    share_arrays(b, paths, create=False)
    for x, y, z in zip(trainable_arrays(a), trainable_arrays(b), before):
        assert x.flags.writeable and np.array_equal(x, z) and np.array_equal(y, z)
    b.train(corpus_iterable=docs, total_examples=len(docs), epochs=1)
    for x, y, z in zip(trainable_arrays(a), trainable_arrays(b), before):
        assert np.array_equal(x, y) and not np.array_equal(x, z)  # b's training is a's
    with pytest.raises(FileExistsError):
        share_arrays(new_model(cfg, freq, len(docs)), paths, create=True)  # never overwrites a live model


def test_combine_synced_is_exact():
    """A sync on known arrays: 'sum' adds every worker's update to the last synced weights, 'average'
    is the plain mean; both exact for exactly representable values."""
    import torch

    from embedjob.stages.word2vec.sync import combine_synced

    last = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    workers = [last + torch.tensor([[0.5, 0.0], [0.0, -1.0]]), last + torch.tensor([[0.25, 1.0], [2.0, 0.0]]),
               last + torch.tensor([[0.0, 0.0], [-4.0, 0.5]])]
    summed = sum(w.clone() for w in workers)
    prev = last.clone()
    combine_synced(summed, prev, 3)
    expected = last + sum(w - last for w in workers)
    assert torch.equal(summed, expected) and torch.equal(prev, expected)
    summed = sum(w.clone() for w in workers)
    combine_synced(summed, None, 3)
    assert torch.equal(summed, sum(workers) / 3)
    one = last.clone()
    combine_synced(one, None, 1)
    assert torch.equal(one, last)


def test_two_workers_word2vec_learn_planted_groups(ray_local, tmp_path):
    urls = write_token_shards(tmp_path, synthetic_docs())
    kv, report = train_word2vec(urls, small_cfg(workers=2), {})
    assert report["workers"] == 2 and report["shared_memory_groups"] == [2] and report["syncs_per_epoch"] == 0
    assert group_margin(kv) > 0.25
    for w in ("zebraka", "quartzmi"):
        near = [x for x, _ in kv.most_similar(w, topn=5)]
        assert sum(group_of(x) == group_of(w) for x in near) >= 4, (w, near)


def test_worker_failure_fails_the_stage_with_a_clear_message(ray_local, tmp_path, monkeypatch):
    from embedjob.debug import WORD2VEC_FAIL_RANK_ENV as FAIL_RANK_ENV
    from embedjob.errors import Word2VecTrainingError

    urls = write_token_shards(tmp_path, synthetic_docs(200))
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    with pytest.raises(Word2VecTrainingError, match=r"word2vec: Ray Train training failed.*max_failures=0") as e:
        train_word2vec(urls, small_cfg(workers=2), {})
    assert "failure injected" in str(e.value)


def test_touched_rows_are_all_that_training_changes():
    """The sparse sync's premise, checked on gensim itself: training FastText on some documents
    changes no word row and no n-gram row outside :func:`touched_rows` of those documents."""
    from embedjob.stages.word2vec.model import touched_rows, trainable_arrays

    docs = synthetic_docs(400)
    cfg = small_cfg(model="fasttext", min_count=1)
    freq: dict[str, int] = {}
    for d in docs:
        for w in d:
            freq[w] = freq.get(w, 0) + 1
    model = new_model(cfg, freq, len(docs))
    some = [d for d in docs if d and d[0].startswith("zebra")]  # one group's words only
    rows = touched_rows(model, some)
    before = [a.copy() for a in trainable_arrays(model)]
    model.train(corpus_iterable=some, total_examples=len(some), epochs=1)
    after = trainable_arrays(model)
    words, grams = rows[0], rows[1]
    assert {model.wv.index_to_key[i] for i in words} == {w for d in some for w in d}
    assert 0 < len(grams) < model.wv.bucket and rows[2] is None  # syn1neg: whole matrix
    for arr_before, arr_after, r in zip(before, after, rows[:2]):
        changed = np.flatnonzero(np.any(arr_before != arr_after, axis=1))
        assert len(changed) > 0 and set(changed.tolist()) <= set(r.tolist())


# slow: the default suite keeps under 30 min on CI's 2 cores; the sparse sync itself is also unit-tested above
@pytest.mark.slow
def test_sparse_sync_gives_the_same_vectors_as_a_full_sync(ray_local, tmp_path):
    """Two FastText workers whose segments each hold one group of words: exchanging only the touched
    rows gives the same vectors as exchanging whole matrices, with less data moved."""
    docs = sorted((d for d in synthetic_docs(800) if d), key=lambda d: group_of(d[0]))
    urls = write_token_shards(tmp_path, docs, n_shards=1)
    cfg = small_cfg(model="fasttext", workers=2, sync_every=0.25, sparse_sync="true", share_memory=False)
    kv_sparse, rep_sparse = train_word2vec(urls, cfg, {})
    # 'auto' on one node: whole matrices
    kv_dense, rep_dense = train_word2vec(urls, cfg.model_copy(update={"sparse_sync": "auto"}), {})
    assert rep_sparse["sparse_sync"] is True and rep_dense["sparse_sync"] is False
    assert rep_sparse["shared_memory_groups"] == [1, 1] and rep_sparse["syncs_per_epoch"] == 4
    assert rep_dense["synced_row_fraction"] == 1.0
    assert rep_sparse["synced_row_fraction"] < 0.8, rep_sparse["synced_row_fraction"]
    np.testing.assert_allclose(kv_sparse.vectors_vocab, kv_dense.vectors_vocab, rtol=0, atol=1e-6)
    np.testing.assert_allclose(kv_sparse.vectors_ngrams, kv_dense.vectors_ngrams, rtol=0, atol=1e-6)
