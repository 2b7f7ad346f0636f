"""Preprocess stage: gensim ``preprocess_string`` tokens per document, plus the BERT token ids the
encoder needs (tokenising here, in parallel CPU tasks, keeps it off the encoder actors' critical path).

The default chain is gensim's ``DEFAULT_FILTERS`` without ``stem_text``: the tokens are real,
lower-cased words, and so are the keys of every set of word vectors built from them (static,
Word2Vec) and the topics' top words (``kv["people"]``, not ``kv["peopl"]``). A job that wants
Porter stems adds ``stem_text`` to ``preprocess.filters``; the filters are part of the recipe, so
a change of chain re-encodes every shard and moves the old outputs aside.

The batch transform is a plain function of a pyarrow table, testable without Ray::

    preprocess_texts(["The cats sat."], PreprocessConfig())   # [['cats', 'sat']]
"""

from __future__ import annotations

import gc
import json
import logging
import string
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
from gensim import parsing
from gensim.parsing.preprocessing import STOPWORDS

from embedjob.debug import preprocess_delay
from embedjob.errors import row_error
from embedjob.schema import CHUNK_CHARS, DOC_TOKENS, EMPTY, INPUT_IDS, ROW, SHARD, TEXT_HASH, TOKENS
from embedjob.stages.encode import EncoderSettings, Tokenizer
from embedjob.stages.encode.windows import chunk_char_spans, plan_for
from embedjob.stages.preprocess_config import PreprocessConfig
from embedjob.stages.reuse.hashes import text_hashes
from embedjob.stages.static.align import align_words
from embedjob.stages.static.config import StaticSettings

logger = logging.getLogger(__name__)


def build_filters(cfg: PreprocessConfig) -> list[Callable[[str], str]]:
    """The configured gensim filter chain as callables (names are validated by the config)."""
    stopwords = frozenset(STOPWORDS) | frozenset(w.lower() for w in cfg.extra_stopwords)
    out: list[Callable[[str], str]] = []
    for name in cfg.filters:
        if name == "lower":
            out.append(str.lower)
        elif name == "remove_stopwords":
            out.append(partial(parsing.remove_stopwords, stopwords=stopwords))
        elif name == "strip_short":
            out.append(partial(parsing.strip_short, minsize=cfg.min_token_length))
        else:
            out.append(getattr(parsing, name))
    return out


# Filters that replace characters with nothing or a space and never look at whitespace: a run of
# whitespace collapsed before them or not, the text splits into the same tokens after them.
_WHITESPACE_BLIND = frozenset({"strip_numeric", "strip_punctuation", "strip_multiple_whitespaces"})
# gensim's RE_PUNCT is a run of string.punctuation; RE_NUMERIC is [0-9]+ (ASCII digits only).
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
_NO_DIGITS = str.maketrans("", "", "0123456789")
_STEM_CACHE_MAX = 500_000


class FilterChain:
    """The configured filters as one callable ``text -> tokens``, equal to gensim's
    ``preprocess_string(text, build_filters(cfg))`` (tests/test_feed.py holds them equal) and cheaper:

    * the regular expressions are called directly (gensim's own compiled ones), without gensim's
      ``to_unicode`` per filter;
    * ``remove_stopwords``, ``strip_short`` and ``stem_text`` work on the token list, split once,
      not split and joined again per filter (consecutive ones fused into one pass);
    * ``strip_multiple_whitespaces`` is skipped where only whitespace-blind filters come between it
      and the split (the tokens do not depend on it), and ``strip_punctuation`` there turns each
      punctuation character into a space (``str.translate``) rather than each run into one;
    * ``strip_numeric`` deletes the ASCII digits with ``str.translate`` (what ``[0-9]+`` matches);
    * Porter stems are cached per word (``stem_text`` is a pure function of each word).

    ``filters`` is gensim's own list (``build_filters``), the reference."""

    def __init__(self, cfg: PreprocessConfig):
        from gensim.parsing import preprocessing as gp

        self.filters = build_filters(cfg)
        stop = frozenset(STOPWORDS) | frozenset(w.lower() for w in cfg.extra_stopwords)
        regex = {"strip_tags": partial(gp.RE_TAGS.sub, ""), "strip_punctuation": partial(gp.RE_PUNCT.sub, " "),
                 "strip_multiple_whitespaces": partial(gp.RE_WHITESPACE.sub, " "),
                 "strip_numeric": _translate(_NO_DIGITS), "strip_non_alphanum": partial(gp.RE_NONALPHA.sub, " ")}
        self._stems: dict[str, tuple[str, ...]] = {}
        self._porter = gp.PorterStemmer()
        steps: list[tuple[str, Any]] = []
        names = list(cfg.filters)
        for i, name in enumerate(names):
            if name == "strip_multiple_whitespaces" and _split_next(names[i + 1:]):
                continue
            if name == "strip_punctuation" and _split_next(names[i + 1:]):
                steps.append(("str", _translate(_PUNCT_TO_SPACE)))
                continue
            if name in ("remove_stopwords", "strip_short"):
                drop, short = (stop, 0) if name == "remove_stopwords" else (frozenset(), cfg.min_token_length)
                if steps and steps[-1][0] == "keep":  # fused with the filter before
                    drop, short = drop | steps[-1][1][0], max(short, steps[-1][1][1])
                    steps.pop()
                steps.append(("keep", (drop, short)))
            elif name == "stem_text":
                steps.append(("stem", None))
            else:
                steps.append(("str", str.lower if name == "lower" else regex.get(name, getattr(parsing, name))))
        self.steps = steps

    def __call__(self, text: str) -> list[str]:
        s, toks = text, None
        for kind, arg in self.steps:
            if kind == "str":
                if toks is not None:
                    s, toks = " ".join(toks), None
                s = arg(s)
                continue
            if toks is None:
                toks = s.split()
            if kind == "stem":
                toks = self._stem(toks)
            else:
                drop, short = arg
                toks = [t for t in toks if t not in drop and len(t) >= short]
        return toks if toks is not None else s.split()

    def _stem(self, toks: list[str]) -> list[str]:
        cache, out = self._stems, []
        for t in toks:
            got = cache.get(t)
            if got is None:
                if len(cache) >= _STEM_CACHE_MAX:
                    cache.clear()
                got = cache[t] = tuple(self._porter.stem(t).split())  # " ".join + split, as gensim does
            out.extend(got)
        return out


def _translate(table: dict) -> Callable[[str], str]:
    """``str.translate(table)`` for a table of ASCII characters each mapped to one ASCII character
    or deleted, done on the UTF-8 bytes: an ASCII byte never occurs inside a multi-byte character,
    and ``bytes.translate`` is one table look-up per byte, where ``str.translate`` looks each
    character of a non-ASCII text up in a dict (about 20x slower on such texts, 3x on ASCII ones)."""
    mapping = bytes(range(256))
    drop = bytearray()
    for k, v in table.items():
        if k >= 128 or (v is not None and not (isinstance(v, str) and len(v) == 1 and ord(v) < 128)):
            return lambda s: s.translate(table)
        if v is None:
            drop.append(k)
        else:
            mapping = mapping[:k] + v.encode() + mapping[k + 1:]
    dropped = bytes(drop)
    return lambda s: s.encode("utf-8", "surrogatepass").translate(mapping, dropped).decode("utf-8", "surrogatepass")


def _split_next(rest: list[str]) -> bool:
    """True when the text is split into tokens after only whitespace-blind filters (``rest`` follows
    ``strip_multiple_whitespaces``)."""
    for name in rest:
        if name in ("remove_stopwords", "strip_short", "stem_text"):
            return True
        if name not in _WHITESPACE_BLIND:
            return False
    return True


def preprocess_texts(texts: list[Optional[str]], cfg: PreprocessConfig, filters=None) -> list[list[str]]:
    """gensim ``preprocess_string`` over ``texts`` (None -> []); ``filters`` a :class:`FilterChain`
    (built from ``cfg`` when None) or a list of gensim filters."""
    if filters is None:
        filters = FilterChain(cfg)
    if isinstance(filters, FilterChain):
        return [filters(t) if t else [] for t in texts]
    return [parsing.preprocess_string(t, filters) if t else [] for t in texts]


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for a block: a batch allocates millions of short-lived
    objects (token lists, offset tuples) that reference counting frees, and the collector's passes
    over them cost about 8% of the preprocess (measured on mixed-en). Back on afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def is_empty(texts: list[Optional[str]]) -> np.ndarray:
    return np.array([t is None or not t.strip() for t in texts], dtype=bool)


@lru_cache(maxsize=4)
def _tokenizer(settings_json: str):
    return Tokenizer.from_settings(EncoderSettings.from_dict(json.loads(settings_json)))


class Preprocessor:
    """Batch transform: adds ``tokens`` (gensim), ``_empty`` and, for the encoder, ``_input_ids``."""

    def __init__(self, cfg, text_column: str, encoder_settings: Optional["EncoderSettings"] = None,
                 static_settings: Optional[StaticSettings] = None, on_empty_text: str = "keep",
                 id_column: str = "id"):
        self.cfg = cfg
        self.text_column = text_column
        self.id_column = id_column
        self.on_empty_text = on_empty_text
        self.chain = FilterChain(cfg)  # equal to gensim with self.filters, cheaper
        self.filters = self.chain.filters  # gensim's own list (callers and tests read it)
        self.encoder_settings = encoder_settings
        self.static_settings = static_settings

    def __call__(self, batch: pa.Table) -> pa.Table:
        with gc_paused():
            return self._call(batch)

    def _call(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        empty = is_empty(texts)
        if self.on_empty_text == "fail" and empty.any():
            i = int(np.argmax(empty))
            shard = batch.column(SHARD)[i].as_py() if SHARD in batch.column_names else "?"
            row = batch.column(ROW)[i].as_py() if ROW in batch.column_names else i
            raise row_error(shard, row, batch.column(self.id_column)[i].as_py(),
                            f"empty text in column {self.text_column!r} (input.on_empty_text=fail; "
                            "keep or skip accept such rows)")
        tokens = preprocess_texts(texts, self.cfg, self.chain)
        out = batch.append_column(TOKENS, pa.array(tokens, type=pa.list_(pa.string())))
        out = out.append_column(EMPTY, pa.array(empty))
        out = out.append_column(TEXT_HASH, text_hashes(texts))  # kept with the vectors: output.reuse
        if self.encoder_settings is not None:
            st = self.encoder_settings
            tok = _tokenizer(json.dumps(st.as_dict(), sort_keys=True))
            if self.static_settings is not None:
                # tokenises once, with word ids: adds _input_ids and the word-alignment columns
                out = align_words(out, texts, empty, tok, self.chain)
            else:
                out = _append_input_ids(out, tok, texts, empty)
            if st.write_chunks:
                out = _append_chunk_chars(out, tok, texts, empty, st)
        return out


def _append_input_ids(table: pa.Table, tok, texts: list[Optional[str]], empty: np.ndarray) -> pa.Table:
    """``_input_ids`` (capped at the tokenizer's ``max_tokens``), and ``_doc_tokens`` (each document's
    whole token count) when whole documents are tokenised (``encode.long_documents: windows``)."""
    todo = np.flatnonzero(~np.asarray(empty, dtype=bool))
    enc = tok.encode_flat([texts[i] for i in todo.tolist()])
    n_tok = np.zeros(len(texts), dtype=np.int32)
    n_tok[todo] = enc.doc_tokens
    table = table.append_column(INPUT_IDS, enc.list_array(len(texts), todo))
    if tok.whole_documents:
        table = table.append_column(DOC_TOKENS, pa.array(n_tok, type=pa.int32()))
    return table


def _append_chunk_chars(table: pa.Table, tok, texts: list[Optional[str]], empty: np.ndarray, st) -> pa.Table:
    """``_chunk_chars`` (encode.write_chunks): the character span of each window the encoder will cut,
    from the tokenizer's offset mapping (a second tokenisation, with offsets, paid only for chunks)."""
    todo = [t for t, e in zip(texts, empty) if not e]
    spans: list[Any] = [[] for _ in texts]
    if todo:
        enc = tok.encode(todo, words=True)
        plan = plan_for(st, enc.ids, tok.sentence_end_ids)
        for k, i in enumerate(np.flatnonzero(~empty).tolist()):
            spans[i] = chunk_char_spans(enc.offsets[k], plan, k)
    return table.append_column(CHUNK_CHARS, pa.array(spans, type=pa.list_(pa.int32())))


_CACHE: dict[str, Preprocessor] = {}


def preprocess_batch(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """Task-friendly form of :class:`Preprocessor` (built once per worker process per settings)."""
    import json

    preprocess_delay()  # test-only: a slow preprocess, the encoder waits (encoder busy drops)
    key = json.dumps({k: (v.model_dump() if hasattr(v, "model_dump") else v.as_dict() if hasattr(v, "as_dict") else v)
                      for k, v in kwargs.items()},
                     sort_keys=True, default=str)
    pre = _CACHE.get(key)
    if pre is None:
        pre = _CACHE[key] = Preprocessor(**kwargs)
    out = pre(batch)
    # Nothing after this stage reads the text (ids, words and chunk spans carry what it said): it is
    # not serialised to the encoder actors and on to the write tasks.
    text = kwargs.get("text_column")
    return out.drop_columns([text]) if text in out.column_names and text != kwargs.get("id_column") else out
