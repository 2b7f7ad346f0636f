"""BERT static word vectors: exact against a direct transformers computation, exactly-once merges,
backfills, and files plain gensim loads."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.errors import StaticVectorsError
from embedjob.layout import PARTS_DIR
from embedjob.stages.static.config import resolve_layers
from embedjob.stages.static.parts import choose_tiling, commit_static_parts, part_table
from embedjob.storage import Storage
from tests.conftest import SAMPLE_TEXTS, write_shards

DOCS = [
    "The cats sat on the mat; the cat looked unbelievably happy.",
    "Cats and dogs: a dog chased the cat around the garden.",
    "Happy dogs sleep. Unbelievable!",
]


def _encoder_settings(model_path, max_length=None, **encode):
    from embedjob.stages.encode import EncodeConfig, resolve_encoder_settings

    return resolve_encoder_settings(EncodeConfig(model=model_path, dtype="float32", max_length=max_length, **encode))


def _reference(model_path, texts, filters, pooling, layers, max_length):
    """Static vectors computed directly with transformers, one document at a time."""
    import torch
    from gensim.parsing import preprocess_string
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
    idx = resolve_layers(layers, model.config.num_hidden_layers)
    sums, counts = {}, {}
    for text in texts:
        doc_tokens = set(preprocess_string(text, filters))
        enc = tok(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
        with torch.no_grad():
            res = model(input_ids=torch.tensor([enc["input_ids"]]), output_hidden_states=True)
        hs = [res.last_hidden_state[0]] if idx is None else [res.hidden_states[i][0] for i in idx]
        h = torch.stack(hs).mean(0).numpy()
        wids = enc.word_ids()
        truncated = len(enc["input_ids"]) >= max_length
        last = max(w for w in wids if w is not None) if truncated else None
        for w in sorted({w for w in wids if w is not None}):
            if w == last:
                continue
            pos = [p for p, x in enumerate(wids) if x == w]
            a, b = enc["offset_mapping"][pos[0]][0], enc["offset_mapping"][pos[-1]][1]
            toks = preprocess_string(text[a:b], filters)
            if len(toks) != 1 or toks[0] not in doc_tokens:
                continue
            v = {"mean": h[pos].mean(0), "first": h[pos[0]], "last": h[pos[-1]], "max": h[pos].max(0)}[pooling]
            sums[toks[0]] = sums.get(toks[0], 0) + v.astype(np.float64)
            counts[toks[0]] = counts.get(toks[0], 0) + 1
    return {w: sums[w] / counts[w] for w in sums}, counts


def _run_stages_without_ray(tmp_path, model_path, texts, static_kwargs, *, max_length=None, calls=1, **encode):
    """Preprocess -> EncodeActor (with the accumulator) -> commit_static_parts, in-process."""
    from embedjob.layout import STATIC_PART_SUFFIX, TMP
    from embedjob.stages.encode import EncodeActor
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor
    from embedjob.stages.static.config import StaticConfig, static_actor_settings

    out = Storage(str(tmp_path / "out"))

    static = static_actor_settings(StaticConfig(**static_kwargs), model_path, out)
    settings = _encoder_settings(model_path, max_length, **encode)
    pre = Preprocessor(PreprocessConfig(), "text", settings, static)
    actor = EncodeActor(settings, batch_tokens=64, max_batch_docs=2, static=static)
    n = len(texts)
    table = pa.table({"_shard": ["s"] * n, "_row": list(range(n)), "id": [str(i) for i in range(n)], "text": texts})
    bounds = np.linspace(0, n, calls + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        res = actor(pre(table.slice(a, b - a)))
        assert "_words" not in res.column_names and "_word_ids" not in res.column_names
        assert "vector" in res.column_names
    names = out.list(f"{TMP}/s", suffix=STATIC_PART_SUFFIX)
    info = commit_static_parts(out, "s", [f"{TMP}/s/{nm}" for nm in names])
    t = out.read_parquet(f"{PARTS_DIR}/s.parquet")
    sums = np.array(t.column("sum").to_pylist(), dtype=np.float64)
    counts = dict(zip(t.column("word").to_pylist(), t.column("count").to_pylist()))
    vecs = {w: sums[i] / c for i, (w, c) in enumerate(zip(t.column("word").to_pylist(), t.column("count").to_pylist()))}
    return vecs, counts, info, pre.filters


@pytest.mark.parametrize("pooling,layers", [("mean", "last"), ("max", "last4"), ("first", [0, -1]), ("last", "all")])
def test_static_vector_is_average_of_pooled_contextual_vectors(tmp_path, tiny_model, pooling, layers):
    vecs, counts, info, filters = _run_stages_without_ray(
        tmp_path, tiny_model, DOCS, {"word_pooling": pooling, "layers": layers}, calls=2)
    ref, ref_counts = _reference(tiny_model, DOCS, filters, pooling, layers, max_length=128)
    assert counts == ref_counts
    # real lower-cased words, not stems: "cats" and "Cats" are "cats", apart from "cat"
    assert counts["cat"] == 2 and counts["cats"] == 2 and counts["dogs"] == 2 and counts["dog"] == 1
    assert "the" not in counts  # stop words are not in the vocabulary
    for w in ref:
        np.testing.assert_allclose(vecs[w], ref[w], rtol=1e-5, atol=1e-5)
    assert info["staged_parts"] == 2 and info["occurrences"] == sum(counts.values())


def test_truncated_word_is_not_counted_and_ids_match(tmp_path, tiny_model):
    # max_length 8 cuts inside the document: the cut word is left out, the rest is exact
    text = ["Unbelievable cats chase unbelievable dogs across gardens everywhere"]
    vecs, counts, _, filters = _run_stages_without_ray(tmp_path, tiny_model, text, {}, max_length=8,
                                                       long_documents="truncate")
    ref, ref_counts = _reference(tiny_model, text, filters, "mean", "last", max_length=8)
    assert counts == ref_counts
    for w in ref:
        np.testing.assert_allclose(vecs[w], ref[w], rtol=1e-5, atol=1e-5)


def test_align_words_input_ids_equal_plain_tokenizer(minilm_path):
    from embedjob.schema import INPUT_IDS
    from embedjob.stages.encode import Tokenizer
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor
    from embedjob.stages.static.config import StaticSettings

    settings = _encoder_settings(minilm_path, 16, long_documents="truncate")
    texts = SAMPLE_TEXTS[:4] + [None, "  "]
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})
    static = StaticSettings(word_pooling="mean", layers="last", out_url="memory://x", storage_options={})
    with_static = Preprocessor(PreprocessConfig(), "text", settings, static)(table)
    plain = Preprocessor(PreprocessConfig(), "text", settings)(table)
    assert with_static.column(INPUT_IDS).to_pylist() == plain.column(INPUT_IDS).to_pylist()
    ref = Tokenizer(minilm_path, 16)([t for t in texts if t and t.strip()])
    assert [list(x) for x in ref] == [x for x in plain.column(INPUT_IDS).to_pylist() if x]
    for ids, wids in zip(with_static.column(INPUT_IDS).to_pylist(), with_static.column("_word_ids").to_pylist()):
        assert len(ids) == len(wids)


def _part(out, name, words, counts, dim=4, scale=1.0):
    sums = np.arange(len(words) * dim, dtype=np.float32).reshape(len(words), dim) * scale
    out.write_arrow(name, part_table(words, np.array(counts), sums, dim))
    return sums


def test_retried_or_duplicated_part_does_not_double_count(tmp_path):
    out = Storage(str(tmp_path))
    a = _part(out, "_tmp/s/000000000000-000000000003.static.arrow", ["cat", "dog"], [2, 1])
    b = _part(out, "_tmp/s/000000000004-000000000009.static.arrow", ["cat"], [5])
    # a retry cut differently left a stale part beside the complete set
    _part(out, "_tmp/s/000000000000-000000000005.static.arrow", ["cat", "dog"], [9, 9], scale=100)
    names = [f"_tmp/s/{n}" for n in out.list("_tmp/s")]
    info = commit_static_parts(out, "s", names)
    assert info["staged_parts"] == 2 and info["stale_parts_ignored"] == 1
    t = out.read_parquet(f"{PARTS_DIR}/s.parquet")
    got = {w: (c, np.array(s)) for w, c, s in zip(*(t.column(k).to_pylist() for k in ("word", "count", "sum")))}
    assert got["cat"][0] == 7 and got["dog"][0] == 1
    np.testing.assert_allclose(got["cat"][1], a[0] + b[0])
    # committing again (a retried commit task) gives the same file, not a doubled one
    commit_static_parts(out, "s", names)
    t2 = out.read_parquet(f"{PARTS_DIR}/s.parquet")
    assert t2.equals(t)


def test_parts_that_do_not_tile_the_shard_fail(tmp_path):
    out = Storage(str(tmp_path))
    _part(out, "_tmp/s/000000000000-000000000003.static.arrow", ["cat"], [1])
    _part(out, "_tmp/s/000000000002-000000000009.static.arrow", ["cat"], [1])
    with pytest.raises(StaticVectorsError, match="shard s"):
        commit_static_parts(out, "s", [f"_tmp/s/{n}" for n in out.list("_tmp/s")])


def test_choose_tiling():
    assert choose_tiling([(0, 3), (4, 9)]) == [0, 1]
    assert sorted(choose_tiling([(0, 5), (0, 3), (4, 9), (6, 8)])) == [1, 2]
    assert choose_tiling([(0, 3), (5, 9)]) is None
    assert choose_tiling([(0, 3), (4, 9)], n_rows=12) is None
    many = [(i, i) for i in range(5000)] + [(0, 4998)]
    assert len(choose_tiling(many)) in (2, 5000)


# -- end to end on a real local Ray -------------------------------------------------------------
def _cfg(inp, out, model, **static):
    from embedjob.config import build_config

    return build_config({
        "input": {"url": str(inp)}, "output": {"url": str(out)},
        "encode": {"model": model, "dtype": "float32", "rows_per_call": 5},
        "static": {"min_count": 1, **static},
    })


def test_job_writes_gensim_loadable_vectors_and_backfill_adds_only_new_shards(ray_local, tmp_path, tiny_model):
    from gensim.models import KeyedVectors

    from embedjob.pipeline import run_job

    texts = SAMPLE_TEXTS * 2
    write_shards(tmp_path / "all", texts, n_shards=3)
    os.makedirs(tmp_path / "in")
    for s in (0, 1):
        os.link(tmp_path / "all" / f"part-{s:05d}.parquet", tmp_path / "in" / f"part-{s:05d}.parquet")
    out = tmp_path / "out"
    run_job(_cfg(tmp_path / "in", out, tiny_model))
    kv = KeyedVectors.load_word2vec_format(str(out / "static" / "vectors.bin"), binary=True,
                                           fvocab=str(out / "static" / "vectors.vocab.txt"))
    native = KeyedVectors.load(str(out / "static" / "vectors.kv"))
    assert kv.vector_size == 32 and set(kv.index_to_key) == set(native.index_to_key)
    np.testing.assert_allclose(kv["cat"], native["cat"], rtol=1e-6)
    assert kv.get_vecattr("cat", "count") == native.get_vecattr("cat", "count") >= 2
    assert kv.most_similar("cat", topn=3)
    # keyed by real lower-cased words (no stemming by default), and `similar` spells a query as the job did
    assert "countries" in kv.key_to_index and "countri" not in kv.key_to_index
    from embedjob.similar import similar_words

    assert [w for w, _ in similar_words(str(out), "Countries", n=len(kv) - 1)] == [
        w for w, _ in kv.most_similar("countries", topn=len(kv) - 1)]
    part0 = (out / PARTS_DIR / "part-00000.parquet").stat().st_mtime_ns

    # backfill: add the third shard; only it is encoded and its part merged in
    os.link(tmp_path / "all" / "part-00002.parquet", tmp_path / "in" / "part-00002.parquet")
    res = run_job(_cfg(tmp_path / "in", out, tiny_model))
    assert res.manifest["shards"]["part-00000"]["status"] == "skipped-unchanged"
    assert res.manifest["shards"]["part-00002"]["status"] == "done"
    assert (out / PARTS_DIR / "part-00000.parquet").stat().st_mtime_ns == part0
    backfilled = KeyedVectors.load(str(out / "static" / "vectors.kv"))

    # the same as one run over all three shards, and counts equal the job's gensim token counts
    run_job(_cfg(tmp_path / "all", tmp_path / "fresh", tiny_model))
    fresh = KeyedVectors.load(str(tmp_path / "fresh" / "static" / "vectors.kv"))
    assert set(fresh.index_to_key) == set(backfilled.index_to_key)
    tokens = pq.read_table(tmp_path / "fresh" / "tokens").column("tokens").to_pylist()
    cfs = {}
    for doc in tokens:
        for w in doc:
            cfs[w] = cfs.get(w, 0) + 1
    for w in fresh.index_to_key:
        assert backfilled.get_vecattr(w, "count") == fresh.get_vecattr(w, "count") == cfs[w]
        np.testing.assert_allclose(backfilled[w], fresh[w], rtol=1e-5, atol=1e-6)
    assert set(cfs) == set(fresh.index_to_key)
    assert res.manifest["stages"]["static"]["words"] == len(fresh)


def test_normalize_query_word_uses_the_jobs_preprocessing(tmp_path):
    from embedjob.stages.spelling import normalize_query_word

    out = Storage(str(tmp_path))
    out.write_json("manifest.json", {"config": {"preprocess": {"filters": ["lower", "stem_text"]}}})
    assert normalize_query_word(str(tmp_path), {}, "Running") == "run"
    out.write_json("manifest.json", {"config": {"preprocess": {"filters": ["lower"]}}})
    assert normalize_query_word(str(tmp_path), {}, "Running") == "running"


def test_resolve_layers():
    assert resolve_layers("last", 6) is None
    assert resolve_layers("last4", 6) == (3, 4, 5, 6)
    assert resolve_layers("last4", 2) == (1, 2)
    assert resolve_layers("all", 3) == (1, 2, 3)
    assert resolve_layers([0, -1], 6) == (0, 6)
    with pytest.raises(ValueError, match="static.layers"):
        resolve_layers([7], 6)
