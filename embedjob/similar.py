"""`embedjob similar`: nearest words from a finished job's word vectors (BERT static or Word2Vec),
on local or object storage. The vectors are read from the job's safe files (``vectors.bin`` and
its companions, see :mod:`embedjob.wordvectors`), never from the pickled ``vectors.kv``. Query words are spelled as the job's vocabulary spells them with
:func:`normalize_query_word`."""

from __future__ import annotations

from typing import Any, Optional

from gensim.parsing import preprocess_string

from embedjob.errors import StaticVectorsError
from embedjob.layout import MANIFEST
from embedjob.stages.preprocess import PreprocessConfig, build_filters
from embedjob.storage import Storage, StorageError
from embedjob.wordvectors import load_job_vectors

STATS = {"bert": "stats/static.json", "word2vec": "stats/word2vec.json"}


def similar_words(output_url: str, word: str, *, kind: str = "bert", n: int = 10,
                  storage_options: Optional[dict[str, Any]] = None) -> list[tuple[str, float]]:
    """The ``n`` words nearest (cosine) to ``word`` in the job's ``kind`` vectors ('bert' or
    'word2vec'; FastText vectors also answer words never seen in training). ``word`` is spelled
    as the job's preprocessing spelled its vocabulary first (``People`` -> ``people``), when the
    output has its ``manifest.json``."""
    kv = load_job_vectors(output_url, storage_options or {}, kind)
    word = job_spelling(output_url, storage_options, word)
    if len(kv) == 0:
        raise StorageError(f"the {kind} word vectors of {output_url} hold no words"
                           f"{_empty_reason(output_url, storage_options or {}, kind)}: there is nothing to "
                           f"compare {word!r} with")
    try:
        return kv.most_similar(word, topn=n)
    except KeyError:
        raise StorageError(
            f"word {word!r} is not in the {kind} vectors of {output_url} ({len(kv)} words; "
            "words are matched after the job's preprocessing, e.g. lower-cased)"
        ) from None


def _empty_reason(output_url: str, storage_options: dict[str, Any], kind: str) -> str:
    """`` (<why>)`` from the stage's stats when it recorded why it kept no word, else ``''``."""
    try:
        reason = Storage(output_url, storage_options).read_json(STATS[kind]).get("empty_reason")
    except (StorageError, OSError, ValueError, AttributeError):
        return ""
    return f" ({reason})" if reason else ""


def job_filters(output_url: str, storage_options: Optional[dict[str, Any]] = None):
    """The gensim filter chain a finished job used (from ``<out>/manifest.json``)."""
    out = Storage(output_url, storage_options or {})
    try:
        manifest = out.read_json(MANIFEST)
    except FileNotFoundError:
        raise StaticVectorsError(f"no manifest.json under {out.url()} (is it a finished embedjob output?)") from None
    pre = (manifest.get("config") or {}).get("preprocess") or {}
    return build_filters(PreprocessConfig.model_validate(pre))


def normalize_query_word(output_url: str, storage_options: Optional[dict[str, Any]], word: str) -> str:
    """A query word as the job's vocabulary spells it (its gensim preprocessing, e.g. ``Cats`` -> ``cat``).

    Words the chain drops (stop words, numbers, too short) come back lower-cased, so a lookup fails
    naming the word."""
    toks = preprocess_string(word, job_filters(output_url, storage_options))
    return toks[0] if toks else word.strip().lower()


def job_spelling(output_url: str, storage_options: Optional[dict[str, Any]], word: str) -> str:
    """:func:`normalize_query_word`, or ``word`` as given where the output has no manifest (word
    vectors written without a job)."""
    try:
        return normalize_query_word(output_url, storage_options, word)
    except StaticVectorsError:
        return word
