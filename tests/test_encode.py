import numpy as np
import pytest

from embedjob.stages.encode import EncodeConfig, TextEncoder, resolve_dtype, token_budget_batches
from tests.conftest import SAMPLE_TEXTS


def test_token_budget_batches_cover_all_and_respect_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 300, size=500)
    batches = token_budget_batches(lengths, batch_tokens=2048, max_docs=64)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or len(b) * lengths[b].max() <= 2048
    # longest first: padding is small because neighbours have similar lengths
    assert lengths[batches[0]].max() == lengths.max()


def test_single_overlong_document_gets_its_own_batch():
    assert [len(b) for b in token_budget_batches(np.array([5000, 3]), 100, 8)] == [1, 1]


def test_matches_sentence_transformers_fp32(minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = SAMPLE_TEXTS + ["word " * 400, "x"]  # one truncated, one tiny
    ref = SentenceTransformer(minilm_path, device="cpu").encode(texts, convert_to_numpy=True)
    enc = TextEncoder.from_config(EncodeConfig(dtype="float32", batch_tokens=512, long_documents="truncate"))
    got = enc.encode_texts(texts).vectors
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.999, cos
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # Normalize module honoured


def test_order_restored_and_batching_invariant(tiny_model):
    texts = SAMPLE_TEXTS * 3
    a = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32", batch_tokens=64)).encode_texts(texts)
    b = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32", batch_tokens=100000)).encode_texts(texts)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
    np.testing.assert_allclose(a.vectors[:12], a.vectors[12:24], atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_pooling_modes(tiny_model, pooling):
    import torch
    from transformers import AutoModel, AutoTokenizer

    enc = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32", pooling=pooling, normalize=False))
    texts = SAMPLE_TEXTS[:3]
    got = enc.encode_texts(texts).vectors
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModel.from_pretrained(tiny_model).eval()
    for i, t in enumerate(texts):
        with torch.no_grad():
            h = model(**tok(t, return_tensors="pt")).last_hidden_state[0]
        want = {"mean": h.mean(0), "cls": h[0], "max": h.max(0).values}[pooling].numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-4)


def test_bf16_close_to_fp32(tiny_model):
    texts = SAMPLE_TEXTS
    a = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32")).encode_texts(texts).vectors
    b = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="bfloat16")).encode_texts(texts).vectors
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_dtype_auto():
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("auto", "cpu") in ("bfloat16", "float32")


def test_model_errors_name_the_setting(tmp_path):
    from embedjob.models import ModelError, resolve_model_path

    with pytest.raises(ModelError, match="encode.model='nope'"):
        resolve_model_path("nope")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_packed_batches_match_padded(tiny_model, pooling):
    """The padding-free forward gives the model's own vectors, in input order, for every pooling."""
    texts = SAMPLE_TEXTS * 2 + ["word " * 300, "x"]
    cfg = EncodeConfig(model=tiny_model, dtype="float32", pooling=pooling, batch_tokens=256)
    padded = TextEncoder.from_config(cfg, batching="padded")
    packed = TextEncoder.from_config(cfg, batching="packed")
    assert (padded.batching, packed.batching) == ("padded", "packed")
    a, b = padded.encode_texts(texts), packed.encode_texts(texts)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=2e-5)
    np.testing.assert_array_equal(a.n_tokens, b.n_tokens)
    # packed batches compute real tokens only; padded ones pad to the longest (rounded up to 16)
    assert packed.counters["computed_tokens"] == packed.counters["tokens"] == int(a.encoded_tokens.sum())
    assert padded.counters["computed_tokens"] > padded.counters["tokens"]


def test_packed_token_hook_sees_the_padded_layout(tiny_model):
    """The static word-vector hook gets the same hidden states and mask from both batchings."""
    texts = SAMPLE_TEXTS[:6]
    got = {}
    for mode in ("padded", "packed"):
        enc = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32", batch_tokens=100000),
                                      batching=mode, output_hidden_layers=(-1, 1))
        seen = {}

        def hook(layers, mask, idx, spans, seen=seen):
            for r, j in enumerate(idx):
                L = int(mask[r].sum())
                seen[int(j)] = [h[r, :L].float().numpy() for h in layers]

        enc.encode_texts(texts, token_hook=hook)
        got[mode] = seen
    for j in range(len(texts)):
        for x, y in zip(got["padded"][j], got["packed"][j]):
            np.testing.assert_allclose(x, y, atol=2e-5)


def test_packed_batches_respect_the_real_token_budget():
    from embedjob.stages.encode.packed import packed_batches

    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 300, size=400)
    batches = packed_batches(lengths, batch_tokens=2048, max_docs=64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(400))
    assert all(len(b) <= 64 and (len(b) == 1 or lengths[b].sum() <= 2048) for b in batches)
    assert [len(b) for b in packed_batches(np.array([5000, 3]), 100, 8)] == [1, 1]


def test_encoder_core_imports_without_ray_gensim_faiss_pydantic():
    """`.ci/gpu-check` runs the encoder on a bare GPU host that has none of these."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('ray', 'gensim', 'faiss', 'pydantic'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from embedjob.stages.encode import TextEncoder, EncoderSettings\n"
            "from embedjob.stages.encode.packed import PackedBert\n"
            "import embedjob.bench.gpu_check\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_openvino_backend_matches_torch(tiny_model, tmp_path):
    """encode.backend=openvino: exported once to the cache, the same vectors and token-hook layers
    as torch, and a second encoder reads the cached IR instead of exporting again."""
    cfg = EncodeConfig(model=tiny_model, dtype="float32", backend="openvino", cache_dir=str(tmp_path / "ov"))
    torch_enc = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32"), batching="padded")
    ov_enc = TextEncoder.from_config(cfg)
    assert ov_enc.backend == ov_enc.settings.backend == "openvino" and ov_enc.batching == "padded"
    texts = SAMPLE_TEXTS * 2 + ["word " * 300]
    a, b = torch_enc.encode_texts(texts).vectors, ov_enc.encode_texts(texts).vectors
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9999, cos
    cached = sorted(p.name for p in (tmp_path / "ov").iterdir())
    assert any(n.endswith(".xml") for n in cached) and any(n.endswith(".bin") for n in cached)
    seen = {}
    for name, enc in (("torch", torch_enc), ("ov", ov_enc)):
        enc.output_hidden_layers = (1,)
        enc.encode_texts(texts[:3], token_hook=lambda layers, mask, idx, spans, name=name: seen.setdefault(
            name, layers[0].float().numpy()))
    np.testing.assert_allclose(seen["torch"], seen["ov"], atol=1e-3)
    again = TextEncoder.from_config(cfg)  # from the cache
    np.testing.assert_allclose(again.encode_texts(texts).vectors, b, atol=1e-6)
