"""The chunk cache (embedjob/stages/encode/chunk_cache.py): texts cut at whitespace and punctuation,
each distinct chunk tokenised once, give exactly the model's tokenizer's ids, counts, word ids and
offsets, on every tokenizer layout it accepts, and it refuses the layouts where a cut could change a
token."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest

from tests.test_feed import HARD_TEXTS, TRICKY_TEXTS

# Characters that test a cut: ASCII punctuation and whitespace, control characters BERT removes
# (\x0b, \x1c: no split there), Unicode spaces and punctuation, combining marks after punctuation
# ("=" + U+0338 composes to "≠" under NFC), compatibility forms (fullwidth "！", "ﬁ", "´" is
# " " + U+0301 under NFKD), case pairs with special lower-casing, CJK, astral characters, U+FFFD.
RISKY = list("abcXYZ019 .,;:!?'\"()[]{}<>=-_/\\@#$%^&*~`|+\t\n\r") + [
    "\x00", "\x01", "\x0b", "\x0c", "\x1c", "\x7f", "\u0085", "\u00a0", "\u2003", "\u200b", "\u2028", "\u3000",
    "\u0301", "\u0338", "\u00b4", "\uff01", "\ufb01", "\u2026", "\u2019", "\u00ab", "\u0130", "\u00df", "\u03a3",
    "\u03c2", "\u212a", "\u00e9", "e\u0301", "\u4e2d", "\u65e5", "\U0001f642", "\U0001d518", "\ufffd", "##",
    "[MASK]", "[mask]", "[SEP", "new york", "zzcat"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "running", "antidisestablishmentarianism", "Übermäßig", "naïve", "x" * 120]
    out = []
    for _ in range(n):
        parts = [rng.choice(RISKY) if rng.random() < 0.6 else rng.choice(words) for _ in range(rng.randint(0, 40))]
        out.append("".join(parts))
    return out


def _variant(minilm_path: str, tmp_path, name: str) -> str:
    """MiniLM's vocabulary under another normaliser, pre-tokenizer or added tokens, saved as a
    transformers fast tokenizer."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(minilm_path)
    spec = json.loads(base.backend_tokenizer.to_str())
    bert = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None,
            "lowercase": True}
    spec["normalizer"], spec["pre_tokenizer"] = {
        "cased": ({**bert, "lowercase": False, "strip_accents": False}, {"type": "BertPreTokenizer"}),
        "raw_bert": ({**bert, "clean_text": False, "handle_chinese_chars": False}, {"type": "BertPreTokenizer"}),
        "nfc": ({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
                {"type": "BertPreTokenizer"}),
        "nfkd_split": ({"type": "Sequence", "normalizers": [{"type": "NFKD"}, {"type": "StripAccents"},
                                                            {"type": "Lowercase"}]}, {"type": "WhitespaceSplit"}),
        "whitespace": (bert, {"type": "Whitespace"}),
        "added": (bert, {"type": "BertPreTokenizer"}),
    }[name]
    tok = PreTrainedTokenizerFast(tokenizer_object=RustTokenizer.from_str(json.dumps(spec)), unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    if name == "added":
        tok.add_tokens(["new york", "zzcat"])
    path = str(tmp_path / name)
    tok.save_pretrained(path)
    return path


def _same(a, b, words: bool) -> None:
    from embedjob.stages.encode.flat import word_starts as _word_starts

    assert a.counts.tolist() == b.counts.tolist()
    assert a.doc_tokens.tolist() == b.doc_tokens.tolist()
    assert a.ids.tolist() == b.ids.tolist()
    assert a.ids.dtype == b.ids.dtype == np.int32
    if words:
        assert a.offsets.tolist() == b.offsets.tolist()
        assert _word_starts(a.word_ids, a.counts).tolist() == _word_starts(b.word_ids, b.counts).tolist()


@pytest.mark.parametrize("name,mode", [("minilm", "punct"), ("cased", "punct"), ("raw_bert", "punct"),
                                       ("nfc", "space"), ("nfkd_split", "space"), ("whitespace", "space"),
                                       ("added", "punct"), ("roberta", None), ("xlmr", None)])
def test_chunk_cached_tokenisation_equals_the_direct_call(name, mode, minilm_path, tmp_path):
    """encode_flat (the chunk cache where the tokenizer allows it) equals encode (the Rust tokenizer
    on whole texts) in ids, counts, whole counts, offsets and word boundaries: truncated, windowed,
    with prompts, with texts long enough to go piece by piece, lower-cased by the model's settings,
    on 400 random texts of risky characters, on a cold and on a warm cache."""
    from embedjob.stages.encode.tokenizer import FlatTokenized, Tokenizer
    from tests.models_zoo import _bpe_tokenizer

    if name == "minilm":
        path = minilm_path
    elif name in ("roberta", "xlmr"):
        path = str(tmp_path / name)
        _bpe_tokenizer(name).save_pretrained(path)
    else:
        path = _variant(minilm_path, tmp_path, name)
    texts = HARD_TEXTS + TRICKY_TEXTS + random_texts(400) + [" ".join(HARD_TEXTS) * 4, "naïve café " * 40]
    texts = [t for t in texts if t.strip()]
    cases = [((16,), {}), ((16, 64), {}), ((512,), {}), ((16, 64), {"prompt": "query: "}),
             ((16,), {"prompt": "query:"}), ((16, 300), {"piece_chars": 64}), ((32, 128), {"do_lower_case": True})]
    for args, kw in cases:
        tok = Tokenizer(path, *args, **kw)
        punct_prompt = kw.get("prompt") == "query:"
        for words in (False, True):
            cache = tok.chunk_cache(words)
            assert (cache.mode if cache else None) == (None if punct_prompt and mode != "punct" else mode), (name, kw)
            tok._verify_left = 0  # the cache's own answer, not the checked one
            for _ in range(2):  # cold, then warm
                got = tok.encode_flat(texts, words=words)
                _same(got, FlatTokenized.from_tokenized(tok.encode(texts, words=words)), words)
            if cache is not None:
                assert cache.with_words == words and cache.stats["new_chunks"] < cache.stats["chunks"] / 2
    if name == "added":  # texts naming an added token are tokenised directly (it matches across a cut)
        import pyarrow as pa

        from embedjob.stages.encode.chunk_cache import ChunkCache

        c = ChunkCache(Tokenizer(path, 16).tok.backend_tokenizer, "punct")
        assert c.needs_direct(pa.array(["in New York", "zzcat!", "[mask]", "a cat"], pa.large_string())).tolist() == \
            [True, True, True, False]


def test_chunk_mode_refuses_layouts_where_a_cut_could_change_a_token(minilm_path):
    """Byte-level BPE (the space belongs to the next token), Metaspace, BPE dropout (random),
    a Replace normaliser (could match across a cut): no cache; BERT: punctuation too; NFC: spaces only."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer

    from embedjob.stages.encode.chunk_cache import chunk_mode
    from tests.models_zoo import _bpe_tokenizer

    spec = json.loads(AutoTokenizer.from_pretrained(minilm_path).backend_tokenizer.to_str())

    def mode(**change):
        return chunk_mode(RustTokenizer.from_str(json.dumps({**spec, **change})))

    assert mode() == "punct"
    assert mode(normalizer={"type": "NFC"}) == "space"
    assert mode(normalizer=None, pre_tokenizer={"type": "WhitespaceSplit"}) == "space"
    assert mode(normalizer={"type": "Replace", "pattern": {"String": "a"}, "content": " "}) is None
    assert mode(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                               "split": True}) is None
    assert mode(pre_tokenizer=None) is None
    assert chunk_mode(_bpe_tokenizer("roberta").backend_tokenizer) is None
    assert chunk_mode(_bpe_tokenizer("xlmr").backend_tokenizer) is None
    bpe = json.loads(_bpe_tokenizer("roberta").backend_tokenizer.to_str())
    bpe["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    assert chunk_mode(RustTokenizer.from_str(json.dumps(bpe))) == "space"
    bpe["model"]["dropout"] = 0.1
    assert chunk_mode(RustTokenizer.from_str(json.dumps(bpe))) is None


def test_a_full_chunk_cache_starts_again_with_the_same_answers(minilm_path):
    import pyarrow as pa

    from embedjob.stages.encode.chunk_cache import ChunkCache
    from embedjob.stages.encode.tokenizer import Tokenizer

    tok = Tokenizer(minilm_path, 512)
    texts = random_texts(60, seed=1) + HARD_TEXTS
    texts = [t for t in texts if t.strip() and "mask" not in t.lower() and "[SEP" not in t]
    def shout(words):  # a normaliser: the words' forms come back through the cache's codes
        return [w.upper() + "!" for w in words]

    for words in (False, True):
        cache = ChunkCache(tok.tok.backend_tokenizer, "punct", max_entries=60, words=words)
        backend = cache.backend
        for i in range(0, len(texts), 7):
            batch = texts[i:i + 7]
            ids, counts, wid, offs, codes = cache.encode(pa.array(batch, pa.large_string()), words=words,
                                                         normalize=shout if words else None)
            want = backend.encode_batch(batch, add_special_tokens=False)
            assert ids.tolist() == [x for w in want for x in w.ids]
            assert counts.tolist() == [len(w.ids) for w in want]
            if words:
                assert offs.tolist() == [list(o) for w in want for o in w.offsets]
                # each token's code is its word's form: the word's surface (first to last piece), shouted
                spans = {}
                doc = np.repeat(np.arange(len(batch)), counts)
                for k, (d, w, (a, b)) in enumerate(zip(doc.tolist(), wid.tolist(), offs.tolist())):
                    spans.setdefault((d, w), [a, b])[1] = b
                forms = cache.norms.take(pa.array(codes)).to_pylist()
                assert forms == [shout([batch[d][slice(*spans[d, w])]])[0] for d, w in zip(doc.tolist(), wid.tolist())]
            else:
                assert codes is None
        assert cache.stats["resets"] > 0 and cache.n <= 60 + 7 * 60
    with pytest.raises(ValueError, match="ids alone"):
        cache = ChunkCache(tok.tok.backend_tokenizer, "punct", words=False)
        cache.encode(pa.array(["a"], pa.large_string()), words=True)


def test_a_chunk_cache_that_differs_is_dropped_with_a_warning(minilm_path, caplog):
    """The first documents are checked against the direct call; a cache that answers differently
    is dropped, with one warning, and the batch gets the direct answer."""
    from embedjob.stages.encode.tokenizer import FlatTokenized, Tokenizer

    tok = Tokenizer(minilm_path, 64)
    texts = HARD_TEXTS * 3
    tok._verify_left = 0
    tok.encode_flat(texts, words=True)  # fills the cache unchecked
    cache = tok.chunk_cache(True)
    cache.ids[: cache.nv] += 1  # a cache that went wrong
    tok._verify_left = 10
    with caplog.at_level(logging.WARNING):
        got = tok.encode_flat(texts, words=True)
    _same(got, FlatTokenized.from_tokenized(tok.encode(texts, words=True)), True)
    assert tok.chunk_cache() is None and tok.chunk_cache(True) is None
    assert sum("chunk-cached tokenisation differed" in r.getMessage() for r in caplog.records) == 1
    again = Tokenizer(minilm_path, 64)
    again.encode_flat(texts)
    assert again.chunk_cache() is not None and again._verify_left == 256 - len(texts)
    assert again.chunk_cache(True) is not again.chunk_cache(False)


def test_text_whose_chunks_never_repeat_is_tokenised_directly(minilm_path, caplog):
    """Hashes (every chunk new): after three calls with mostly new chunks the tokenizer bypasses the
    cache for the next calls, says so once, tries it again later; the answers never change."""
    from embedjob.stages.encode import tokenizer as tk
    from embedjob.stages.encode.tokenizer import FlatTokenized, Tokenizer

    rng = random.Random(5)
    texts = [" ".join(f"{rng.getrandbits(64):016x}" for _ in range(30)) for _ in range(400)]
    tok = Tokenizer(minilm_path, 128)
    seen = []
    with caplog.at_level(logging.INFO):
        for i in range(0, 400, 20):
            batch = texts[i:i + 20]
            _same(tok.encode_flat(batch), FlatTokenized.from_tokenized(tok.encode(batch)), False)
            seen.append(tok._bypass)
    b = tk.BYPASS_CALLS
    assert seen[:3 + b] == [0, 0, b] + list(range(b - 1, -1, -1)), seen
    assert seen[3 + b] == 0 and tok._cold == 1  # the cache tried again after the bypass: new chunks again
    assert sum("chunks were new" in r.getMessage() for r in caplog.records) == 1
    english = Tokenizer(minilm_path, 128)
    for _ in range(5):
        english.encode_flat(HARD_TEXTS * 10)
    assert english._bypass == 0  # repeated chunks: the cache stays on


@pytest.mark.parametrize("long_documents", ["truncate", "windows"])
def test_preprocess_output_is_the_same_table_with_the_chunk_cache(minilm_path, long_documents):
    """The preprocess stage's output (ids, whole counts, word ids and words of the static vectors'
    alignment) with the chunk cache equals, column by column and in type, its output with every text
    tokenised directly; empty rows and a row with an added token's content among them."""
    import pyarrow as pa

    from embedjob.stages import preprocess as pp
    from embedjob.stages.preprocess import PreprocessConfig, Preprocessor
    from embedjob.stages.static.config import StaticSettings
    from tests.test_static import _encoder_settings

    settings = _encoder_settings(minilm_path, 16, long_documents=long_documents)
    texts = HARD_TEXTS + TRICKY_TEXTS + random_texts(120, seed=2) + [None, "", "a [MASK] b"]
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})
    static = StaticSettings(word_pooling="mean", layers="last", out_url="memory://x", storage_options={})
    for st in (None, static):
        pp._tokenizer.cache_clear()
        pp._tokenizer(json.dumps(settings.as_dict(), sort_keys=True))._verify_left = 0  # the cache's own answer
        cached = Preprocessor(PreprocessConfig(), "text", settings, st)(table)
        assert pp._tokenizer(json.dumps(settings.as_dict(), sort_keys=True)).chunk_cache(st is not None).stats["chunks"]
        pp._tokenizer.cache_clear()
        tok = pp._tokenizer(json.dumps(settings.as_dict(), sort_keys=True))
        tok._chunk_mode = False  # every text directly
        direct = Preprocessor(PreprocessConfig(), "text", settings, st)(table)
        pp._tokenizer.cache_clear()
        assert cached.schema == direct.schema
        assert cached.equals(direct), [c for c in cached.column_names if not cached.column(c).equals(direct.column(c))]


def test_truncation_from_the_left_is_tokenised_directly(minilm_path):
    """A tokenizer that truncates from the left keeps a text's end: the cache (which keeps the head,
    as windows do) is not used when truncating, and the answers are the direct call's."""
    from embedjob.stages.encode.tokenizer import FlatTokenized, Tokenizer

    texts = [" ".join(HARD_TEXTS)] * 3 + ["a cat"]
    left = Tokenizer(minilm_path, 16, tokenizer_kwargs={"truncation_side": "left"})
    assert left.chunk_cache() is None
    _same(left.encode_flat(texts), FlatTokenized.from_tokenized(left.encode(texts)), False)
    assert left.encode_flat(texts).ids[1:15].tolist() == left.encode(texts).ids[0][1:15]
    assert Tokenizer(minilm_path, 16, 64, tokenizer_kwargs={"truncation_side": "left"}).chunk_cache() is not None
