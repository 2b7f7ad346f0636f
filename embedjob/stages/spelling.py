"""Query words spelled as a finished job spelled its vocabulary: its own gensim preprocessing
(``preprocess:`` in its ``manifest.json``), for ``embedjob similar`` and ``embedjob search --words``::

    normalize_query_word("s3://bucket/out", {}, "Cats")  # 'cat' with stem_text, else 'cats'
"""

from __future__ import annotations

from typing import Any, Optional

from gensim.parsing import preprocess_string

from embedjob.errors import StaticVectorsError
from embedjob.layout import MANIFEST
from embedjob.stages.preprocess import build_filters
from embedjob.stages.preprocess_config import PreprocessConfig
from embedjob.storage import Storage


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
