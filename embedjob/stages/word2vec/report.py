"""What the stage writes under ``<out>/word2vec/``: the vectors (the one KeyedVectors writer,
:func:`embedjob.wordvectors.write_keyed_vectors`) and, last, ``report.json``."""

from __future__ import annotations

from typing import Any, Optional

from embedjob.storage import Storage
from embedjob.wordvectors import write_keyed_vectors

REPORT_NAME = "report.json"


def epoch_row(epoch: int, effective_words, raw_words, seconds: float, loss: Optional[float]) -> dict[str, Any]:
    """One epoch of the report: the words of all workers, the epoch's seconds, words/s and loss."""
    return {"epoch": epoch, "effective_words": int(effective_words), "raw_words": int(raw_words),
            "seconds": round(seconds, 3), "words_per_s": round(float(effective_words) / max(seconds, 1e-9), 1),
            "loss": loss}


def save_vectors(kv, output_url: str, storage_options: dict[str, Any], report: dict[str, Any]) -> None:
    """Write the vectors (:func:`~embedjob.wordvectors.write_keyed_vectors`) and, last,
    ``report.json`` under ``output_url``, each a committed write."""
    store = Storage(output_url, storage_options)
    names = write_keyed_vectors(kv, store)
    store.write_json(REPORT_NAME, {**report, "files": names})
