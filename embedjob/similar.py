"""`embedjob similar`: nearest words from a finished job's word vectors (BERT static or Word2Vec),
on local or object storage. The vectors are read from the job's safe files (``vectors.bin`` and
its companions, see :mod:`embedjob.wordvectors`), never from the pickled ``vectors.kv``."""

from __future__ import annotations

from typing import Any, Optional

from embedjob.storage import StorageError
from embedjob.wordvectors import load_job_vectors


def similar_words(output_url: str, word: str, *, kind: str = "bert", n: int = 10,
                  storage_options: Optional[dict[str, Any]] = None) -> list[tuple[str, float]]:
    """The ``n`` words nearest (cosine) to ``word`` in the job's ``kind`` vectors ('bert' or
    'word2vec'; FastText vectors also answer words never seen in training)."""
    kv = load_job_vectors(output_url, storage_options or {}, kind)
    try:
        return kv.most_similar(word, topn=n)
    except KeyError:
        raise StorageError(
            f"word {word!r} is not in the {kind} vectors of {output_url} ({len(kv)} words; "
            "words are matched after the job's preprocessing, e.g. lower-cased and stemmed)"
        ) from None
