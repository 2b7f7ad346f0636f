"""`embedjob similar`: nearest words from a finished job's word vectors (BERT static or Word2Vec),
on local or object storage. The vectors are read from the job's safe files (``vectors.bin`` and
its companions, see :mod:`embedjob.wordvectors`), never from the pickled ``vectors.kv``. Query words are spelled as the job's vocabulary spells them with
:func:`embedjob.stages.spelling.normalize_query_word`."""

from __future__ import annotations

from typing import Any, Optional

from embedjob.layout import stats_file
from embedjob.stages.spelling import job_spelling
from embedjob.storage import Storage, StorageError
from embedjob.wordvectors import load_job_vectors

STATS = {"bert": stats_file("static"), "word2vec": stats_file("word2vec")}


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
