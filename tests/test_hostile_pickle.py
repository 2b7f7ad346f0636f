"""embedjob never unpickles what it reads back (the integrity issue, defect 1).

A pickle runs code when loaded, and a job's output folder is often shared storage that others can
write to. The promises, one test (or two) each:

* ``embedjob similar`` reads a job's word vectors from the safe files (``vectors.bin`` + counts,
  FastText n-grams as ``.npy``), never from ``vectors.kv``;
* ``word2vec.init_from`` and ``topics.embeddings`` refuse a pickle (by name before any work, by its
  first byte when read), naming the setting and the safe formats, unless
  ``word2vec.init_trust_pickle`` / ``topics.embeddings_trust_pickle`` is true;
* the topics stage reads ``vocab/dictionary.json``, never ``vocab/dictionary.gensim``;
* the index stage indexes only the word vectors of stages enabled in this run, read from the safe
  files, never ``vectors.kv``;
* the safe files hold what the pickles held: words, vectors, counts, FastText vectors for unseen
  words; the dictionary's token ids and frequencies.

Each planted pickle, when unpickled, runs ``touch <marker>``; a test passes only if no marker appears.
"""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
from collections import Counter

import numpy as np
import pytest
import yaml

from embedjob import cli
from embedjob.config import ConfigError, JobConfig, build_config
from embedjob.storage import Storage
from tests.conftest import SAMPLE_TEXTS, write_shards


class _Hostile:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant(path, marker) -> str:
    """Write a crafted pickle to ``path`` that creates ``marker`` when loaded; returns the marker path."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(_Hostile(str(marker)), f, protocol=4)
    return str(marker)


def _legit_kv(dim: int = 16, words=("cat", "dog", "bank")):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(dim)
    kv.add_vectors(list(words), np.random.default_rng(0).normal(size=(len(words), dim)).astype(np.float32))
    return kv


def _job(inp, out, model, **sections) -> dict:
    data = {"input": {"url": str(inp)}, "output": {"url": str(out)},
            "encode": {"model": model, "dtype": "float32", "rows_per_call": 8},
            "static": {"enabled": True, "min_count": 1},
            "word2vec": {"enabled": False}, "topics": {"enabled": False}, "index": {"enabled": False}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return data


def _run_cli(tmp_path, data: dict, name: str = "job.yaml") -> int:
    spec = tmp_path / name
    spec.write_text(yaml.safe_dump(data))
    return cli.main(["run", str(spec)])


FASTTEXT = {"enabled": True, "model": "fasttext", "workers": 1, "vector_size": 16, "min_count": 1, "epochs": 2,
            "sample": 0, "bucket": 2000, "min_n": 3, "max_n": 4}


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory, tiny_model):
    """A real finished output: BERT static vectors, FastText vectors, vocabulary and indices."""
    from embedjob.pipeline import run_job

    root = tmp_path_factory.mktemp("hostile")
    write_shards(str(root / "in"), SAMPLE_TEXTS * 2, n_shards=2)
    data = _job(root / "in", root / "out", tiny_model, word2vec=FASTTEXT, index={"enabled": True})
    run_job(build_config(data))
    return root, data


def _copy(finished, tmp_path):
    root, data = finished
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    return out, {**data, "output": {"url": str(out)}}


def test_the_planted_pickle_really_runs_code(tmp_path):
    """The crafted file runs its command when unpickled, so the tests below are not vacuous."""
    marker = plant(tmp_path / "x.kv", tmp_path / "RAN")
    with open(tmp_path / "x.kv", "rb") as f:
        pickle.load(f)
    assert os.path.exists(marker)


# -- embedjob similar -----------------------------------------------------------------------------
def test_similar_ignores_planted_kv_and_answers_from_safe_files(finished, tmp_path, capsys):
    """`embedjob similar` never loads vectors.kv: planted pickles stay inert, answers still come
    (BERT static vectors, and FastText vectors even for an unseen word)."""
    out, _ = _copy(finished, tmp_path)
    m_static = plant(out / "static" / "vectors.kv", tmp_path / "PWNED-static")
    m_w2v = plant(out / "word2vec" / "vectors.kv", tmp_path / "PWNED-word2vec")
    capsys.readouterr()
    assert cli.main(["similar", str(out), "--word", "cat", "--vectors", "bert", "-n", "3"]) == 0
    bert = capsys.readouterr().out.strip().splitlines()
    assert cli.main(["similar", str(out), "--word", "catz", "--vectors", "word2vec", "-n", "3"]) == 0
    w2v = capsys.readouterr().out.strip().splitlines()
    assert not os.path.exists(m_static) and not os.path.exists(m_w2v)
    assert len(bert) == 3 and len(w2v) == 3 and all("\t" in line for line in bert + w2v)


# -- user-supplied vector files ----------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["word2vec.init_from", "topics.embeddings"])
def test_run_refuses_a_kv_setting_before_any_work(tmp_path, capsys, tiny_model, setting):
    """A .kv given to word2vec.init_from / topics.embeddings stops `embedjob run` with exit 2 and a
    line naming the setting and the safe formats; nothing is read, nothing runs."""
    write_shards(str(tmp_path / "in"), SAMPLE_TEXTS, n_shards=1)
    marker = plant(tmp_path / "init.kv", tmp_path / "PWNED")
    section, key = setting.split(".")
    extra = {"word2vec": {**FASTTEXT, "model": "word2vec"}} if section == "word2vec" else \
        {"topics": {"enabled": True, "num_topics": 2, "epochs": 1, "workers": 1, "no_below": 1}}
    extra[section][key] = str(tmp_path / "init.kv")
    capsys.readouterr()
    assert _run_cli(tmp_path, _job(tmp_path / "in", tmp_path / "out", tiny_model, **extra)) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert any(setting in line and "word2vec binary" in line and "_trust_pickle" in line for line in lines), err
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_pickle_under_another_name_is_refused_when_read(tmp_path):
    """A pickle named like a safe file (init.bin, vectors.vec) is recognised by its first byte and
    refused, naming the setting; it is never loaded."""
    from embedjob.errors import TopicsError
    from embedjob.stages.topics.embeddings import resolve_embeddings
    from embedjob.stages.word2vec import Word2VecConfig
    from embedjob.stages.word2vec.model import load_init

    marker = plant(tmp_path / "init.bin", tmp_path / "PWNED-bin")
    with pytest.raises(ConfigError, match=r"word2vec\.init_from=.*init\.bin.*pickle.*word2vec binary"):
        load_init(Word2VecConfig(vector_size=16, init_from=str(tmp_path / "init.bin")), {}, {"cat": 3})
    marker2 = plant(tmp_path / "vectors.vec", tmp_path / "PWNED-vec")
    with pytest.raises(TopicsError, match=r"topics\.embeddings=.*vectors\.vec.*pickle.*word2vec binary"):
        resolve_embeddings(JobConfig(topics={"embeddings": str(tmp_path / "vectors.vec")}).topics,
                           Storage(str(tmp_path)), ["cat", "dog"])
    assert not os.path.exists(marker) and not os.path.exists(marker2)


def test_trusted_kv_is_accepted_for_exactly_that_setting(tmp_path):
    """With word2vec.init_trust_pickle / topics.embeddings_trust_pickle true, a gensim-saved .kv is
    read for that setting (and only that one)."""
    from embedjob.stages.topics.embeddings import resolve_embeddings
    from embedjob.stages.word2vec import Word2VecConfig
    from embedjob.stages.word2vec.model import load_init

    kv = _legit_kv()
    kv.save(str(tmp_path / "init.kv"))
    url = str(tmp_path / "init.kv")
    words, vectors = load_init(Word2VecConfig(vector_size=16, init_from=url, init_trust_pickle=True), {},
                               {"cat": 3, "bank": 1, "other": 1})
    assert words == ["cat", "bank"] and np.array_equal(vectors[0], kv["cat"])
    rho, missing, _ = resolve_embeddings(
        JobConfig(topics={"embeddings": url, "embeddings_trust_pickle": True}).topics, Storage(str(tmp_path)),
        ["dog", "zzz"])
    assert np.array_equal(rho[0], kv["dog"]) and list(missing) == [False, True]
    with pytest.raises(ConfigError, match="topics.embeddings"):  # trusting init_from does not trust embeddings
        build_config({"word2vec": {"init_from": url, "init_trust_pickle": True}, "topics": {"embeddings": url}})


def test_npy_vectors_read_without_pickle(tmp_path):
    """The .npy + vocabulary form is read with allow_pickle=False: plain float arrays load, an
    object array (a pickle inside .npy) is refused."""
    from embedjob.wordvectors import WordVectorsError, read_keyed_vectors

    np.save(tmp_path / "vectors.npy", np.eye(3, dtype=np.float32))
    (tmp_path / "vectors.vocab.txt").write_text("cat 5\ndog 2\nbank 1\n")
    kv = read_keyed_vectors(str(tmp_path / "vectors.npy"), {}, setting="topics.embeddings")
    assert kv.index_to_key == ["cat", "dog", "bank"] and kv.get_vecattr("dog", "count") == 2
    assert np.array_equal(kv["dog"], [0, 1, 0])
    os.makedirs(tmp_path / "evil")
    np.save(tmp_path / "evil" / "vectors.npy", np.array([_Hostile(str(tmp_path / "PWNED"))], dtype=object),
            allow_pickle=True)
    (tmp_path / "evil" / "vectors.vocab.txt").write_text("cat\n")
    with pytest.raises(WordVectorsError, match="topics.embeddings"):
        read_keyed_vectors(str(tmp_path / "evil" / "vectors.npy"), {}, setting="topics.embeddings")
    assert not os.path.exists(tmp_path / "PWNED")


# -- the job's own stages ---------------------------------------------------------------------------
# slow: the default suite keeps under 30 min on CI's 2 cores; the dictionary reader is unit-tested in test_dictionary_json_round_trip
@pytest.mark.slow
def test_topics_stage_never_loads_dictionary_gensim(finished, tmp_path):
    """A rerun with the topics stage on (rho from the job's FastText vectors) reads
    vocab/dictionary.json and word2vec/vectors.bin: planted dictionary.gensim and vectors.kv stay inert."""
    out, data = _copy(finished, tmp_path)
    m_dict = plant(out / "vocab" / "dictionary.gensim", tmp_path / "PWNED-dictionary")
    m_w2v = plant(out / "word2vec" / "vectors.kv", tmp_path / "PWNED-word2vec")
    data = {**data, "static": {"enabled": False}, "word2vec": {"enabled": False}, "index": {"enabled": False},
            "topics": {"enabled": True, "num_topics": 2, "embeddings": "word2vec", "epochs": 1, "workers": 1,
                       "threads_per_worker": 1, "no_below": 1, "no_above": 1.0, "batch_size": 8, "hidden_size": 8,
                       "coherence": ["c_npmi"], "coherence_docs": None}}
    assert _run_cli(tmp_path, data) == 0
    assert not os.path.exists(m_dict) and not os.path.exists(m_w2v)
    manifest = Storage(str(out)).read_json("manifest.json")
    assert manifest["stages"]["topics"]["status"] == "done"
    assert manifest["stages"]["topics"]["embedding_dim"] == 16


def test_index_rerun_with_vector_stages_off_reads_no_word_vectors(finished, tmp_path):
    """A rerun with the index on and the static / word2vec stages off builds no word index and
    reads no vectors.kv (planted ones stay inert)."""
    out, data = _copy(finished, tmp_path)
    m_static = plant(out / "static" / "vectors.kv", tmp_path / "PWNED-static")
    m_w2v = plant(out / "word2vec" / "vectors.kv", tmp_path / "PWNED-word2vec")
    data = {**data, "static": {"enabled": False}, "word2vec": {"enabled": False}, "index": {"enabled": True}}
    assert _run_cli(tmp_path, data) == 0
    assert not os.path.exists(m_static) and not os.path.exists(m_w2v)
    stats = Storage(str(out)).read_json("stats/index.json")
    assert stats["words"] == {} and stats["docs"]["count"] == len(SAMPLE_TEXTS) * 2


def test_index_stage_reads_word_vectors_from_safe_files(tmp_path):
    """With a vector stage enabled, its word index is built from vectors.bin; a vectors.kv beside it
    is never loaded."""
    from embedjob.stages.index.stage import run_index
    from embedjob.wordvectors import write_keyed_vectors
    from tests.test_index import _write_vector_shards

    out = Storage(str(tmp_path / "out"))
    urls, _ = _write_vector_shards(out, n_shards=1, n=30)
    write_keyed_vectors(_legit_kv(8, [f"w{i}" for i in range(20)]), out.child("word2vec"))
    marker = plant(tmp_path / "out" / "word2vec" / "vectors.kv", tmp_path / "PWNED")
    stats = run_index(JobConfig().index, out, urls, True, ["word2vec"])
    assert stats["words"]["word2vec"]["count"] == 20
    assert not os.path.exists(marker)


# -- what the safe files hold -----------------------------------------------------------------------
def test_safe_files_round_trip_fasttext_and_counts(tmp_path):
    """vectors.bin + vectors.vocab.txt + vectors_ngrams.npy + vectors_vocab.npy + fasttext.json rebuild
    the FastTextKeyedVectors: same words in order, vectors, counts, and the same vectors for unseen words."""
    from gensim.models import FastText
    from gensim.models.fasttext import FastTextKeyedVectors

    from embedjob.wordvectors import read_vector_folder, write_keyed_vectors

    docs = [["zebra", "zebu", "quartz", "quarry"] * 3, ["violet", "violin", "marble", "marbles"] * 3] * 5
    ft = FastText(docs, vector_size=8, min_count=1, epochs=2, bucket=500, min_n=2, max_n=4, seed=1, workers=1)
    folder = Storage(str(tmp_path / "ft"))
    write_keyed_vectors(ft.wv, folder)
    back = read_vector_folder(folder)
    assert isinstance(back, FastTextKeyedVectors)
    assert back.index_to_key == ft.wv.index_to_key
    for attr in ("vectors", "vectors_vocab", "vectors_ngrams"):
        np.testing.assert_array_equal(getattr(back, attr), getattr(ft.wv, attr))
    assert [back.get_vecattr(w, "count") for w in back.index_to_key] == \
        [ft.wv.get_vecattr(w, "count") for w in ft.wv.index_to_key]
    np.testing.assert_allclose(back["zebrina"], ft.wv["zebrina"], rtol=1e-6)
    # a plain KeyedVectors written over it leaves no stale FastText files behind
    write_keyed_vectors(_legit_kv(8), folder)
    assert type(read_vector_folder(folder)).__name__ == "KeyedVectors"


def test_dictionary_json_round_trip(tmp_path):
    """vocab/dictionary.json keeps what topics and word2vec use: token ids, cfs, dfs, num_docs,
    num_pos, num_nnz."""
    from embedjob.stages.vocab import dictionary_from_counts, read_dictionary, write_dictionary

    d = dictionary_from_counts(Counter({"cat": 5, "dog": 3, "bank": 3}), Counter({"cat": 2, "dog": 2, "bank": 1}),
                               num_docs=4, num_pos=11)
    out = Storage(str(tmp_path))
    write_dictionary(out, d)
    back = read_dictionary(out)
    assert back.token2id == d.token2id and back.cfs == d.cfs and back.dfs == d.dfs
    assert (back.num_docs, back.num_pos, back.num_nnz) == (4, 11, 5)
    assert back[back.token2id["dog"]] == "dog"
    assert back.doc2bow(["dog", "cat", "dog"]) == d.doc2bow(["dog", "cat", "dog"]) == [(0, 1), (2, 2)]
