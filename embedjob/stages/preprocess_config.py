"""The ``preprocess:`` settings: which gensim filters the job applies, in order (pydantic only, so
that loading a job's config loads no gensim; the chain itself is built in :mod:`embedjob.stages.preprocess`,
and query words are spelled the job's way in :mod:`embedjob.stages.spelling`)."""

from __future__ import annotations

import difflib

from pydantic import Field, field_validator

from embedjob._config_base import Section

# The gensim.parsing filters a job may name, in gensim's default order.
GENSIM_FILTERS = (
    "lower",  # str.lower: the first of gensim's DEFAULT_FILTERS (a lambda there)
    "strip_tags",
    "strip_punctuation",
    "strip_multiple_whitespaces",
    "strip_numeric",
    "remove_stopwords",
    "strip_short",
    "stem_text",
    "strip_non_alphanum",
    "split_alphanum",
)
GENSIM_DEFAULT_FILTERS = list(GENSIM_FILTERS[:8])  # gensim's DEFAULT_FILTERS, in its order
# embedjob's default: gensim's without stem_text, so that word vectors are keyed by real words
DEFAULT_FILTERS = [f for f in GENSIM_DEFAULT_FILTERS if f != "stem_text"]


class PreprocessConfig(Section):
    filters: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FILTERS),
        description="gensim.parsing filters applied in order by preprocess_string. Default: gensim's "
        "DEFAULT_FILTERS without stem_text, so tokens, word vectors and topic words are real lower-cased words "
        "(add stem_text for Porter stems). Part of the recipe: a change re-encodes every shard. "
        f"Valid: {', '.join(GENSIM_FILTERS)}.",
    )
    min_token_length: int = Field(3, ge=1, description="Minimum token length kept by strip_short.")
    extra_stopwords: list[str] = Field(
        default_factory=list, description="Words removed in addition to gensim's STOPWORDS (by remove_stopwords)."
    )

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in GENSIM_FILTERS:
                close = difflib.get_close_matches(name, GENSIM_FILTERS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown filter {name!r}{hint}; valid filters: {', '.join(GENSIM_FILTERS)}")
        return v
