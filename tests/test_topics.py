"""Topic model stage: BoW, metrics, ETM/ProdLDA training with Ray Train, theta, resume, CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.cli import main as cli_main
from embedjob.errors import TopicsError
from embedjob.stages.topics.bow import bow_from_token_lists, filter_dictionary
from embedjob.stages.topics.config import TopicsConfig
from embedjob.stages.topics.embeddings import embedding_matrix
from embedjob.stages.topics.metrics import top_words, topic_diversity
from embedjob.stages.topics.model import TopicModel, infer_theta, load_topic_model
from embedjob.stages.topics.stage import run_topics
from embedjob.stages.topics.train import latest_checkpoint
from embedjob.storage import Storage
from embedjob.wordvectors import write_keyed_vectors

ANIMALS = ["cat", "dog", "hors", "cow", "sheep", "goat", "pig", "duck", "mous", "lion", "tiger", "wolf"]
MONEY = ["bank", "stock", "share", "market", "price", "rate", "loan", "debt", "fund", "tax", "bond", "cash"]


def _synthetic_docs(n: int = 240, seed: int = 0) -> list[list[str]]:
    """Documents drawn from one of two vocabularies (plus one shared word), alternating."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = ANIMALS if i % 2 == 0 else MONEY
        doc = list(rng.choice(words, size=int(rng.integers(8, 20))))
        doc.append("thing")
        docs.append(doc)
    docs[5] = []  # an empty document keeps its row
    docs[7] = ["zzzunique"]  # only out-of-vocabulary words
    return docs


def _write_tokens(out_dir: str, docs: list[list[str]], n_shards: int = 3) -> tuple[list[str], list[str]]:
    os.makedirs(os.path.join(out_dir, "tokens"), exist_ok=True)
    ids = [f"doc-{i:05d}" for i in range(len(docs))]
    urls = []
    for s in range(n_shards):
        rows = list(range(s, len(docs), n_shards))
        path = os.path.join(out_dir, "tokens", f"part-{s:05d}.parquet")
        pq.write_table(pa.table({"id": [ids[i] for i in rows],
                                 "tokens": pa.array([docs[i] for i in rows], pa.list_(pa.string()))}), path)
        urls.append(path)
    return urls, ids


def _write_vectors(out_dir: str, missing: tuple[str, ...] = ("wolf", "bond")) -> None:
    """Tiny word2vec-like vectors: each group around its own direction; some words left out."""
    from gensim.models import KeyedVectors

    rng = np.random.default_rng(1)
    words, vecs = [], []
    for group, centre in ((ANIMALS, np.eye(16)[0] * 3), (MONEY, np.eye(16)[1] * 3)):
        for w in group:
            if w not in missing:
                words.append(w)
                vecs.append(centre + rng.normal(0, 0.3, 16))
    words.append("thing")
    vecs.append(rng.normal(0, 0.3, 16))
    kv = KeyedVectors(16)
    kv.add_vectors(words, np.array(vecs, np.float32))
    write_keyed_vectors(kv, Storage(os.path.join(out_dir, "word2vec")))


def _cfg(**topics) -> TopicsConfig:
    base = dict(enabled=True, embeddings="word2vec", num_topics=2, no_below=2, no_above=0.9, epochs=12, batch_size=32, lr=1e-2,
                hidden_size=32, workers=2, threads_per_worker=1, coherence_docs=None, seed=0, min_steps=0,
                min_documents_seen=0)
    base.update(topics)
    return TopicsConfig(**base)


def _separates(topics: list[list[str]]) -> bool:
    a = [sum(w in ANIMALS for w in t[:5]) for t in topics]
    m = [sum(w in MONEY for w in t[:5]) for t in topics]
    return sorted(a) == [0, 5] and sorted(m) == [0, 5]


# -- pure functions (no Ray) -------------------------------------------------------------------
def test_bow_arrays_counts_and_drops_unknown_words():
    ids, cnt = bow_from_token_lists([["b", "a", "b", "x"], [], ["x"], ["c"]], ["a", "b", "c"])
    assert ids.to_pylist() == [[0, 1], [], [], [2]]
    assert cnt.to_pylist() == [[1.0, 2.0], [], [], [1.0]]


def test_worker_slices_cover_a_shard_once():
    from embedjob.stages.topics.bow import worker_slices

    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            bounds = worker_slices(n, world)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_raytrain_fit_polls_quicker_and_restores_the_environment(monkeypatch):
    from types import SimpleNamespace

    from embedjob import raytrain

    class Trainer:  # records what Ray Train's fit() would read; fails the way it is told to
        def __init__(self, raises=None, error=None):
            self.raises, self.error, self.seen = raises, error, []

        def fit(self):
            self.seen.append(os.environ.get(raytrain.POLL_ENV))
            if self.raises is not None:
                raise self.raises
            return SimpleNamespace(error=self.error)

    monkeypatch.delenv(raytrain.POLL_ENV, raising=False)
    trainer = Trainer()
    assert raytrain.fit(trainer) is None and trainer.seen == [raytrain.POLL_SECONDS]
    assert raytrain.POLL_ENV not in os.environ
    raised, reported = RuntimeError("worker died"), ValueError("bad batch")
    assert raytrain.fit(Trainer(raises=raised)) is raised and raytrain.POLL_ENV not in os.environ
    assert raytrain.fit(Trainer(error=reported)) is reported
    monkeypatch.setenv(raytrain.POLL_ENV, "3")
    trainer = Trainer(raises=raised)
    assert raytrain.fit(trainer) is raised and trainer.seen == ["3"]  # the user's setting wins
    assert os.environ[raytrain.POLL_ENV] == "3"


def test_diversity_and_top_words():
    assert topic_diversity([["a", "b"], ["a", "c"]], n=2) == pytest.approx(0.75)
    tw = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    assert top_words(tw, ["x", "y", "z"], 2) == [["y", "z"], ["x", "z"]]


def test_relevance_ranking_interpolates_probability_and_lift():
    from embedjob.stages.topics.metrics import relevance

    # word 0 frequent everywhere, word 2 rare but specific to the topic
    log_tw = np.log(np.array([[0.6, 0.3, 0.1]]))
    counts = np.array([1000.0, 100.0, 1.0])
    by_prob = top_words(relevance(log_tw, counts, 1.0), ["common", "mid", "rare"], 3)
    by_lift = top_words(relevance(log_tw, counts, 0.0), ["common", "mid", "rare"], 3)
    assert by_prob == [["common", "mid", "rare"]] and by_lift == [["rare", "mid", "common"]]
    lam = 0.4
    p = (counts + 1) / (counts + 1).sum()
    expected = lam * log_tw + (1 - lam) * (log_tw - np.log(p))
    assert np.allclose(relevance(log_tw, counts, lam) - expected, (relevance(log_tw, counts, lam) - expected)[0, 0])


def test_encoder_input_and_prior_settings():
    from embedjob.stages.topics.config import encoder_input, model_kwargs

    assert encoder_input(TopicsConfig()) == "embeddings"
    assert encoder_input(TopicsConfig(embeddings="learned")) == "bow"
    assert encoder_input(TopicsConfig(model="prodlda")) == "bow"
    with pytest.raises(TopicsError, match="topics.encoder"):
        encoder_input(TopicsConfig(model="prodlda", encoder="embeddings"))
    with pytest.raises(TopicsError, match="learned"):
        encoder_input(TopicsConfig(embeddings="learned", encoder="embeddings"))
    kw = model_kwargs(TopicsConfig(num_topics=4), 10, 8, 0)
    assert kw["prior"] == "dirichlet" and kw["prior_alpha"] == 0.05 and kw["dropout"] == 0.0
    assert model_kwargs(TopicsConfig(model="prodlda"), 10, 8, 0)["dropout"] == 0.2
    assert model_kwargs(TopicsConfig(dropout=0.1), 10, 8, 0)["dropout"] == 0.1
    model = TopicModel(**kw)
    # Laplace approximation of Dirichlet(a): variance (1/a)(1 - 2/K) + 1/(K a)
    assert float(model.prior_var[0]) == pytest.approx(20 * 0.5 + 1 / (4 * 0.05))
    normal = TopicModel(**model_kwargs(TopicsConfig(num_topics=4, prior="normal"), 10, 8, 0))
    mu, logvar = np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)
    import torch

    assert float(normal.kl(torch.from_numpy(mu), torch.from_numpy(logvar))[0]) == 0.0


def test_etm_likelihood_matches_the_dense_mixture():
    """The sparse per-word reconstruction term equals -sum_w c_dw log(theta_d . beta_w) computed densely."""
    import torch

    from embedjob.stages.topics.config import model_kwargs
    from embedjob.stages.topics.model import batch_tensors, init_model

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(30)]
    rho = rng.normal(size=(30, 8)).astype(np.float32)
    kw = model_kwargs(TopicsConfig(num_topics=5, hidden_size=16), 30, 8, 0)
    model = init_model(kw, rho, np.zeros(30, bool), seed=0, word_counts=rng.integers(1, 50, 30))
    model.eval()
    docs = [list(rng.choice(vocab, size=int(rng.integers(1, 12)))) for _ in range(9)]
    ids, counts = bow_from_token_lists(docs, vocab)
    with torch.no_grad():
        batch = batch_tensors(ids, counts)
        nll, _ = model(*batch)
        theta = model.theta(*batch[:3]).double()
        dense = theta @ model.topic_word().double()  # (docs, V) p(w|d)
    for d, (w, c) in enumerate(zip(ids.to_pylist(), counts.to_pylist())):
        expected = -(np.array(c) * np.log(dense[d, w].numpy())).sum()
        assert float(nll[d]) == pytest.approx(expected, rel=1e-4)


def test_embedding_matrix_fills_missing_rows():
    from gensim.models import KeyedVectors

    kv = KeyedVectors(4)
    kv.add_vectors(["a", "b"], np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32))
    rho, missing = embedding_matrix(kv, ["a", "zz", "b"], seed=0)
    assert missing.tolist() == [False, True, False]
    assert rho[0].tolist() == [1, 0, 0, 0] and np.isfinite(rho[1]).all()
    with pytest.raises(TopicsError, match="none of the vocabulary"):
        embedding_matrix(kv, ["q"], seed=0)


def test_filter_dictionary_errors_name_the_settings():
    from gensim.corpora import Dictionary

    d = Dictionary([["a", "b"], ["a"]])
    with pytest.raises(TopicsError, match="no_below"):
        filter_dictionary(d, TopicsConfig(no_below=5))


def test_config_rejects_unknown_embeddings():
    with pytest.raises(ValueError, match="unknown embeddings"):
        TopicsConfig(embeddings="glove")
    assert TopicsConfig(embeddings="s3://b/vectors.bin").embeddings == "s3://b/vectors.bin"
    assert TopicsConfig(embeddings="s3://b/vectors.kv", embeddings_trust_pickle=True).embeddings == "s3://b/vectors.kv"


# -- the stage on a real local Ray ---------------------------------------------------------------
@pytest.fixture(scope="module")
def etm_run(ray_local, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("topics-out"))
    docs = _synthetic_docs()
    urls, ids = _write_tokens(out_dir, docs)
    _write_vectors(out_dir)
    cfg = _cfg(epochs=12)
    stats = run_topics(cfg, Storage(out_dir), urls)
    return out_dir, urls, ids, docs, stats


def test_etm_recovers_separable_topics(etm_run):
    out_dir, _, _, _, stats = etm_run
    doc = json.load(open(os.path.join(out_dir, "topics", "topics.json")))
    topics = [t["words"] for t in doc["topics"]]
    assert _separates(topics), topics
    tw = np.load(os.path.join(out_dir, "topics", "topic_word.npy"))
    assert tw.shape == (2, stats["vocabulary"]) and np.allclose(tw.sum(1), 1, atol=1e-4)
    assert stats["workers"] == 2 and stats["missing_words"] == 2 and stats["embedding_dim"] == 16


def test_theta_every_document_once_rows_sum_to_one(etm_run):
    out_dir, urls, ids, docs, stats = etm_run
    names = sorted(os.listdir(os.path.join(out_dir, "topics", "theta")))
    assert names == [os.path.basename(u) for u in urls]
    table = pa.concat_tables(pq.read_table(os.path.join(out_dir, "topics", "theta", n)) for n in names)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    theta = np.array(table.column("theta").to_pylist(), np.float32)
    assert theta.shape == (len(ids), 2)
    assert np.allclose(theta.sum(1), 1.0, atol=1e-5)
    assert stats["theta_docs"] == len(ids) and stats["theta_empty_docs"] == 2
    # documents of one vocabulary share a dominant topic, the other group the other one
    by_id = dict(zip(table.column("id").to_pylist(), theta.argmax(1)))
    animal = {by_id[f"doc-{i:05d}"] for i in range(0, len(docs), 2) if i not in (5, 7)}
    money = {by_id[f"doc-{i:05d}"] for i in range(1, len(docs), 2) if i not in (5, 7)}
    assert len(animal) == 1 and len(money) == 1 and animal != money
    assert not os.path.exists(os.path.join(out_dir, "topics", "_staging")) or not os.listdir(
        os.path.join(out_dir, "topics", "_staging"))


def test_metrics_coherence_and_diversity(etm_run):
    out_dir = etm_run[0]
    m = json.load(open(os.path.join(out_dir, "topics", "metrics.json")))
    assert set(m["coherence"]) == {"c_npmi", "c_v"}
    assert np.isfinite(m["npmi"]) and np.isfinite(m["c_v"]) and m["npmi"] > 0
    assert 0 < m["diversity"] <= 1
    assert m["settings"]["topn"] == 10 and m["settings"]["reference_docs"] == 239
    assert m["settings"]["window_size"] == {"c_npmi": 10, "c_v": 110}


def test_model_pt_loads_without_pickle_and_infers_new_documents(etm_run):
    import torch

    out_dir = etm_run[0]
    blob = torch.load(os.path.join(out_dir, "topics", "model.pt"), weights_only=True)
    assert blob["format"] == "embedjob-topics-v1" and "state_dict" in blob
    trained = load_topic_model(out_dir)
    theta = trained.infer_tokens([["cat", "dog", "cow"], ["bank", "loan", "debt"], []])
    assert theta.shape == (3, 2) and np.allclose(theta.sum(1), 1, atol=1e-5)
    assert theta[0].argmax() != theta[1].argmax()
    ids, cnt = bow_from_token_lists([["cat"]], trained.vocab)
    assert np.allclose(infer_theta(trained.model, ids, cnt), theta[:1] * 0 + infer_theta(trained.model, ids, cnt))


def test_resume_continues_from_checkpoint(etm_run, tmp_path):
    out_dir, _, _, docs, _ = etm_run
    copy = str(tmp_path / "out")
    shutil.copytree(out_dir, copy)
    urls = sorted(os.path.join(copy, "tokens", n) for n in os.listdir(os.path.join(copy, "tokens")))
    latest = json.load(open(os.path.join(copy, "topics", "checkpoints", "latest.json")))
    assert latest["epoch"] == 12
    stats = run_topics(_cfg(epochs=14), Storage(copy), urls)
    assert stats["resumed_from_epoch"] == 12
    assert json.load(open(os.path.join(copy, "topics", "checkpoints", "latest.json")))["epoch"] == 14
    assert len([n for n in os.listdir(os.path.join(copy, "topics", "checkpoints")) if n.endswith(".pt")]) == 2
    # a checkpoint made with other settings or another vocabulary is not reused
    assert latest_checkpoint(Storage(copy), "another-fingerprint") is None
    assert latest_checkpoint(Storage(copy), latest["fingerprint"])["epoch"] == 14
    # other settings and fewer epochs: starts over and replaces the old run's checkpoints
    stats = run_topics(_cfg(epochs=2, hidden_size=16), Storage(copy), urls)
    assert stats["resumed_from_epoch"] == 0
    now = json.load(open(os.path.join(copy, "topics", "checkpoints", "latest.json")))
    assert now["epoch"] == 2 and now["fingerprint"] != latest["fingerprint"]
    left = sorted(n for n in os.listdir(os.path.join(copy, "topics", "checkpoints")) if n.endswith(".pt"))
    assert left == [f"epoch-00001-{now['fingerprint']}.pt", f"epoch-00002-{now['fingerprint']}.pt"]


def test_prodlda_path_runs(ray_local, tmp_path):
    docs = _synthetic_docs(seed=3)
    urls, ids = _write_tokens(str(tmp_path), docs, n_shards=2)
    # also the streaming input path: BoW batches from the Ray Train dataset shard every epoch
    stats = run_topics(_cfg(model="prodlda", epochs=40, lr=2e-2, batch_size=16, coherence=["c_npmi"], cache_bow=False),
                       Storage(str(tmp_path)), urls)
    assert stats["model"] == "prodlda" and stats["theta_docs"] == len(ids)
    doc = json.load(open(tmp_path / "topics" / "topics.json"))
    assert _separates([t["words"] for t in doc["topics"]])
    assert "c_v" not in json.load(open(tmp_path / "topics" / "metrics.json"))["coherence"]


def test_default_layout_is_one_worker_per_node_using_its_cpus(ray_local):
    from embedjob.stages.topics.train import training_layout

    assert training_layout(TopicsConfig(enabled=True)) == (1, False, 2)  # local Ray: 1 node, 2 CPUs, no GPU
    assert training_layout(TopicsConfig(enabled=True, workers=2)) == (2, False, 1)
    # a tiny corpus: at most one worker per 2 documents, and that worker gets all the CPUs as threads
    assert training_layout(TopicsConfig(enabled=True, workers=2), docs=3) == (1, False, 2)
    with pytest.raises(TopicsError, match="use_gpu='yes'"):
        training_layout(TopicsConfig(enabled=True, use_gpu="yes"))


def test_missing_job_vectors_error_names_the_stage(ray_local, tmp_path):
    urls, _ = _write_tokens(str(tmp_path), _synthetic_docs(40))
    with pytest.raises(TopicsError, match="word2vec.enabled"):
        run_topics(_cfg(embeddings="word2vec"), Storage(str(tmp_path)), urls)


def test_cli_prints_topics_with_coherence(etm_run, capsys):
    out_dir = etm_run[0]
    assert cli_main(["topics", out_dir, "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "NPMI" in text and "diversity" in text and "npmi" in text.splitlines()[1]
    assert cli_main(["topics", os.path.join(out_dir, "nothing")]) == 1


def test_bench_summary_over_seeds():
    from embedjob.bench.topics import summarize

    runs = [{"k": 20, "etm_npmi": 0.06, "lda_npmi": 0.05, "etm_diversity": 0.9, "lda_diversity": 0.8,
             "etm_seconds": 30.0, "lda_seconds": 31.0},
            {"k": 20, "etm_npmi": 0.04, "lda_npmi": 0.05, "etm_diversity": 0.7, "lda_diversity": 0.8,
             "etm_seconds": 33.0, "lda_seconds": 31.0},
            {"k": 50, "etm_npmi": 0.01, "lda_npmi": None, "etm_diversity": 0.8, "lda_diversity": 0.8,
             "etm_seconds": 1.0, "lda_seconds": 2.0}]
    k20, k50 = summarize(runs)
    assert k20["seeds"] == 2 and k20["etm_npmi"] == {"mean": 0.05, "min": 0.04, "max": 0.06}
    assert (k20["etm_npmi_ge_lda"], k20["etm_diversity_ge_lda"], k20["etm_time_le_lda"]) == (1, 1, 1)
    assert k50["lda_npmi"] is None and k50["etm_npmi_ge_lda"] == 0 and k50["etm_diversity_ge_lda"] == 1


PLANTED = [[f"{stem}{i}" for i in range(10)] for stem in ("anim", "monei", "sport", "food", "music")]


def _planted_corpus(out_dir: str, n_docs: int = 1000, seed: int = 0, labels: bool = False) -> list[str]:
    """Documents drawn from Dirichlet(0.3) mixtures of five planted topics (10 words each, word
    probabilities within a topic ~ 1/sqrt(rank)) plus three background words in every document; the
    word vectors put each topic's words around its own random direction, with noise."""
    from gensim.models import KeyedVectors

    rng = np.random.default_rng(seed)
    within = 1.0 / np.sqrt(np.arange(1, 11))
    within /= within.sum()
    background = ["thing", "make", "dai"]
    docs, dominant = [], []
    for _ in range(n_docs):
        theta = rng.dirichlet([0.3] * len(PLANTED))
        n = int(rng.integers(20, 60))
        topics = rng.choice(len(PLANTED), size=n, p=theta)
        doc = [PLANTED[k][rng.choice(10, p=within)] for k in topics]
        doc += list(rng.choice(background, size=n // 4))
        docs.append(doc)
        dominant.append(f"topic-{int(theta.argmax())}")
    urls, ids = _write_tokens(out_dir, docs, n_shards=4)
    if labels:  # the input shards beside the token shards: id, text, label (the dominant planted topic)
        os.makedirs(os.path.join(out_dir, "input"), exist_ok=True)
        for s in range(4):
            rows = list(range(s, n_docs, 4))
            pq.write_table(pa.table({"id": [ids[i] for i in rows], "text": [" ".join(docs[i]) for i in rows],
                                     "label": [dominant[i] for i in rows]}),
                           os.path.join(out_dir, "input", f"part-{s:05d}.parquet"))
    words, vecs = [], []
    for group in PLANTED:
        centre = rng.normal(0, 1, 16)
        for w in group:
            words.append(w)
            vecs.append(centre + rng.normal(0, 0.7, 16))
    words += background
    vecs += [rng.normal(0, 1, 16) for _ in background]
    kv = KeyedVectors(16)
    kv.add_vectors(words, np.array(vecs, np.float32))
    write_keyed_vectors(kv, Storage(os.path.join(out_dir, "word2vec")))
    return urls


# slow (suite time): planted topics are also recovered by ..._at_two_sizes[200], with the default settings
@pytest.mark.slow
@pytest.mark.parametrize("embeddings", ["learned"])  # word2vec: the test below, with the default settings
def test_planted_topics_are_recovered(ray_local, tmp_path, embeddings):
    """Each planted topic is matched by its own learned topic whose top 10 words hold >= 8 of its words."""
    from scipy.optimize import linear_sum_assignment

    urls = _planted_corpus(str(tmp_path))
    cfg = _cfg(num_topics=len(PLANTED), embeddings=embeddings, workers=None, threads_per_worker=None, epochs=20,
               batch_size=64, lr=2e-2, no_above=1.0, coherence=["c_npmi"])
    run_topics(cfg, Storage(str(tmp_path)), urls)
    learned = [t["words"][:10] for t in json.load(open(tmp_path / "topics" / "topics.json"))["topics"]]
    overlap = np.array([[len(set(p) & set(t)) / 10 for t in learned] for p in PLANTED])
    rows, cols = linear_sum_assignment(-overlap)
    assert overlap[rows, cols].min() >= 0.8, (overlap[rows, cols], learned)


# slow: the default suite keeps under 30 min on CI's 2 cores; test_cli checks the bench parses, test_prodlda_path_runs the model
@pytest.mark.slow
def test_bench_topics_runs_both_models_on_a_small_corpus(ray_local, tmp_path, capsys):
    """`embedjob bench topics` end to end on a small text corpus: both models scored, a summary over seeds."""
    from embedjob.cli import main as cli_main

    rng = np.random.default_rng(0)
    groups = ["cats dogs horses cows sheep goats pigs ducks".split(),
              "banks stocks shares markets prices loans debts bonds".split()]
    os.makedirs(tmp_path / "corpus")
    for s in range(2):
        texts = [" ".join(rng.choice(groups[i % 2], size=12)) for i in range(s, 200, 2)]
        pq.write_table(pa.table({"id": [f"d{s}-{i}" for i in range(len(texts))], "text": texts}),
                       tmp_path / "corpus" / f"part-{s}.parquet")
    argv = ["bench", "topics", "--corpus", str(tmp_path / "corpus"), "--k", "2", "--seeds", "2", "--workdir", str(tmp_path / "work"),
            "--w2v-dim", "16", "--cpus", "2", "--set", "epochs=5", "--set", "batch_size=32", "--set", "no_below=2",
            "--set", "no_above=1.0", "--set", "coherence=[c_npmi]", "--set", "min_steps=0",
            "--set", "min_documents_seen=0", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["seed"] for r in out["runs"]] == [0, 1]
    for run in out["runs"]:
        assert run["documents"] == 200 and run["vocabulary"] == 16 and run["k"] == 2
        assert 0 < run["etm_diversity"] <= 1 and 0 < run["lda_diversity"] <= 1
        assert np.isfinite(run["etm_npmi"]) and np.isfinite(run["lda_npmi"]) and run["lda_seconds"] > 0
    (summary,) = out["summary"]
    assert summary["k"] == 2 and summary["seeds"] == 2 and summary["etm_npmi"]["min"] <= summary["etm_npmi"]["max"]


def _recovery(out_dir) -> float:
    """The worst planted topic's share of its top 10 words in the learned topic matched to it."""
    from scipy.optimize import linear_sum_assignment

    learned = [t["words"][:10] for t in json.load(open(os.path.join(out_dir, "topics", "topics.json")))["topics"]]
    overlap = np.array([[len(set(p) & set(t)) / 10 for t in learned] for p in PLANTED])
    rows, cols = linear_sum_assignment(-overlap)
    return float(overlap[rows, cols].min())


@pytest.mark.parametrize("n_docs", [200, pytest.param(2000, marks=pytest.mark.slow)])  # 2000: slow (suite time)
def test_planted_topics_with_default_training_length_at_two_sizes(ray_local, tmp_path, n_docs):
    """With the default settings (epochs, batch size, min_steps) both a 200- and a 2000-document
    corpus recover the five planted topics, no topic repeats another, and argmax theta recovers the
    documents' dominant planted topic (label_column)."""
    urls = _planted_corpus(str(tmp_path), n_docs=n_docs, labels=True)
    inputs = {f"part-{s:05d}": str(tmp_path / "input" / f"part-{s:05d}.parquet") for s in range(4)}
    cfg = TopicsConfig(enabled=True, num_topics=len(PLANTED), coherence=["c_npmi"], label_column="label",
                       no_above=1.0)
    stats = run_topics(cfg, Storage(str(tmp_path)), urls, input_urls=inputs)
    assert stats["steps"] >= 400 and stats["epochs"] * n_docs >= 200_000
    assert stats["embeddings"] == "learned"  # auto: the planted Word2Vec is of too few tokens
    assert _recovery(tmp_path) >= 0.8
    m = json.load(open(tmp_path / "topics" / "metrics.json"))
    assert m["redundancy"]["duplicate_topics"] == 0 and "warning" not in m
    assert m["redundancy"]["topics_used"] == len(PLANTED) and m["redundancy"]["effective_topics"] > 3.5
    assert m["labels"]["column"] == "label" and m["labels"]["documents"] == n_docs and m["labels"]["classes"] == 5
    assert m["labels"]["nmi"] > 0.5 and m["labels"]["ari"] > 0.4


def test_training_length_in_steps():
    from embedjob.stages.topics.train import training_length

    assert training_length(TopicsConfig(), 174_000) == (2048, 5)  # mixed-en: 84 steps an epoch, unchanged
    assert training_length(TopicsConfig(), 20_000) == (2048, 45)  # 9 steps an epoch: 400 steps
    assert training_length(TopicsConfig(), 1_000) == (125, 200)  # 8 batches an epoch, 200k documents seen
    assert training_length(TopicsConfig(min_documents_seen=0), 1_000) == (125, 50)  # 400 steps
    assert training_length(TopicsConfig(min_documents_seen=0), 200) == (64, 134)  # not below 64 documents a batch
    assert training_length(TopicsConfig(min_steps=0, min_documents_seen=0), 200) == (64, 5)
    assert training_length(TopicsConfig(batch_size=16, min_steps=0, min_documents_seen=0), 10) == (10, 5)


def test_label_column_missing_from_the_input_is_named(ray_local, tmp_path):
    urls = _planted_corpus(str(tmp_path), n_docs=40, labels=True)
    inputs = {f"part-{s:05d}": str(tmp_path / "input" / f"part-{s:05d}.parquet") for s in range(4)}
    with pytest.raises(TopicsError, match="has no such column; columns: id, text, label"):
        run_topics(_cfg(label_column="category"), Storage(str(tmp_path)), urls, input_urls=inputs)


def test_redundancy_of_known_topic_word_matrices():
    from embedjob.stages.topics.quality import duplicate_topics, overlapping_pairs, redundancy_report, topic_usage

    vocab = [f"w{i}" for i in range(100)]
    distinct = np.zeros((5, 100))
    for k in range(5):
        distinct[k, k * 20:(k + 1) * 20] = np.linspace(2, 1, 20)
    topics = top_words(distinct, vocab, 10)
    assert overlapping_pairs(topics) == [] and duplicate_topics([], 5) == 0
    # five topics each said four times (the K=20 collapse): 15 duplicates, 30 overlapping pairs
    repeated = np.repeat(distinct, 4, axis=0) + np.random.default_rng(0).normal(0, 1e-3, (20, 100))
    pairs = overlapping_pairs(top_words(repeated, vocab, 10))
    assert len(pairs) == 5 * 6 and duplicate_topics(pairs, 20) == 15
    # half the top words shared: counted at the 0.5 threshold, not below it
    half = [[f"a{i}" for i in range(10)], [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]]
    assert overlapping_pairs(half) == [(0, 1, 0.5)] and overlapping_pairs(half, threshold=0.6) == []
    usage = topic_usage(np.array([0] * 50 + [1] * 50), 4)
    assert usage == {"topics_used": 2, "effective_topics": 2.0, "largest_topic_share": 0.5}
    report = redundancy_report(top_words(repeated, vocab, 10), np.zeros(10, int))
    assert "15 of 20 topics repeat" in report["warning"] and "use 1 of 20 topics" in report["warning"]
    assert "warning" not in redundancy_report(topics, np.arange(100) % 5)


def test_label_nmi_and_ari_of_known_assignments():
    from embedjob.stages.topics.quality import label_agreement

    labels = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert label_agreement(labels, [2] * 4 + [0] * 4 + [1] * 4) == {"nmi": 1.0, "ari": 1.0}  # a relabelling
    # one cluster holding everything tells nothing about the labels
    assert label_agreement(labels, [0] * 12) == {"nmi": 0.0, "ari": 0.0}
    # a and b merged, c apart: MI = H(clusters) = log 3 - (2/3) log 2 ... by hand
    h_labels = np.log(3)
    h_clusters = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    got = label_agreement(labels, [0] * 8 + [1] * 4)
    assert got["nmi"] == pytest.approx(h_clusters / ((h_labels + h_clusters) / 2), abs=1e-4)
    # ARI by hand: pairs within clusters 28 + 6 = 34, within labels 3 * 6 = 18, agreeing 18; 66 pairs
    expected = 18 * 34 / 66
    assert got["ari"] == pytest.approx((18 - expected) / ((18 + 34) / 2 - expected), abs=1e-4)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 300), rng.integers(0, 7, 300)
    ours = label_agreement(list(a), list(b))
    assert ours["nmi"] == pytest.approx(sklearn.normalized_mutual_info_score(a, b), abs=1e-4)
    assert ours["ari"] == pytest.approx(sklearn.adjusted_rand_score(a, b), abs=1e-4)


def test_auto_embeddings_choose_by_corpus_size_and_what_the_job_wrote(tmp_path):
    from embedjob.stages.topics.config import AUTO_WORD2VEC_MIN_TOKENS
    from embedjob.stages.topics.embeddings import choose_embeddings

    out, cfg = Storage(str(tmp_path)), TopicsConfig()
    assert cfg.embeddings == "auto" and choose_embeddings(cfg, out, 10) == "learned"  # no vectors at all
    _write_vectors(str(tmp_path))  # the job's word2vec/
    assert choose_embeddings(cfg, out, AUTO_WORD2VEC_MIN_TOKENS) == "word2vec"
    assert choose_embeddings(cfg, out, AUTO_WORD2VEC_MIN_TOKENS - 1) == "learned"  # too few tokens for Word2Vec
    shutil.copytree(tmp_path / "word2vec", tmp_path / "static")  # BERT static vectors too
    assert choose_embeddings(cfg, out, 1000) == "bert"
    assert choose_embeddings(cfg, out, 10 ** 7) == "word2vec"
    assert choose_embeddings(TopicsConfig(embeddings="word2vec"), out, 10) == "word2vec"  # as set


def test_bench_suite_summary_and_targets():
    from embedjob.bench.topics_suite import format_table, lda_passes, summarize_suite

    assert (lda_passes(174_000), lda_passes(10_000), lda_passes(1_189), lda_passes(275)) == (1, 6, 20, 20)
    row = {"corpus": "kjv", "documents": 1189, "classes": 66, "k": 20, "etm_cv": 0.5, "lda_cv": 0.4,
           "etm_ari": 0.3, "lda_ari": 0.3}
    runs = [{**row, "seed": 0, "etm_npmi": 0.08, "lda_npmi": 0.05, "etm_diversity": 0.85, "lda_diversity": 0.5,
             "etm_nmi": 0.6, "lda_nmi": 0.55, "etm_duplicates": 0, "lda_duplicates": 2, "etm_seconds": 10.0,
             "lda_seconds": 10.0},
            {**row, "seed": 1, "etm_npmi": 0.06, "lda_npmi": 0.05, "etm_diversity": 0.7, "lda_diversity": 0.5,
             "etm_nmi": 0.5, "lda_nmi": 0.55, "etm_duplicates": 1, "lda_duplicates": 2, "etm_seconds": 22.0,
             "lda_seconds": 10.0}]
    (s,) = summarize_suite(runs)
    assert s["seeds"] == 2 and s["etm_npmi"] == 0.07 and s["etm_duplicates"] == 0.5 and s["etm_seconds"] == 16.0
    # means over seeds: NMI 0.55 >= 0.55, NPMI met; diversity 0.775 < 0.8; a duplicate in one seed; 16 s > 15 s
    assert s["targets"] == {"nmi": True, "npmi": True, "diversity": False, "no_duplicates": False, "time": False}
    assert "diversity, no_duplicates, time" in format_table([s])
