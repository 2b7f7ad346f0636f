"""The corpus-wide static stage: merge the committed shards' parts into the static word vectors.

:func:`run_static` merges ``static/parts/<shard>.parquet`` of the committed shards only, so a
backfill adds just the new shards' contributions, averages each word's sum over its occurrences,
and writes (:func:`embedjob.wordvectors.write_keyed_vectors`) ``static/vectors.bin`` (word2vec
binary, loads with plain gensim; what embedjob reads back), ``static/vectors.vocab.txt`` (word
counts) and ``static/vectors.kv`` (gensim native, a pickle: for users only) at the end.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from embedjob.errors import StaticVectorsError
from embedjob.layout import CARRIED_DIR, PARTS_DIR, STATIC_DIR, shard_file, shard_marker
from embedjob.reconcile import read_marker
from embedjob.stages.reuse.static import home_part, marker_homes
from embedjob.stages.static.parts import part_sums
from embedjob.wordvectors import (
    BIN_NAME,
    KV_NAME,
    make_keyed_vectors,
    write_keyed_vectors,
)

if TYPE_CHECKING:
    from embedjob.stages.static.config import StaticConfig
    from embedjob.storage import Storage

logger = logging.getLogger(__name__)

STATIC_RECIPE = "bert_static_v1"


def run_static(scfg: StaticConfig, out: "Storage", committed_shards: list[str]) -> dict[str, Any]:
    """Pipeline stage: merge ``static/parts/<shard>.parquet`` of the committed shards, keep words
    seen at least ``static.min_count`` times, and write ``static/vectors.bin``, ``vectors.vocab.txt``
    and ``vectors.kv`` (only after everything succeeded; see :func:`embedjob.wordvectors.write_keyed_vectors`).
    Returns stats."""
    present = _present_parts(out, committed_shards)
    carried_removed = _drop_unreferenced_carried(out, present)
    # pass 1: counts only, to apply min_count before touching the sums
    totals, dim = _word_totals(out, present)
    kept = sorted(w for w, c in totals.items() if c >= scfg.min_count)
    counts = np.array([totals[w] for w in kept], dtype=np.int64)
    # pass 2: sums of the kept words
    sums = _kept_sums(out, present, kept, dim)
    empty_reason = _empty_vocabulary_reason(totals, scfg.min_count, len(present))
    if empty_reason:
        logger.warning("static: no word vectors: %s; writing empty vector files (0 words)", empty_reason)
    vectors = sums / np.maximum(counts, 1)[:, None] if len(kept) else sums
    vectors = _postprocess(vectors, scfg.postprocess, scfg.abtt_components).astype(np.float32)
    kv = build_keyed_vectors(kept, counts, vectors)
    write_keyed_vectors(kv, out.child(STATIC_DIR))
    logger.info("static: %d words (min_count=%d) from %d shard(s), %d occurrences", len(kept), scfg.min_count,
                len(present), int(counts.sum()))
    stats = {
        "recipe": STATIC_RECIPE,
        "words": len(kept),
        "words_seen": len(totals),
        "occurrences": int(sum(totals.values())),
        "occurrences_kept": int(counts.sum()),
        "shards": len(present),
        "dim": dim,
        "min_count": scfg.min_count,
        "word_pooling": scfg.word_pooling,
        "layers": scfg.layers,
        "postprocess": scfg.postprocess,
        "carried_parts_removed": carried_removed,
        "vectors": out.url(f"{STATIC_DIR}/{KV_NAME}"),
        "word2vec_binary": out.url(f"{STATIC_DIR}/{BIN_NAME}"),
    }
    if empty_reason:
        stats["empty_reason"] = empty_reason
    return stats


def _present_parts(out: "Storage", committed_shards: list[str]) -> list[str]:
    """The static parts that make up the sum, each once: per committed shard its own part
    (``static/parts/<shard>.parquet``) and, with output.reuse, the carried parts of the commits its
    copied rows were encoded in (``static_homes`` in its marker, stages/reuse/static.py). A home
    whose rows in the committed shards do not add up to its document count (a run stopped halfway)
    is an error: summing it would count some documents twice or drop some. A committed shard with
    rows but no part is an error (a shard without rows may have none)."""
    present: dict[str, None] = {}
    homes: dict[str, list[int]] = {}
    for key in committed_shards:
        marker = read_marker(out, shard_marker(key)) or {}
        if "static_homes" in marker:
            for h, (n, d) in marker_homes(marker).items():
                homes.setdefault(h, [0, d])[0] += n
                present.setdefault(home_part(key, marker, h))
            continue
        rel = shard_file(PARTS_DIR, key)
        if out.exists(rel):
            present.setdefault(rel)
            continue
        if marker.get("rows_in", 0) and "static" not in marker.get("outputs", {}):
            raise StaticVectorsError(
                f"shard {key} was committed without static word vector parts ({out.url(rel)} is missing); "
                "rerun with output.overwrite=true to encode it again"
            )
        if marker.get("rows_in", 0):
            raise StaticVectorsError(f"static word vector part {out.url(rel)} of shard {key} is missing")
    off = {h: v for h, v in homes.items() if v[0] != v[1]}
    if off:
        raise StaticVectorsError(
            f"{len(off)} static part(s) cover documents the committed shards do not hold as counted (e.g. "
            f"{next(iter(off))}: {list(off.values())[0][0]} of {list(off.values())[0][1]} documents): a run stopped "
            "between commits; run the job again (it encodes those documents again)")
    missing = [rel for rel in present if not out.exists(rel)]
    if missing:
        raise StaticVectorsError(f"static word vector part(s) {', '.join(out.url(m) for m in missing[:3])} missing")
    return list(present)


def _drop_unreferenced_carried(out: "Storage", present: list[str]) -> int:
    """Delete the carried parts (``static/carried/<commit>.parquet``, output.reuse) that no kept shard's
    marker names any more (every row of their commit was encoded again or left the output): nothing
    can read them (a row's home comes from its marker), and a later run that would carry such a home
    copies it again from its shard's own part, or encodes its documents again. Returns how many."""
    named = set(present)
    gone = [rel for rel in (f"{CARRIED_DIR}/{name}" for name in out.list(CARRIED_DIR, suffix=".parquet"))
            if rel not in named]
    for rel in gone:
        out.delete(rel)
    if gone:
        logger.info("static: removed %d carried part(s) that no committed shard names any more", len(gone))
    return len(gone)


def _word_totals(out: "Storage", present: list[str]) -> tuple[dict[str, int], int]:
    """Occurrences per word over the parts, and the vectors' dimension (0 without parts)."""
    totals: dict[str, int] = {}
    dim = None
    for rel in present:
        t = out.read_parquet(rel, columns=["word", "count"])
        for w, c in zip(t.column("word").to_pylist(), t.column("count").to_pylist()):
            totals[w] = totals.get(w, 0) + c
        if dim is None:
            dim = out.read_parquet_schema(rel).field("sum").type.list_size
    return totals, dim or 0


def _kept_sums(out: "Storage", present: list[str], kept: list[str], dim: int) -> np.ndarray:
    """float64 sums of the ``kept`` words over the parts (words are unique within one shard part)."""
    index = {w: i for i, w in enumerate(kept)}
    sums = np.zeros((len(kept), dim), dtype=np.float64)
    for rel in present:
        t = out.read_parquet(rel)
        pos = np.fromiter((index.get(w, -1) for w in t.column("word").to_pylist()), dtype=np.int64,
                          count=t.num_rows)
        m = pos >= 0
        if m.any():
            sums[pos[m]] += part_sums(t)[m]
    return sums


def _postprocess(vectors: np.ndarray, mode: str, components: int) -> np.ndarray:
    """``static.postprocess``: the vectors as they are, centred, or centred with the top
    ``components`` principal directions removed (all-but-the-top)."""
    if mode == "none" or len(vectors) == 0:
        return vectors
    x = vectors - vectors.mean(axis=0, keepdims=True)
    if mode == "abtt" and components > 0:
        k = min(components, x.shape[1], max(len(x) - 1, 0))
        if k:
            _, _, vt = np.linalg.svd(x, full_matrices=False)
            top = vt[:k]
            x = x - (x @ top.T) @ top
    return x


def build_keyed_vectors(words: list[str], counts: np.ndarray, vectors: np.ndarray):
    """gensim KeyedVectors, most frequent first (ties by word), with each word's ``count`` attribute set."""
    order = sorted(range(len(words)), key=lambda i: (-int(counts[i]), words[i]))
    return make_keyed_vectors([words[i] for i in order], vectors[order], [int(counts[i]) for i in order])


def _empty_vocabulary_reason(totals: dict[str, int], min_count: int, shards: int) -> Optional[str]:
    """Why no word reached the static vocabulary (None when some did): an empty result is recorded,
    not an error (a small or all-null corpus is a valid input)."""
    if any(c >= min_count for c in totals.values()):
        return None
    if not totals:
        return (f"no word of the job's vocabulary occurred in the {shards} committed shard(s) (empty or null "
                "texts, or every token dropped by preprocessing)")
    return (f"none of the {len(totals)} word(s) seen occurs static.min_count={min_count} times or more (the most "
            f"frequent occurs {max(totals.values())} times); lower static.min_count for a small corpus")
