"""Everything downstream of the encoder with BPE and SentencePiece tokenizers, decoders and prompts,
not only WordPiece's [CLS] .. [SEP]: windows (snapped to sentences), chunk spans, static word
occurrences and a prompt that prefixes every window."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from embedjob.stages.encode import EncodeConfig, TextEncoder, resolve_encoder_settings
from embedjob.stages.encode.windows import plan_windows, window_ids

SENTENCES = " ".join(f"{s} {i}." for i, s in enumerate(
    ["The cat sat on the mat", "Dogs and cats are pets", "Rain is expected", "The team won the final"] * 8))


@pytest.mark.parametrize("head,tail", [(0, 1), (1, 1), (5, 1), (3, 0)])
def test_windows_repeat_head_and_tail_and_own_each_token_once(head, tail):
    """Every cut window is the document's first ``head`` ids, a stretch of content, its last
    ``tail`` ids, within max_length; windows cover every content token, each owned once."""
    rng = np.random.default_rng(0)
    max_length, overlap = 24, 4
    lengths = rng.integers(head + tail + 1, 400, 60)
    plan = plan_windows(lengths, max_length, overlap, 10_000, head=head, tail=tail)
    ids = [np.arange(L) for L in lengths]
    wins = window_ids(ids, plan)
    assert (plan.n_tokens <= max_length).all() and [len(w) for w in wins] == plan.n_tokens.tolist()
    for d, L in enumerate(lengths.tolist()):
        covered, owned = np.zeros(L, int), np.zeros(L, int)
        for k in np.flatnonzero(plan.doc == d):
            covered[plan.start[k]:plan.end[k]] += 1
            owned[plan.own_lo[k]:plan.own_hi[k]] += 1
            if not plan.whole[k]:
                w = wins[k]
                assert w[:head].tolist() == list(range(head)) and w[len(w) - tail:].tolist() == list(range(L - tail, L))
                offset, *_ = plan.spans(np.array([k]))[0]
                assert w[head] == offset + head  # column c holds position offset + c
        assert (covered[head:L - tail] >= 1).all() and (owned == 1).all()


@pytest.mark.parametrize("name", ["roberta", "xlmr", "qwen3", "bert-prompt"])
def test_windows_chunks_and_static_words(zoo, tmp_path, name):
    import torch

    from embedjob.stages.encode import EncodeActor
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor
    from embedjob.stages.static.accumulate import StaticAccumulator

    path = zoo.get(name)
    max_length = 64 if name == "qwen3" else 32  # its 25-token instruction prompt starts every window
    settings = resolve_encoder_settings(EncodeConfig(model=path, dtype="float32", max_length=max_length,
                                                     window_overlap=12 if name == "qwen3" else 6, write_chunks=True))
    texts = [SENTENCES, "The cat sat on the mat.", "  " + SENTENCES[:300]]
    n = len(texts)
    table = pa.table({"_shard": ["s"] * n, "_row": list(range(n)), "id": [f"d{i}" for i in range(n)], "text": texts})
    pre = Preprocessor(PreprocessConfig(), "text", settings, {"out_url": str(tmp_path)})(table)
    enc = TextEncoder(settings, batch_tokens=128)
    tok = enc.tokenizer
    ids = [np.asarray(x, dtype=np.int32) for x in pre.column("_input_ids").to_pylist()]
    prompt = settings.prompt
    # the ids are the model's own tokenisation of prompt + text, and every window repeats its head
    assert ids[1].tolist() == tok.tok(prompt + texts[1])["input_ids"]
    assert settings.head_tokens == (tok.prompt_length if prompt else tok.special_head)
    r = enc.encode_ids(ids, windows_out=True)
    assert r.windows[0] > 3 and r.windows[1] == 1
    # a document in one window is exactly what sentence-transformers gives
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(path, device="cpu").encode(texts[1:2])
    cos = float(ref[0] @ r.vectors[1] / np.linalg.norm(ref[0]) / np.linalg.norm(r.vectors[1]))
    assert cos >= 0.9999
    # chunk spans: in order, covering the text, snapped to sentences where the windows were cut
    from embedjob.schema import CHUNK_CHARS

    ends = {}
    for snap, st in ((True, settings), (False, dataclasses.replace(settings, snap_to_sentences=False))):
        spans = Preprocessor(PreprocessConfig(), "text", st)(table).column(CHUNK_CHARS).to_pylist()[0]
        pairs = list(zip(spans[0::2], spans[1::2]))
        assert len(pairs) == r.windows[0]
        assert pairs[0][0] == 0 and pairs[-1][1] == len(SENTENCES)
        for (a, b), (a2, b2) in zip(pairs, pairs[1:]):
            assert a < a2 <= b < b2
        ends[snap] = sum(SENTENCES[a:b].endswith(".") for a, b in pairs)
    assert ends[True] > ends[False], ends
    # static words: each occurrence counted once through the overlapping windows, prompt words never
    acc = StaticAccumulator(enc, out_url=str(tmp_path / "out"), word_pooling="mean")
    hook = acc.hook_for(pre, np.ones(n, dtype=bool))
    enc.encode_ids(ids, token_hook=lambda layers, mask, idx, sp: hook([torch.ones_like(layers[0])], mask, idx, sp),
                   doc_tokens=pre.column("_doc_tokens").to_numpy())
    st = acc._state
    np.testing.assert_allclose(st.sums.numpy()[:, 0] / st.counts, 1.0, atol=1e-6)
    words = pre.column("_words").to_pylist()
    assert st.counts.sum() == sum(len(w) for w in words)
    assert {"cat", "dogs", "rain"} <= set(words[0]) and not {"query", "instruct"} & set(words[1])
    # through the actor: vectors and chunk vectors of the model's dimension
    out = EncodeActor(settings, batch_tokens=128, max_batch_docs=4)(pre)
    assert len(out.column("vector").to_pylist()[0]) == settings.dim
