"""Any sentence-transformers model, encoded exactly as ``SentenceTransformer.encode`` encodes it, or
refused in one line: tiny random-weight models of every pooling mode, heads, prompts, Matryoshka and
several architectures (tests/models_zoo.py), compared in float32."""

import json
import os
import shutil

import numpy as np
import pytest

from embedjob.errors import ModelError
from embedjob.stages.encode import EncodeConfig, TextEncoder, resolve_encoder_settings
from tests.conftest import SAMPLE_TEXTS
from tests.models_zoo import ZOO

TEXTS = SAMPLE_TEXTS + ["x", "word " * 100]  # one tiny, one truncated at max_seq_length


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def _ours(path, batching="padded", **encode):
    cfg = EncodeConfig(model=path, dtype="float32", long_documents="truncate", **encode)
    return TextEncoder.from_config(cfg, batching=batching)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_equals_sentence_transformers(zoo, name):
    path = zoo.get(name)
    ref = _st(path).encode(TEXTS, convert_to_numpy=True)
    batchings = ("padded", "packed") if name.startswith("bert") else ("padded",)
    for batching in batchings:
        enc = _ours(path, batching)
        assert enc.batching == batching
        got = enc.encode_texts(TEXTS).vectors
        assert got.shape == ref.shape, (batching, got.shape, ref.shape)
        assert _cos(ref, got).min() >= 0.9999, (batching, _cos(ref, got))


@pytest.mark.parametrize("name", ["bert-prompt", "bert-prompt-excluded", "qwen3"])
def test_prompts_matter(zoo, name):
    """The prompt changes the vectors (so the equality above would fail without it), and with
    include_prompt: false its tokens are left out of pooling."""
    path = zoo.get(name)
    st = _st(path)
    with_prompt, without = st.encode(TEXTS), st.encode(TEXTS, prompt="")
    assert _cos(with_prompt, without).min() < 0.999
    got = _ours(path, prompt="").encode_texts(TEXTS).vectors
    assert _cos(without, got).min() >= 0.9999
    if name == "bert-prompt-excluded":
        included = zoo.get(name, include_prompt=True)
        assert _cos(_st(included).encode(TEXTS), with_prompt).min() < 0.999


def test_prompt_name_and_literal(zoo):
    path = zoo.get("bert-prompt")
    st = _st(path)
    got = _ours(path, prompt_name="passage").encode_texts(TEXTS).vectors
    assert _cos(st.encode(TEXTS, prompt_name="passage"), got).min() >= 0.9999
    got = _ours(path, prompt="search_document: ").encode_texts(TEXTS).vectors
    assert _cos(st.encode(TEXTS, prompt="search_document: "), got).min() >= 0.9999
    with pytest.raises(ModelError, match=r"encode.prompt_name=.nope. is not among the model.s prompts \(document, passage"):
        resolve_encoder_settings(EncodeConfig(model=path, prompt_name="nope"))


def test_dimensions_truncate_then_normalise(zoo):
    path = zoo.get("bert-matryoshka")
    assert resolve_encoder_settings(EncodeConfig(model=path)).dimensions == 16  # the model's truncate_dim
    got = _ours(path, dimensions=8).encode_texts(TEXTS).vectors
    ref = _st(path).encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    assert got.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ModelError, match="encode.dimensions=40: between 1 and the model's 32"):
        resolve_encoder_settings(EncodeConfig(model=path, dimensions=40))


def test_recipe_covers_pipeline_prompt_and_dimensions(zoo):
    base = resolve_encoder_settings(EncodeConfig(model=zoo.get("bert-matryoshka")))
    other = resolve_encoder_settings(EncodeConfig(model=zoo.get("bert-matryoshka"), dimensions=8))
    assert base.recipe_dict() != other.recipe_dict()
    prompt = resolve_encoder_settings(EncodeConfig(model=zoo.get("bert-prompt")))
    assert prompt.recipe_dict()["prompt"] == "query: " and prompt.prompt_name == "query"
    assert resolve_encoder_settings(EncodeConfig(model=zoo.get("bert-prompt"), prompt="passage: ")).recipe_dict() \
        != prompt.recipe_dict()
    dense = resolve_encoder_settings(EncodeConfig(model=zoo.get("bert-dense")))
    assert [h["type"] for h in dense.recipe_dict()["heads"]] == ["dense", "dense", "layernorm"]
    assert dense.dim == 16 and dense.normalize


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    data = fn(data) or data
    with open(path, "w") as f:
        json.dump(data, f)


def test_unknown_module_refused_in_one_line(zoo, tmp_path):
    path = _copy(zoo.get("bert-cls"), tmp_path / "m")
    ww = "sentence_transformers.sentence_transformer.modules.word_weights.WordWeights"
    _edit_json(os.path.join(path, "modules.json"),
               lambda m: m + [{"idx": 2, "name": "2", "path": "2_WordWeights", "type": ww}])
    with pytest.raises(ModelError) as e:
        resolve_encoder_settings(EncodeConfig(model=path))
    msg = str(e.value)
    assert "\n" not in msg and "'2_WordWeights'" in msg and ww in msg and "does not run" in msg, msg


def test_token_level_module_and_missing_pooling_refused(zoo, tmp_path):
    path = _copy(zoo.get("bert-cls"), tmp_path / "m")
    _edit_json(os.path.join(path, "modules.json"), lambda m: m[:1])
    with pytest.raises(ModelError, match="no Pooling module"):
        resolve_encoder_settings(EncodeConfig(model=path))


def test_remote_code_refused_unless_trusted(zoo, tmp_path):
    from embedjob.models import check_model

    path = _copy(zoo.get("bert-cls"), tmp_path / "m")
    _edit_json(os.path.join(path, "modules.json"),
               lambda m: [m[0], {**m[1], "type": "custom_pooling.MyPooling"}])
    with pytest.raises(ModelError, match=r"needs its own code.*custom_pooling.MyPooling.*trust_remote_code: true"):
        resolve_encoder_settings(EncodeConfig(model=path))
    with pytest.raises(ModelError, match="does not run"):  # trusted, but a module embedjob cannot run
        resolve_encoder_settings(EncodeConfig(model=path, trust_remote_code=True))
    path = _copy(zoo.get("bert-cls"), tmp_path / "m2")
    _edit_json(os.path.join(path, "config.json"), lambda c: {**c, "auto_map": {"AutoModel": "modeling_x.XModel"}})
    for fn in (lambda: check_model(path), lambda: resolve_encoder_settings(EncodeConfig(model=path))):
        with pytest.raises(ModelError, match=r"auto_map \['AutoModel'\].*encode.trust_remote_code: true"):
            fn()


def test_pooling_override_and_lower_case(zoo, tmp_path):
    """encode.pooling replaces the model's modes; do_lower_case lower-cases as sentence-transformers does."""
    path = zoo.get("bert-combo")
    enc = _ours(path, pooling="weightedmean", normalize=False)
    assert enc.settings.pooling == "weightedmean" and enc.dim == 32
    path = _copy(zoo.get("roberta"), tmp_path / "m")
    _edit_json(os.path.join(path, "sentence_bert_config.json"), lambda c: {**c, "do_lower_case": True})
    texts = [t.upper() for t in TEXTS]
    ref = _st(path).encode(texts)
    got = _ours(path).encode_texts(texts).vectors
    assert _cos(ref, got).min() >= 0.9999
    assert _cos(ref, _st(zoo.get("roberta")).encode(texts)).min() < 0.999


@pytest.mark.parametrize("name", ["roberta", "xlmr", "qwen3"])
def test_openvino_backend_equals_sentence_transformers(zoo, name):
    """The OpenVINO backend (encode.backend: openvino) with BPE, SentencePiece and decoder models."""
    path = zoo.get(name)
    ref = _st(path).encode(TEXTS, convert_to_numpy=True)
    enc = _ours(path, backend="openvino")
    assert enc.backend == "openvino"
    got = enc.encode_texts(TEXTS).vectors
    assert got.shape == ref.shape
    assert _cos(ref, got).min() >= 0.9999, _cos(ref, got)
