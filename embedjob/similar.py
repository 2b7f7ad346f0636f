"""`embedjob similar`: nearest words from a finished job's word vectors (BERT static or Word2Vec),
on local or object storage."""

from __future__ import annotations

from typing import Any, Optional

from embedjob.storage import StorageError


def similar_words(output_url: str, word: str, *, kind: str = "bert", n: int = 10,
                  storage_options: Optional[dict[str, Any]] = None) -> list[tuple[str, float]]:
    from embedjob.word2vec import load_vectors

    kv = load_vectors(output_url, storage_options or {}, kind=kind)
    try:
        return kv.most_similar(word, topn=n)
    except KeyError:
        raise StorageError(
            f"word {word!r} is not in the {kind} vectors of {output_url} ({len(kv)} words; "
            "words are matched after the job's preprocessing, e.g. lower-cased and stemmed)"
        ) from None
