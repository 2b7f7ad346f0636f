"""Long documents as overlapping windows (encode.long_documents: windows): every token reaches the
encoder, windows are combined before normalising, static word vectors count each occurrence once,
huge documents are capped and counted, and the recipe changes with the window settings."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.stages.encode import EncodeConfig, TextEncoder
from embedjob.stages.encode.windows import (
    WindowPlan,
    cut_document,
    max_document_tokens,
    plan_windows,
    snap_slack,
    window_content,
)
from tests.conftest import SAMPLE_TEXTS, write_shards
from tests.helpers import small_job

LONG = " ".join(SAMPLE_TEXTS)  # ~170 tokens


@pytest.mark.parametrize("snap", [False, True])
@pytest.mark.parametrize("max_length,overlap", [(16, 4), (32, 0), (256, 32), (10, 4), (64, 31)])
def test_windows_cover_every_token_and_own_each_once(max_length, overlap, snap):
    rng = np.random.default_rng(0)
    lengths = np.concatenate([[2, 3, max_length, max_length + 1], rng.integers(2, 40 * max_length, 200)])
    # sentence starts at random, from dense (every 3rd token) to none
    starts = [np.flatnonzero(rng.random(L) < rng.choice([0.0, 0.05, 0.3])) for L in lengths.tolist()]
    starts = [b[(b >= 2) & (b <= L - 2)] for b, L in zip(starts, lengths.tolist())]
    plain = plan_windows(lengths, max_length, overlap, max_windows=10_000)
    plan = plan_windows(lengths, max_length, overlap, 10_000, starts if snap else None)
    assert not plan.capped.any()
    assert (plan.n_tokens <= max_length).all()
    assert plan.windows.tolist() == plain.windows.tolist()  # snapping never adds a window
    slack = snap_slack(max_length, overlap)
    for d, L in enumerate(lengths.tolist()):
        w = np.flatnonzero(plan.doc == d)
        assert len(w) == plan.windows[d]
        covered = np.zeros(L, dtype=int)
        owned = np.zeros(L, dtype=int)
        for k in w:
            covered[plan.start[k]:plan.end[k]] += 1
            owned[plan.own_lo[k]:plan.own_hi[k]] += 1
            # a window owns only positions it holds (or the document's own [CLS]/[SEP])
            inner = np.arange(plan.own_lo[k], plan.own_hi[k])
            inner = inner[(inner > 0) & (inner < L - 1)]
            assert ((inner >= plan.start[k]) & (inner < plan.end[k])).all()
        assert (covered[1:L - 1] >= 1).all(), "every content token is in some window"
        assert (owned == 1).all(), "every position is owned by exactly one window"
        if len(w) > 1:
            assert plan.end[w[-1]] == L - 1  # the last window ends with the document
            assert (np.diff(plan.start[w]) > 0).all()
            if not snap:  # consecutive windows overlap by at least `overlap` tokens
                assert (plan.end[w[:-1]] - plan.start[w[1:]] >= overlap).all()
            b = set(starts[d].tolist())
            for i in range(1, len(w) - 1):  # a start moves back to the nearest sentence start within the slack
                s0, prev = plain.start[w[i]], plan.start[w[i - 1]]
                near = [p for p in range(s0 - slack, s0 + 1) if p in b and p > prev]
                assert plan.start[w[i]] == (max(near) if snap and near and slack else s0)
            for i in range(len(w) - 1):  # an end moves back only onto a sentence start
                e0 = plan.start[w[i]] + window_content(max_length)
                assert plan.end[w[i]] == e0 or (snap and plan.end[w[i]] in b and plan.end[w[i]] >= e0 - slack)


SENTENCES = " ".join(f"{s} {i}." for i, s in enumerate(
    ["The cat sat", "Birds fly south", "Rain fell today", "A dog barked", "Ships left port", "Snow covered hills"] * 12))


def test_snapped_chunks_start_and_end_with_whole_sentences(tmp_path, tiny_model):
    """With encode.snap_to_sentences, every chunk's text starts with a sentence and ends with its
    full stop (short sentences: there is always one within the slack), and the chunks still cover
    every token; without it they cut sentences."""
    from embedjob.schema import CHUNK_CHARS
    from embedjob.stages.encode import resolve_encoder_settings
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor

    spans = {}
    for snap in (False, True):
        st = resolve_encoder_settings(EncodeConfig(model=tiny_model, max_length=32, window_overlap=8,
                                                   write_chunks=True, snap_to_sentences=snap))
        table = pa.table({"_shard": ["s"], "_row": [0], "id": ["d"], "text": [SENTENCES]})
        c = Preprocessor(PreprocessConfig(), "text", st)(table).column(CHUNK_CHARS).to_pylist()[0]
        spans[snap] = list(zip(c[0::2], c[1::2]))
    assert len(spans[True]) == len(spans[False]) > 10
    texts = {snap: [SENTENCES[a:b] for a, b in sp] for snap, sp in spans.items()}
    assert all(t[0].isupper() and t.endswith(".") for t in texts[True])
    assert not all(t[0].isupper() and t.endswith(".") for t in texts[False])
    for (a, b), (a2, b2) in zip(spans[True], spans[True][1:]):
        assert a < a2 <= b < b2  # in order, overlapping or touching: every token covered
    assert spans[True][0][0] == 0 and spans[True][-1][1] == len(SENTENCES)


def test_cap_counts_windows_and_matches_the_tokenizer_cap():
    cap = max_document_tokens(16, 4, 5)
    plan = plan_windows(np.array([cap, cap + 1, 10 * cap]), 16, 4, 5)
    assert plan.windows.tolist() == [5, 5, 5]
    assert plan.capped.tolist() == [False, True, True]


def _windows_reference(enc_trunc, ids, enc_windows, mode):
    """A document's vector computed by hand: its windows (as ``enc_windows`` plans them, snapped to
    sentences by default) encoded one by one, combined, normalised."""
    from embedjob.stages.encode.windows import plan_for

    plan = plan_for(enc_windows.settings, [ids], enc_windows.tokenizer.sentence_end_ids)
    wins = [ids if plan.whole[k] else np.concatenate([ids[:1], ids[plan.start[k]:plan.end[k]], ids[-1:]])
            for k in range(len(plan.doc))]
    vecs = enc_trunc.encode_ids(wins).vectors
    w = plan.n_tokens.astype(np.float64)
    v = {"mean": (vecs * w[:, None]).sum(0) / w.sum(), "first": vecs[0], "max": vecs.max(0)}[mode]
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("mode", ["mean", "first", "max"])
def test_document_vector_combines_windows_before_normalising_in_order(tiny_model, mode):
    kw = dict(model=tiny_model, dtype="float32", max_length=32, window_overlap=8, normalize=True)
    texts = [LONG, "a short one", LONG[::-1], "x", LONG[:300]] * 2
    got = {}
    for batching, budget in (("padded", 64), ("packed", 100_000)):
        enc = TextEncoder.from_config(EncodeConfig(window_pooling=mode, batch_tokens=budget, **kw), batching=batching)
        got[batching] = enc.encode_texts(texts)
    a, b = got["padded"], got["packed"]
    np.testing.assert_allclose(a.vectors, b.vectors, atol=2e-5)  # order restored whatever the batches
    np.testing.assert_allclose(a.vectors[:5], a.vectors[5:], atol=1e-6)
    trunc = TextEncoder.from_config(EncodeConfig(long_documents="truncate", pooling="mean", **kw))
    trunc.settings.normalize = False  # raw window vectors: the reference combines, then normalises
    full = TextEncoder.from_config(EncodeConfig(long_documents="truncate", **{**kw, "max_length": 512}))
    for i, t in enumerate(texts[:5]):
        ids = np.asarray(full.tokenizer.encode([t]).ids[0], dtype=np.int32)
        assert a.n_tokens[i] == len(ids)  # n_tokens counts the whole document
        ref = _windows_reference(trunc, ids, enc, mode)
        np.testing.assert_allclose(a.vectors[i], ref, atol=1e-5)
    assert a.windows[0] > 1 and a.windows[1] == 1
    # a short document gets exactly the vector truncation gives it
    short = TextEncoder.from_config(EncodeConfig(long_documents="truncate", **kw)).encode_texts(["a short one"])
    np.testing.assert_allclose(a.vectors[1], short.vectors[0], atol=1e-6)


def test_huge_document_is_capped_and_counted(tiny_model):
    enc = TextEncoder.from_config(EncodeConfig(model=tiny_model, dtype="float32", max_length=64, max_windows=4))
    huge = "word " * 200_000  # a million characters
    r = enc.encode_texts(["tiny", huge])
    assert r.capped.tolist() == [False, True]
    assert r.windows.tolist() == [1, 4]
    assert r.n_tokens[1] == 200_002  # the whole document's tokens, [CLS] and [SEP] included
    assert r.encoded_tokens[1] == 4 * 64
    assert enc.counters["capped_docs"] == 1 and enc.counters["windows"] == 5
    assert np.isfinite(r.vectors).all()


# Text that stresses a tokenizer's word boundaries: accents, CJK, punctuation, tabs and newlines,
# runs of spaces, control characters BERT drops, and a 3,000-character "word" with no whitespace.
AWKWARD = ("Café naïve – résumé!  Tabs\there,\nnew lines\r\n and   runs of spaces. 日本語のテキスト。"
           "e-mail: a.b@c.org (x) [y] {z}; \x1cjoined\x1fwords\x0b 3.14 1,000 " * 60
           + "x" * 3000 + " tail words at the very end")


@pytest.mark.parametrize("max_tokens,words", [(10**7, True), (10**7, False), (600, True), (None, True)])
def test_long_texts_tokenise_in_pieces_exactly_as_in_one_call(minilm_path, max_tokens, words):
    """A text longer than a tokenizer call is cut into whitespace-bounded pieces (bounded memory);
    ids, the whole-document count, word ids and character offsets are those of one call, in
    windows mode (every token, or the cap) and in truncation (max_tokens None)."""
    from embedjob.stages.encode.tokenizer import Tokenizer, piece_spans

    texts = ["short", AWKWARD, "", AWKWARD[:700], AWKWARD[::-1], "two words"]
    one = Tokenizer(minilm_path, 256, max_tokens, call_chars=10**9).encode(texts, words=words)
    pieces = Tokenizer(minilm_path, 256, max_tokens, call_chars=500).encode(texts, words=words)
    assert len(piece_spans(AWKWARD, 500)) > 15
    assert pieces.ids == one.ids
    assert pieces.doc_tokens.tolist() == one.doc_tokens.tolist()
    if max_tokens == 10**7:
        assert pieces.doc_tokens[1] == len(pieces.ids[1]) > 3000
    if words:
        assert pieces.word_ids == one.word_ids
        assert pieces.offsets == one.offsets


def test_piece_spans_cover_the_text_and_cut_before_whitespace():
    from embedjob.stages.encode.tokenizer import piece_spans

    spans = piece_spans(AWKWARD, 300)
    assert spans[0][0] == 0 and spans[-1][1] == len(AWKWARD)
    assert all(b == a2 for (_, b), (a2, _) in zip(spans, spans[1:]))
    for a, b in spans[1:]:
        assert AWKWARD[a] in " \t\n\r" and AWKWARD[a - 1] not in " \t\n\r" or b - a == 300 or a == spans[-1][0]


_RSS_SCRIPT = """
import resource, sys
from embedjob.stages.encode import EncodeConfig, TextEncoder
enc = TextEncoder.from_config(EncodeConfig(model=sys.argv[1], dtype="float32", max_length=64, max_windows=8))
enc.encode_texts(["warm up " * 2000])
text = "alpha beta, gamma delta! " * int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = enc.encode_texts(["tiny", text])
rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(rise // 1024, int(r.n_tokens[1]), bool(r.capped[1]), int(r.windows[1]))
"""


def test_huge_document_keeps_memory_flat(tiny_model):
    """Peak RSS while encoding a capped 16-million-character document rises by no more than a
    2-million-character one's: tokenizer memory is per call (``CALL_CHARS``), not per document
    (before, one 8M-character document raised the peak by 1.3 GiB; now both rise ~60 MiB)."""
    import subprocess
    import sys

    rises = {}
    for reps in (80_000, 640_000):  # 2M and 16M characters
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, tiny_model, str(reps)], check=True,
                             capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        rise, n_tokens, capped, windows = out.stdout.split()[-4:]
        assert int(n_tokens) == 6 * reps + 2 and capped == "True" and int(windows) == 8  # counted whole
        rises[reps] = int(rise)
    assert rises[640_000] <= rises[80_000] + 64, f"peak RSS rise in MiB by document size: {rises}"


@pytest.mark.parametrize("overlap,snap", [(7, False), (4, True)])
def test_overlapping_windows_count_each_static_occurrence_once(tmp_path, tiny_model, overlap, snap):
    """With hidden states of ones, a word's pooled vector is 1 exactly when each of its occurrences
    was taken by one window: overlapping windows would make it 2, a dropped one less than 1. Also
    with windows snapped to sentences (irregular windows)."""
    import torch

    from embedjob.stages.encode import resolve_encoder_settings
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor
    from embedjob.stages.static.accumulate import StaticAccumulator

    cfg = EncodeConfig(model=tiny_model, dtype="float32", max_length=16, window_overlap=overlap,
                       snap_to_sentences=snap)
    settings = resolve_encoder_settings(cfg)
    texts = [LONG, "Unbelievable cats chase unbelievable dogs " * 20, "cats", "Cats chase dogs. Dogs run! " * 9]
    n = len(texts)
    table = pa.table({"_shard": ["s"] * n, "_row": list(range(n)), "id": [str(i) for i in range(n)], "text": texts})
    pre = Preprocessor(PreprocessConfig(), "text", settings, {"out_url": str(tmp_path)})(table)
    enc = TextEncoder(settings, batch_tokens=64, max_batch_docs=3)
    acc = StaticAccumulator(enc, out_url=str(tmp_path / "out"), word_pooling="mean")
    hook = acc.hook_for(pre, np.ones(n, dtype=bool))

    def ones(layers, mask, idx, spans):
        hook([torch.ones_like(layers[0])], mask, idx, spans)

    ids = [np.asarray(x, dtype=np.int32) for x in pre.column("_input_ids").to_pylist()]
    r = enc.encode_ids(ids, token_hook=ones, doc_tokens=pre.column("_doc_tokens").to_numpy())
    assert r.windows[0] > 5 and r.windows[1] > 5
    if snap:  # the sentence document's windows were moved onto its sentences
        plain = plan_windows(np.array([len(ids[3])]), 16, overlap, 64)
        assert plain.start[1:-1].tolist() != enc_plan_starts(enc, ids[3])[1:-1]
    st = acc._state
    per_occurrence = st.sums.numpy()[:, 0] / st.counts
    np.testing.assert_allclose(per_occurrence, 1.0, atol=1e-6)
    assert st.counts.sum() == sum(len(w) for w in pre.column("_words").to_pylist())


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_static_pieces_weighed_at_once_equal_the_pooled_occurrences(tmp_path, tiny_model, pooling):
    """The accumulator adds each piece to its slot at once, weighed (batch_pieces), where pieces are
    consecutive: the same sums as pooling each occurrence first (window_pieces and _pool), on the
    model's real hidden states, with overlapping windows, words cut at a window's end and a
    document cut at the cap."""
    import torch

    from embedjob.stages.encode import resolve_encoder_settings
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor
    from embedjob.stages.static.accumulate import StaticAccumulator

    cfg = EncodeConfig(model=tiny_model, dtype="float32", max_length=16, window_overlap=5, max_windows=6)
    settings = resolve_encoder_settings(cfg)
    texts = [LONG, "Unbelievable antidisestablishmentarianism chases incomprehensibilities " * 12, "cats",
             "Cats chase dogs. Dogs run! " * 9]
    n = len(texts)
    table = pa.table({"_shard": ["s"] * n, "_row": list(range(n)), "id": [str(i) for i in range(n)], "text": texts})
    pre = Preprocessor(PreprocessConfig(), "text", settings, {"out_url": str(tmp_path)})(table)
    ids = [np.asarray(x, dtype=np.int32) for x in pre.column("_input_ids").to_pylist()]
    sums = {}
    for fast in (True, False):
        enc = TextEncoder(settings, batch_tokens=64, max_batch_docs=3)
        acc = StaticAccumulator(enc, out_url=str(tmp_path / "out"), word_pooling=pooling)
        hook = acc.hook_for(pre, np.ones(n, dtype=bool))
        assert acc._state.pieces is not None
        if not fast:
            acc._state.pieces = None  # each occurrence pooled first, then added
        enc.encode_ids(ids, token_hook=hook, doc_tokens=pre.column("_doc_tokens").to_numpy())
        sums[fast] = acc._state.sums.numpy().copy()
    assert np.abs(sums[True]).sum() > 0
    np.testing.assert_allclose(sums[True], sums[False], rtol=1e-5, atol=1e-5)
    assert torch.is_tensor(acc._state.sums)


def enc_plan_starts(enc, ids) -> list:
    from embedjob.stages.encode.windows import plan_for

    return plan_for(enc.settings, [ids], enc.tokenizer.sentence_end_ids).start.tolist()


def test_static_vectors_with_windows_through_the_actor(tmp_path, tiny_model):
    """Preprocess -> EncodeActor (accumulator) -> parts: every occurrence counted, words past the
    first window included."""
    from tests.test_static import _run_stages_without_ray

    text = [LONG + " Zebras graze."]
    _, counts_w, info, _ = _run_stages_without_ray(tmp_path / "w", tiny_model, text, {}, max_length=16)
    _, counts_t, _, _ = _run_stages_without_ray(tmp_path / "t", tiny_model, text, {}, max_length=16,
                                                long_documents="truncate")
    assert "zebras" in counts_w and "zebras" not in counts_t
    assert sum(counts_w.values()) > 5 * sum(counts_t.values())
    assert info["occurrences"] == sum(counts_w.values())


BOILERPLATE = (
    "This document is provided by the regional archive service under its standard terms of use. "
    "Copying, redistribution and reuse are permitted for personal and educational purposes only, "
    "provided that this notice is kept intact and the source is acknowledged in every copy. "
    "The archive makes no warranty of any kind, express or implied, including but not limited to "
    "warranties of merchantability, fitness for a particular purpose and non-infringement. "
    "In no event shall the archive or its contributors be liable for any claim, damages or other "
    "liability arising from, out of or in connection with the document or its use. "
) * 3
TOPICS = {
    "astronomy": ["Astronomy notes: the telescope revealed distant galaxies, nebulae and the rings of Saturn. "
                  "Astronomers charted the stars and planets of the night sky.",
                  "Astronomy notes: astronomers measured the orbit of a comet passing the planets and the sun. "
                  "The observatory telescope tracked the stars all night."],
    "cooking": ["Cooking notes: in the kitchen, chop the onions and garlic, then simmer them in butter with "
                "tomatoes. Season the sauce and serve the dish hot.",
                "Cooking notes: in the kitchen, knead the bread dough, then bake it in a hot oven until golden. "
                "Serve the warm loaf with butter."],
    "football": ["Football notes: the striker scored a late goal and the team won the league championship "
                 "match. The fans cheered in the stadium.",
                 "Football notes: the goalkeeper saved a penalty kick and the team won the cup final. "
                 "The football fans cheered in the stadium."],
}


def test_same_boilerplate_different_endings_are_told_apart(minilm_path):
    texts, labels = [], []
    for topic, endings in TOPICS.items():
        for e in endings:
            texts.append(BOILERPLATE + e)
            labels.append(topic)
    default = TextEncoder.from_config(EncodeConfig(dtype="float32"))
    assert default.settings.long_documents == "windows"
    r = default.encode_texts(texts)
    assert (r.n_tokens > 300).all() and (r.windows > 1).all()
    sim = r.vectors @ r.vectors.T
    np.fill_diagonal(sim, -1)
    nearest = sim.argmax(1)
    assert [labels[j] for j in nearest] == labels, sim
    trunc = TextEncoder.from_config(EncodeConfig(dtype="float32", long_documents="truncate")).encode_texts(texts)
    # truncation sees the boilerplate only: every document gets the same vector
    assert np.abs(trunc.vectors - trunc.vectors[0]).max() < 1e-5


def test_recipe_changes_with_window_settings(tmp_path, tiny_model):
    from embedjob.pipeline import shard_stage_hash
    from embedjob.stages.encode import resolve_encoder_settings

    def recipe(**encode):
        cfg = small_job(tmp_path, tmp_path / "o", tiny_model, encode=encode)
        return shard_stage_hash(cfg, resolve_encoder_settings(cfg.encode))

    hashes = [recipe(), recipe(long_documents="truncate"), recipe(window_overlap=8), recipe(max_windows=8),
              recipe(window_pooling="max"), recipe(snap_to_sentences=False)]
    assert len(set(hashes)) == len(hashes)
    # the window settings do not touch a truncating job's recipe (its earlier outputs stay valid)
    assert recipe(long_documents="truncate") == recipe(long_documents="truncate", window_overlap=8)
    assert recipe(long_documents="truncate") == recipe(long_documents="truncate", snap_to_sentences=False)


def test_job_encodes_windows_and_records_them(ray_local, tmp_path, tiny_model):
    texts = SAMPLE_TEXTS[:4] + [LONG, "word " * 2000]
    ids = write_shards(tmp_path / "in", texts, n_shards=2)
    from embedjob.pipeline import run_job

    cfg = small_job(tmp_path / "in", tmp_path / "out", tiny_model,
                    encode={"max_length": 32, "window_overlap": 8, "max_windows": 8, "write_chunks": True})
    res = run_job(cfg)
    out = tmp_path / "out"
    t = pq.read_table(os.path.join(out, "vectors"))
    n_tokens = dict(zip(t.column("id").to_pylist(), t.column("n_tokens").to_pylist()))
    enc = TextEncoder.from_config(cfg.encode)
    ref = enc.encode_texts(texts)
    assert [n_tokens[i] for i in ids] == ref.n_tokens.tolist()
    assert n_tokens[ids[5]] == 2002  # the whole document, though only 8 windows were encoded
    got = dict(zip(t.column("id").to_pylist(), np.array(t.column("vector").to_pylist(), dtype=np.float32)))
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), ref.vectors, atol=1e-4)
    stats = json.loads((out / "stats" / "encode.json").read_text())
    assert stats["windows"] == int(ref.windows.sum()) > len(texts)
    assert stats["encoded_tokens"] == int(ref.encoded_tokens.sum())
    assert stats["capped_documents"] == 1 and stats["capped_ids"] == [ids[5]]
    m = res.manifest
    assert m["encoder"]["long_documents"] == "windows" and m["encoder"]["window_overlap"] == 8
    assert m["stages"]["encode"]["capped_documents"] == 1
    chunks = pq.read_table(os.path.join(out, "chunks"))
    assert chunks.num_rows == stats["windows"]
    assert sorted(m["shards"]["part-00000"]["outputs"]) == ["chunks", "tokens", "vectors"]
    ends = {}
    for r in chunks.select(["id", "end_char"]).to_pylist():
        ends[r["id"]] = max(ends.get(r["id"], 0), r["end_char"])
    assert ends[ids[4]] == len(texts[4])  # the whole text is covered


def test_report_shows_windows_and_capped_documents():
    from embedjob.report.build import run_section

    manifest = {"status": "ok", "totals": {"shards": 1, "done": 1, "rows_out": 5}, "shards": {},
                "encoder": {"long_documents": "windows", "window_overlap": 32, "max_windows": 64, "max_length": 256},
                "stages": {"encode": {"documents": 5, "bert_tokens": 6000, "encoded_tokens": 6100, "windows": 27,
                                      "capped_documents": 1, "capped_ids": ["d4"], "seconds": 2.0}}}
    html = run_section(manifest)
    assert "documents capped at max_windows 64" in html and "6,100 / 27" in html
    assert "truncated at max_length" not in html


def test_write_chunks_spans_round_trip_to_the_text(tmp_path, tiny_model):
    """Preprocess -> EncodeActor -> staged part -> commit, in-process: chunks/<shard>.parquet has one
    row per window whose character span is that window's text."""
    from embedjob.stages.encode import EncodeActor, resolve_encoder_settings
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor
    from embedjob.stages.write import BlockWriter, commit_shard

    settings = resolve_encoder_settings(EncodeConfig(model=tiny_model, dtype="float32", max_length=32,
                                                     window_overlap=8, write_chunks=True))
    texts = [LONG + " The zebra crossing is near the old mill.", "A short text.", None, "  " + LONG[:200]]
    n = len(texts)
    table = pa.table({"_shard": ["s"] * n, "_row": list(range(n)), "id": [f"d{i}" for i in range(n)], "text": texts})
    res = EncodeActor(settings, batch_tokens=128, max_batch_docs=4)(Preprocessor(PreprocessConfig(), "text", settings)(table))
    out = str(tmp_path / "out")
    BlockWriter(out, {}, "id")(res)
    marker = commit_shard(out, {}, "s", n, "keep", {}, 32)
    assert marker["outputs"]["chunks"] == "chunks/s.parquet"
    chunks = pq.read_table(os.path.join(out, "chunks", "s.parquet")).to_pylist()
    vectors = {r["id"]: r for r in pq.read_table(os.path.join(out, "vectors", "s.parquet")).to_pylist()}
    enc = TextEncoder(settings, batch_tokens=128)
    by_id: dict = {}
    for c in chunks:
        by_id.setdefault(c["id"], []).append(c)
    assert sorted(by_id) == ["d0", "d1", "d3"]  # no chunk for a row without text
    for i in (0, 1, 3):
        cs = by_id[f"d{i}"]
        assert [c["chunk"] for c in cs] == list(range(len(cs)))
        assert cs[0]["start_char"] == len(texts[i]) - len(texts[i].lstrip())
        assert cs[-1]["end_char"] == len(texts[i].rstrip())
        for c in cs:  # each span's text, tokenised, is the window's content
            piece = texts[i][c["start_char"]:c["end_char"]]
            assert len(enc.tokenizer.encode([piece]).ids[0]) == c["n_tokens"]
        assert sum(c["n_tokens"] for c in cs) == enc.encode_texts([texts[i]]).encoded_tokens[0]
    assert len(by_id["d0"]) > 3 and "zebra" in texts[0][by_id["d0"][-1]["start_char"]:by_id["d0"][-1]["end_char"]]
    np.testing.assert_allclose(by_id["d1"][0]["vector"], vectors["d1"]["vector"], atol=1e-6)
    # a document's vector is the token-weighted mean of its chunks' (unnormalised here: the tiny model)
    cs = by_id["d0"]
    w = np.array([c["n_tokens"] for c in cs], dtype=np.float64)
    mean = (np.array([c["vector"] for c in cs]) * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(mean, vectors["d0"]["vector"], atol=1e-5)


PLANTED = "The lighthouse keeper repainted the rusty spiral staircase a bright shade of blue."


def test_search_returns_the_passage_that_holds_a_planted_phrase(ray_local, tmp_path, minilm_path):
    """encode.write_chunks + index: `embedjob search` ranks documents by their best passage and
    shows that passage; the planted phrase sits in the middle of a long document."""
    from embedjob.pipeline import run_job
    from embedjob.stages.index.search import search, search_report

    fillers = [" ".join(SAMPLE_TEXTS[i:] + SAMPLE_TEXTS[:i]) for i in range(6)]
    texts = [f"{fillers[0]} {PLANTED} {fillers[1]}"] + fillers[2:]
    ids = write_shards(tmp_path / "in", texts, n_shards=2)
    cfg = small_job(tmp_path / "in", tmp_path / "out", minilm_path, index={"enabled": True},
                    encode={"max_length": 48, "window_overlap": 8, "write_chunks": True})
    res = run_job(cfg)
    assert res.manifest["stages"]["index"]["chunks"]["count"] == res.manifest["stages"]["encode"]["windows"]
    out = str(tmp_path / "out")
    hits = search(out, None, "a lighthouse keeper painting the stairs blue", k=3)
    assert hits[0]["id"] == ids[0] and "lighthouse keeper" in hits[0]["passage"]
    assert hits[0]["passage"] == texts[0][hits[0]["start_char"]:hits[0]["end_char"]]
    assert len({h["id"] for h in hits}) == len(hits)  # one hit per document: its best passage
    docs = search(out, None, "a lighthouse keeper painting the stairs blue", k=3, level="doc")
    assert "passage" not in docs[0] and docs[0]["text_start"]
    line = search_report(out, "a lighthouse keeper painting the stairs blue", k=1)
    assert ids[0] in line and hits[0]["passage"].replace("\n", " ")[:100] in line  # the passage, not the head


def _plan_windows_reference(lengths, max_length, overlap, max_windows, sentences=None, head=1, tail=1) -> WindowPlan:
    """The per-document original of :func:`plan_windows` (a Python pass and arrays per document,
    short ones included); a long document's windows are cut by the same :func:`cut_document`."""
    k = window_content(max_length, head, tail)
    stride = max(1, k - overlap)
    slack = snap_slack(max_length, overlap, head, tail)
    docs, starts, ends, wholes, lo, hi = [], [], [], [], [], []
    n = len(lengths)
    windows = np.zeros(n, dtype=np.int32)
    capped = np.zeros(n, dtype=bool)
    for d in range(n):
        L = int(lengths[d])
        if L <= max_length:
            s, e, whole, lo_d, hi_d = np.array([0]), np.array([L]), np.array([True]), np.array([0]), np.array([L])
        else:
            b = sentences[d] if sentences is not None and slack else None
            s, e, lo_d, hi_d, capped[d] = cut_document(L, k, stride, slack, max_windows, b, head, tail)
            whole = np.zeros(len(s), dtype=bool)
        docs.append(np.full(len(s), d, dtype=np.int64))
        starts.append(s)
        ends.append(e)
        wholes.append(whole)
        lo.append(lo_d)
        hi.append(hi_d)
        windows[d] = len(s)
    if not n:
        z = np.zeros(0, np.int64)
        return WindowPlan(z, z, z, np.zeros(0, bool), z, z, windows, capped, head, tail)
    cat = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
    return WindowPlan(cat(docs), cat(starts), cat(ends), np.concatenate(wholes), cat(lo), cat(hi), windows, capped,
                      head, tail)


@pytest.mark.parametrize("max_length,overlap,max_windows", [(16, 4, 10_000), (32, 0, 3), (256, 32, 64), (10, 4, 2)])
def test_plan_windows_equals_the_per_document_original(max_length, overlap, max_windows):
    """Short documents planned at once, long ones cut one by one: the same plan as the per-document
    loop it replaced, field by field, with and without sentence snapping, capped or not, empty batch."""
    rng = np.random.default_rng(1)
    lengths = np.concatenate([[2, max_length, max_length + 1], rng.integers(2, 3 * max_length, 300),
                              rng.integers(2, 40 * max_length, 30)])
    rng.shuffle(lengths)
    starts = [np.flatnonzero(rng.random(L) < 0.1) for L in lengths.tolist()]
    starts = [b[(b >= 2) & (b <= L - 2)] for b, L in zip(starts, lengths.tolist())]
    for sentences in (None, starts):
        for head, tail in ((1, 1), (3, 1)):
            got = plan_windows(lengths, max_length, overlap, max_windows, sentences, head, tail)
            want = _plan_windows_reference(lengths, max_length, overlap, max_windows, sentences, head, tail)
            for f in ("doc", "start", "end", "whole", "own_lo", "own_hi", "windows", "capped"):
                a, b = getattr(got, f), getattr(want, f)
                assert a.dtype == b.dtype and a.tolist() == b.tolist(), f
            assert (got.head, got.tail) == (want.head, want.tail)
    empty = plan_windows(np.zeros(0, np.int64), max_length, overlap, max_windows)
    assert isinstance(empty, WindowPlan) and len(empty.doc) == 0 and len(empty.windows) == 0
