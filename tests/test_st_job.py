"""The job end to end with a model that is not MiniLM: a Qwen3-style decoder with last-token
pooling and an instruction prompt (random weights, tests/models_zoo.py). Its stored vectors equal
SentenceTransformer.encode; the manifest and report name the pipeline; a new dimensions value
changes the recipe; an unknown module fails the run in one line, before any work."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.test_errors import _assert_one_clear_error, run_cli

OFF = "".join(f"{k}:\n  enabled: false\n" for k in ("static", "word2vec", "topics", "index"))


def _job(tmp_path, model, extra=""):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"input:\n  url: {tmp_path / 'in'}\noutput:\n  url: {tmp_path / 'out'}\n{OFF}"
                    f"encode:\n  model: {model}\n  dtype: float32\n{extra}")
    return str(spec)


def _run(tmp_path, model, extra=""):
    """The job as `embedjob run` runs it (config file, checks, Ray pipeline), on the module's Ray."""
    from embedjob.config import load_job
    from embedjob.pipeline import run_job

    return run_job(load_job(_job(tmp_path, model, extra)))


def _job_cosines_to_st(tmp_path, model, texts):
    """The job over ``texts`` (2 shards): each stored vector's cosine to SentenceTransformer.encode's."""
    from sentence_transformers import SentenceTransformer

    ids = write_shards(tmp_path / "in", texts, n_shards=2)
    _run(tmp_path, model)
    t = pq.read_table(tmp_path / "out" / "vectors")
    got = dict(zip(t.column("id").to_pylist(), np.array(t.column("vector").to_pylist(), dtype=np.float32)))
    ref = SentenceTransformer(model, device="cpu").encode(texts)
    return [float(got[d] @ ref[i] / np.linalg.norm(got[d]) / np.linalg.norm(ref[i])) for i, d in enumerate(ids)]


def test_decoder_with_prompt_through_the_job(ray_local, zoo, tmp_path):

    model = zoo.get("qwen3")
    texts = SAMPLE_TEXTS + ["A much longer text. " * 40]  # one cut into windows, every one with the prompt
    cos = _job_cosines_to_st(tmp_path, model, texts)
    assert min(cos[:-1]) >= 0.9999, cos
    with open(tmp_path / "out" / "manifest.json") as f:
        enc = json.load(f)["encoder"]
    assert (enc["architecture"], enc["pooling"], enc["batching"], enc["prompt_name"]) == \
        ("qwen3", "lasttoken", "padded", "query")
    assert enc["prompt"].startswith("Instruct:") and enc["head_tokens"] > 10 and enc["tail_tokens"] == 1
    report = (tmp_path / "out" / "report.html").read_text()
    assert "qwen3 · pool lasttoken · prompt query: &#x27;Instruct:" in report or "pool lasttoken" in report
    # a different number of dimensions is a different recipe: every shard would be encoded again
    from embedjob.config import load_job
    from embedjob.pipeline import shard_stage_hash
    from embedjob.stages.encode import resolve_encoder_settings

    hashes = set()
    for extra in ("", "  dimensions: 8\n", "  prompt: ''\n"):
        cfg = load_job(_job(tmp_path, model, extra))
        hashes.add(shard_stage_hash(cfg, resolve_encoder_settings(cfg.encode)))
    assert len(hashes) == 3


@pytest.mark.parametrize("name", ["bert-prompt-excluded", "bert-combo"])
def test_bert_pipelines_through_the_job_with_the_chunk_cache(ray_local, zoo, tmp_path, name):
    """BERT-family models whose texts the preprocess stage tokenises through the chunk cache (a prompt
    left out of pooling; CLS, max and mean pooling, normalised): the job's vectors equal
    SentenceTransformer.encode, and the cache was used (the tokenizer allows it)."""

    from embedjob.stages.encode import Tokenizer

    model = zoo.get(name)
    assert Tokenizer(model, 32, prompt="query: ").chunk_cache() is not None
    texts = SAMPLE_TEXTS + ["Punctuation, (brackets) and [MASK] tokens; naïve café!", "A longer text. " * 60]
    cos = _job_cosines_to_st(tmp_path, model, texts)
    assert min(cos[:-1]) >= 0.9999, cos  # the last one is windowed: the job reads the whole document


def test_unknown_module_fails_the_run_in_one_line(zoo, tmp_path):
    model = str(tmp_path / "m")
    shutil.copytree(zoo.get("bert-cls"), model)
    with open(os.path.join(model, "modules.json")) as f:
        modules = json.load(f)
    modules.append({"idx": 2, "name": "2", "path": "2_CNN",
                    "type": "sentence_transformers.sentence_transformer.modules.cnn.CNN"})
    with open(os.path.join(model, "modules.json"), "w") as f:
        json.dump(modules, f)
    write_shards(tmp_path / "in", SAMPLE_TEXTS, n_shards=1)
    rc, _, err = run_cli("run", _job(tmp_path, model))
    _assert_one_clear_error(rc, err, "module 2 (path '2_CNN', type 'sentence_transformers.sentence_transformer."
                                     "modules.cnn.CNN') is a module type embedjob does not run")
    assert not (tmp_path / "out" / "vectors").exists()
