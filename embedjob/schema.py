"""Batch columns: the names of the columns that travel between stages inside a Ray Data pipeline,
and the one cut of a batch into runs of consecutive rows of one shard.

Ground floor: imports nothing of embedjob. Columns whose names start with ``_`` never reach an
output file.
"""

from __future__ import annotations

import numpy as np

SHARD = "_shard"  # the input shard's key (its output name)
ROW = "_row"  # the row's index in its shard: with SHARD, the identity behind exactly-once commits
TOKENS = "tokens"  # gensim preprocess_string tokens (list<string>), written to tokens/<shard>.parquet
EMPTY = "_empty"  # the text was null or blank
INPUT_IDS = "_input_ids"  # BERT token ids of the document
DOC_TOKENS = "_doc_tokens"  # the document's whole token count (INPUT_IDS may be capped: encode.max_windows)
WINDOWS = "_windows"  # windows the encoder cut the document into (1 unless long_documents: windows)
ENCODED_TOKENS = "_encoded_tokens"  # tokens the encoder fed to the model for the document
CHUNK_CHARS = "_chunk_chars"  # encode.write_chunks: [start_char, end_char] of each window, flattened
CHUNK_VECTORS = "_chunk_vectors"  # encode.write_chunks: each window's vector
CHUNK_TOKENS = "_chunk_tokens"  # encode.write_chunks: each window's tokens
CAPPED = "_capped"  # the document was longer than encode.max_windows windows: its tail was not encoded
WORD_IDS = "_word_ids"  # per BERT token: index of its word occurrence in WORDS, -1 = not counted
WORDS = "_words"  # per word occurrence: the vocabulary word ("" = not counted)
ENCODER_NODE = "_encoder_node"  # Ray node of the encoder actor that encoded the row
TEXT_HASH = "text_hash"  # blake2b-128 of the input text, kept in vectors/<shard>.parquet (output.reuse)
STATIC_HOME = "static_home"  # static on: the commit whose static part holds the row's word sums (vectors/)
ENCODER_RSS = "_encoder_peak_rss_mb"  # the encoder actor process's peak resident memory so far (MiB)


def contiguous_runs(shards: np.ndarray, rows: np.ndarray) -> list[tuple[str, int, int, np.ndarray]]:
    """``(shard, first row, last row, positions)`` of each run of consecutive rows of one shard,
    ordered by shard then row; ``positions`` index the batch in row order.

    The write stage names its staged parts by these runs, and the static stage its partial sums:
    both must cut alike for a shard's parts to tile it exactly once."""
    n = len(rows)
    if n == 0:
        return []
    order = np.lexsort((rows, shards))
    s, r = shards[order], rows[order]
    breaks = np.flatnonzero((s[1:] != s[:-1]) | (np.diff(r) != 1)) + 1
    bounds = [0, *breaks.tolist(), n]
    return [(str(s[a]), int(r[a]), int(r[b - 1]), order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
