"""A worker's slice of the corpus cut into sync segments of about equal words, each written as a
local gensim ``LineSentence`` file (``corpus_file`` mode) or kept as token lists (iterable mode)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from embedjob.stages.word2vec.model import touched_rows, trainable_arrays


def split_segments(docs: list[list[str]], parts: int) -> list[list[list[str]]]:
    """Cut ``docs`` into ``parts`` contiguous pieces of about equal token counts (some may be empty)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    if total == 0:
        return [[] for _ in range(parts)]
    cum = np.cumsum(lengths)
    bounds = [0] + [int(np.searchsorted(cum, total * k / parts, side="left")) + 1 for k in range(1, parts)] + [len(docs)]
    bounds = [min(max(b, 0), len(docs)) for b in bounds]
    for k in range(1, len(bounds)):
        bounds[k] = max(bounds[k], bounds[k - 1])
    return [docs[bounds[k]:bounds[k + 1]] for k in range(parts)]


def write_line_sentences(docs: list[list[str]], path: str) -> int:
    """Write ``docs`` as a gensim LineSentence file (one document a line); returns its token count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(" ".join(d))
            f.write("\n")
            n += len(d)
    return n



@dataclass
class Segments:
    """One worker's segments: segment ``k`` is trained between sync ``k - 1`` and sync ``k``."""

    workdir: str  # local folder of the LineSentence files (removed after training)
    n_docs: int  # documents in the worker's slice
    words: list[int]  # tokens of each segment
    files: list[Optional[str]]  # LineSentence file of each segment (corpus_file mode), else None
    docs: list[list[list[str]]]  # token lists of each segment (iterable mode; empty when files hold them)
    rows: list[list[Optional[np.ndarray]]]  # per segment, touched_rows of each trainable array (None = all)

    def corpus(self, k: int) -> dict[str, Any]:
        """The ``model.train()`` arguments that feed segment ``k``."""
        if self.files[k] is not None:
            return {"corpus_file": self.files[k], "total_words": self.words[k]}
        return {"corpus_iterable": self.docs[k], "total_examples": len(self.docs[k])}

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def cut_segments(model, docs: list[list[str]], parts: int, *, corpus_file: bool, track_rows: bool,
                 rank: int) -> Segments:
    """Cut ``docs`` into ``parts`` segments, written to LineSentence files when ``corpus_file``;
    with ``track_rows``, note the rows each segment can change (for a sparse sync)."""
    segments = split_segments(docs, parts)
    workdir = tempfile.mkdtemp(prefix=f"embedjob-w2v-{rank}-")
    words: list[int] = []
    files: list[Optional[str]] = []
    rows: list[list[Optional[np.ndarray]]] = []
    for k, seg in enumerate(segments):
        rows.append(touched_rows(model, seg) if track_rows else [None] * len(trainable_arrays(model)))
        if corpus_file:
            path = os.path.join(workdir, f"segment-{k:03d}.txt")
            words.append(write_line_sentences(seg, path))
            files.append(path)
        else:
            words.append(sum(len(d) for d in seg))
            files.append(None)
    if corpus_file:
        segments = [[] for _ in segments]  # the files hold them now
    return Segments(workdir=workdir, n_docs=len(docs), words=words, files=files, docs=segments, rows=rows)
