"""Static word vectors from BERT, aggregated in the encode pass (Bommasani, Davis & Cardie, ACL 2020).

A word's static vector is the average, over every occurrence of the word in the corpus, of its
contextual vector, where the contextual vector of one occurrence pools the word's word pieces
(``mean`` by default; ``first``, ``last`` or ``max``) from the chosen layer(s) (the last by default;
``last4`` = mean of the last four). Nothing runs a second BERT pass: the encoder actors hand every
model batch's hidden states to a :class:`StaticAccumulator` (a token hook of
:meth:`embedjob.encode.TextEncoder.encode_ids`).

Words are the job's vocabulary: a BERT word (the fast tokenizer's pre-tokenised word, found with
``word_ids()``) counts only when the job's gensim filter chain, applied to the word alone, turns it
into exactly one token that is among the document's own gensim tokens. So ``Cats`` is accumulated
as ``cat`` with the default chain (stemming), stop words are skipped, and the output keys are the
same strings as ``tokens/`` and the Word2Vec vocabulary.

Exactly once, at three levels:

1. every encoder call writes its sums per (shard, contiguous row run) to a staged part named by
   the row range (``_tmp/<shard>/<r0>-<r1>.static.parquet``); a retried call rewrites the same
   name;
2. at shard commit :func:`commit_static_parts` picks staged parts whose row ranges tile the shard
   exactly (a stale part of a differently-cut retry is ignored; no tiling -> the commit fails and
   the shard is redone) and writes ``static/parts/<shard>.parquet`` before the shard's marker;
3. :func:`run_static` merges the parts of the committed shards only, so a backfill adds just the
   new shards' contributions, and writes (:func:`embedjob.wordvectors.write_keyed_vectors`)
   ``static/vectors.bin`` (word2vec binary, loads with plain gensim; what embedjob reads back),
   ``static/vectors.vocab.txt`` (word counts) and ``static/vectors.kv`` (gensim native, a pickle:
   for users only) at the end.

Example::

    from gensim.models import KeyedVectors
    kv = KeyedVectors.load_word2vec_format("out/static/vectors.bin", binary=True,
                                           fvocab="out/static/vectors.vocab.txt")
    kv.most_similar(normalize_query_word("out", {}, "cats"))
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from embedjob._config_base import Section
from embedjob.errors import StaticVectorsError
from embedjob.layout import PARTS_DIR, STATIC_DIR
from embedjob.schema import WORD_IDS, WORDS, contiguous_runs
from embedjob.wordvectors import (
    BIN_NAME,
    KV_NAME,
    make_keyed_vectors,
    write_keyed_vectors,
)

logger = logging.getLogger(__name__)

STATIC_RECIPE = "bert_static_v1"

WORD_POOLING_MODES = ("mean", "first", "last", "max")
LAYER_MODES = ("last", "last4", "all")


class StaticConfig(Section):
    enabled: bool = Field(
        True,
        description="Aggregate BERT static word vectors during encoding (no second model pass) and write "
        "<out>/static/vectors.bin (word2vec binary, counts in vectors.vocab.txt) and vectors.kv (gensim native).",
    )
    word_pooling: Literal["mean", "first", "last", "max"] = Field(
        "mean",
        description="How a word's word pieces become one contextual vector: mean of the pieces, the first "
        "or the last piece, or their element-wise max.",
    )
    layers: Union[Literal["last", "last4", "all"], list[int]] = Field(
        "last",
        description="Hidden layer(s) the vectors come from: 'last', 'last4' (mean of the last four), 'all' "
        "(mean of every transformer layer), or a list of hidden_states indices (0 = embedding output, "
        "1..L = transformer layers, negatives count from the end), averaged.",
    )
    min_count: int = Field(
        5, ge=1, description="Words seen fewer times than this in the committed corpus get no vector."
    )
    postprocess: Literal["none", "center", "abtt"] = Field(
        "none",
        description="Applied to the final vectors: 'none'; 'center' subtracts the vocabulary mean; 'abtt' "
        "('all-but-the-top', Mu & Viswanath 2018) also removes the top principal directions "
        "(abtt_components), which BERT's anisotropic spaces share.",
    )
    abtt_components: int = Field(
        3, ge=0, description="Principal directions removed by postprocess=abtt (fitted on the kept words)."
    )

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("static.layers: give at least one layer index, or 'last' / 'last4' / 'all'")
        return v


# -- settings handed to preprocess tasks and encoder actors ---------------------------------------
# The static options that change per-shard outputs (the rest only change the corpus-wide merge).
SHARD_FIELDS = ("enabled", "word_pooling", "layers")


def static_shard_settings(static_cfg: StaticConfig) -> Optional[dict[str, Any]]:
    """What the per-shard stage hash should include of ``static`` (None when disabled): changing
    ``min_count`` or ``postprocess`` re-runs only the merge, not the encoder."""
    if not static_cfg.enabled:
        return None
    return {k: v for k, v in static_cfg.model_dump(mode="json").items() if k in SHARD_FIELDS}


def static_actor_settings(cfg, out) -> dict[str, Any]:
    """The plain, JSON-able settings the preprocess tasks and encoder actors need (static options plus
    where staged parts go). Checks ``static.layers`` against the model's depth on the driver, before
    any Ray work."""
    import json

    from embedjob.models import resolve_model_path

    try:
        with open(os.path.join(resolve_model_path(cfg.encode.model), "config.json")) as f:
            depth = json.load(f).get("num_hidden_layers")
    except (OSError, ValueError):
        depth = None
    if depth:
        resolve_layers(cfg.static.layers, depth)
    s = cfg.static.model_dump(mode="json")
    s.update({"out_url": out.url(), "storage_options": dict(out.storage_options)})
    return s


def resolve_layers(layers: Union[str, Sequence[int]], num_hidden_layers: int) -> Optional[tuple[int, ...]]:
    """``hidden_states`` indices for ``static.layers`` (None = the last hidden state, no extra output).

    ``hidden_states`` has ``L + 1`` entries: the embedding output, then each of the L layers."""
    L = int(num_hidden_layers)
    if layers == "last":
        return None
    if layers == "last4":
        return tuple(range(max(1, L - 3), L + 1))
    if layers == "all":
        return tuple(range(1, L + 1))
    if isinstance(layers, str):
        raise ValueError(f"static.layers={layers!r}; valid: {', '.join(LAYER_MODES)} or a list of indices")
    out = []
    for i in layers:
        j = int(i) + (L + 1 if int(i) < 0 else 0)
        if not 0 <= j <= L:
            raise ValueError(f"static.layers: index {i} is out of range for a model with {L} layers "
                             f"(valid 0..{L} or -{L + 1}..-1)")
        out.append(j)
    return tuple(out)


# -- preprocess side: BERT tokens -> vocabulary words ----------------------------------------------
_NORM_CACHE: dict[int, tuple[Any, dict[str, str]]] = {}
_NORM_CACHE_MAX = 500_000


def normalize_word(word: str, filters: list[Callable[[str], str]]) -> str:
    """The vocabulary word for one surface word: the gensim filter chain applied to the word alone;
    "" when the chain drops it (stop word, too short, number) or splits it into several tokens."""
    from gensim.parsing import preprocess_string

    entry = _NORM_CACHE.get(id(filters))
    if entry is None or entry[0] is not filters:
        entry = _NORM_CACHE[id(filters)] = (filters, {})  # keeps `filters` alive, so the id stays its own
    cache = entry[1]
    got = cache.get(word)
    if got is None:
        toks = preprocess_string(word, filters)
        got = toks[0] if len(toks) == 1 else ""
        if len(cache) >= _NORM_CACHE_MAX:
            cache.clear()
        cache[word] = got
    return got


def align_words(table: pa.Table, texts: list[Optional[str]], empty: np.ndarray, tok, filters,
                settings: dict[str, Any]) -> pa.Table:
    """Add the columns that map every BERT token to a vocabulary word occurrence.

    ``_word_ids`` (list<int32>, one per token of ``_input_ids``): index into the row's ``_words``,
    -1 for special tokens and for words that are not counted; ``_words`` (list<string>): one
    vocabulary word per counted word occurrence. ``_input_ids`` is (re)written from the same
    tokenisation so the two always agree (same truncation). A word cut by truncation is not
    counted (its pieces are incomplete)."""
    from embedjob.schema import INPUT_IDS, TOKENS

    n = len(texts)
    todo = [i for i in range(n) if not empty[i]]
    ids_col: list[Any] = [[] for _ in range(n)]
    wid_col: list[Any] = [[] for _ in range(n)]
    words_col: list[list[str]] = [[] for _ in range(n)]
    if todo:
        enc = tok.tok([texts[i] for i in todo], truncation=True, max_length=tok.max_length,
                      add_special_tokens=True, return_offsets_mapping=True, return_attention_mask=False,
                      return_token_type_ids=False)
        doc_tokens = table.column(TOKENS).to_pylist() if TOKENS in table.column_names else None
        for k, i in enumerate(todo):
            ids = enc["input_ids"][k]
            offsets = enc["offset_mapping"][k]
            word_ids = enc.word_ids(k)
            text = texts[i]
            allowed = set(doc_tokens[i]) if doc_tokens is not None else None
            truncated = len(ids) >= tok.max_length
            last_word = None
            if truncated:
                last_word = next((w for w in reversed(word_ids) if w is not None), None)
            # character span of each word (first piece's start .. last piece's end)
            spans: dict[int, list[int]] = {}
            for w, (a, b) in zip(word_ids, offsets):
                if w is None:
                    continue
                sp = spans.get(w)
                if sp is None:
                    spans[w] = [a, b]
                else:
                    sp[1] = b
            local: dict[int, int] = {}
            words: list[str] = []
            for w, (a, b) in spans.items():
                if w == last_word:
                    continue
                v = normalize_word(text[a:b], filters)
                if v and (allowed is None or v in allowed):
                    local[w] = len(words)
                    words.append(v)
            ids_col[i] = ids
            wid_col[i] = [-1 if w is None else local.get(w, -1) for w in word_ids]
            words_col[i] = words
    ids_arr = pa.array(ids_col, type=pa.list_(pa.int32()))
    if INPUT_IDS in table.column_names:
        table = table.set_column(table.column_names.index(INPUT_IDS), INPUT_IDS, ids_arr)
    else:
        table = table.append_column(INPUT_IDS, ids_arr)
    table = table.append_column(WORD_IDS, pa.array(wid_col, type=pa.list_(pa.int32())))
    return table.append_column(WORDS, pa.array(words_col, type=pa.list_(pa.string())))


# -- encoder side: accumulate sums per (shard row run, word) --------------------------------------
def _row_runs(shards: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Run index of every row, and (shard, first row, last row) of each run of consecutive rows of
    one shard — the write stage's cut (:func:`embedjob.schema.contiguous_runs`)."""
    run_of = np.empty(len(rows), dtype=np.int64)
    runs = []
    for k, (shard, r0, r1, positions) in enumerate(contiguous_runs(shards, rows)):
        run_of[positions] = k
        runs.append((shard, r0, r1))
    return run_of, runs


class StaticAccumulator:
    """Held by an encoder actor: sums every counted word occurrence's pooled vector per (shard row
    run, word) while the encoder runs, then writes one staged part per run.

    Use per encoder call: ``hook = acc.hook_for(batch, keep)``, ``encoder.encode_ids(..., token_hook=hook)``,
    ``out = acc.attach(out)``."""

    def __init__(self, encoder, *, out_url: str, storage_options: Optional[dict[str, Any]] = None,
                 word_pooling: str = "mean", layers: Union[str, list[int]] = "last", **_ignored: Any):
        from embedjob.storage import Storage

        if word_pooling not in WORD_POOLING_MODES:
            raise ValueError(f"static.word_pooling={word_pooling!r}; valid: {', '.join(WORD_POOLING_MODES)}")
        self.encoder = encoder
        self.torch = encoder.torch
        self.out = Storage(out_url, storage_options or {})
        self.pooling = word_pooling
        # The encoder returns these hidden states to the hook (None = last_hidden_state only).
        encoder.output_hidden_layers = resolve_layers(layers, encoder.model.config.num_hidden_layers)
        self.dim = encoder.dim
        self._state: Optional[dict[str, Any]] = None

    # one encoder call ----------------------------------------------------------------------------
    def hook_for(self, batch: pa.Table, keep: np.ndarray):
        """Prepare the word-slot bookkeeping of one encoder call; returns the token hook."""
        from embedjob.schema import ROW, SHARD

        run_of, runs = _row_runs(batch.column(SHARD).to_numpy(zero_copy_only=False).astype(str),
                                 batch.column(ROW).to_numpy())
        wid_col = batch.column(WORD_IDS).to_pylist()
        words_col = batch.column(WORDS).to_pylist()
        slot_of: dict[tuple[int, str], int] = {}
        tok_inst: list[np.ndarray] = []  # per todo doc: instance (word occurrence) index per token, -1 = none
        inst_slot: list[np.ndarray] = []  # per todo doc: slot of each instance
        for row in np.flatnonzero(keep):
            run = int(run_of[row])
            words = words_col[row]
            slots = np.empty(len(words), dtype=np.int64)
            for w, word in enumerate(words):
                key = (run, word)
                s = slot_of.get(key)
                if s is None:
                    s = slot_of[key] = len(slot_of)
                slots[w] = s
            tok_inst.append(np.asarray(wid_col[row], dtype=np.int64))
            inst_slot.append(slots)
        n_slots = len(slot_of)
        counts = np.bincount(np.concatenate(inst_slot) if inst_slot else np.zeros(0, np.int64),
                             minlength=n_slots).astype(np.int64)
        torch = self.torch
        self._state = {
            "runs": runs, "slot_of": slot_of, "counts": counts, "tok_inst": tok_inst, "inst_slot": inst_slot,
            "sums": torch.zeros((n_slots, self.dim), dtype=torch.float32, device=self.encoder.device),
        }
        return self._hook

    def _hook(self, layers, mask, idx: np.ndarray) -> None:
        torch = self.torch
        st = self._state
        h = layers[0].float() if len(layers) == 1 else torch.stack([x.float() for x in layers]).mean(0)
        B, S, D = h.shape
        pos, inst, slots = [], [], []
        offset = 0
        for r, j in enumerate(idx):
            t = st["tok_inst"][j]
            p = np.flatnonzero(t >= 0)
            pos.append(r * S + p)
            inst.append(offset + t[p])
            slots.append(st["inst_slot"][j])
            offset += len(st["inst_slot"][j])
        if offset == 0:
            return
        pos_a, inst_a = np.concatenate(pos), np.concatenate(inst)
        dev = h.device
        flat = h.reshape(B * S, D)
        if self.pooling in ("first", "last"):
            # pieces of one occurrence are consecutive, in position order
            if self.pooling == "first":
                _, pick = np.unique(inst_a, return_index=True)
            else:
                _, rev = np.unique(inst_a[::-1], return_index=True)
                pick = len(inst_a) - 1 - rev
            vec = flat.index_select(0, torch.from_numpy(pos_a[pick]).to(dev))
        else:
            tok_vec = flat.index_select(0, torch.from_numpy(pos_a).to(dev))
            inst_t = torch.from_numpy(inst_a).to(dev)
            if self.pooling == "mean":
                vec = torch.zeros((offset, D), dtype=torch.float32, device=dev).index_add_(0, inst_t, tok_vec)
                n = torch.bincount(inst_t, minlength=offset).clamp_(min=1).unsqueeze(1)
                vec = vec / n
            else:  # max
                vec = torch.full((offset, D), float("-inf"), dtype=torch.float32, device=dev)
                vec = vec.scatter_reduce_(0, inst_t.unsqueeze(1).expand(-1, D), tok_vec, "amax")
        st["sums"].index_add_(0, torch.from_numpy(np.concatenate(slots)).to(dev), vec)

    def attach(self, out: pa.Table) -> pa.Table:
        """Write this call's staged parts (one per shard row run, also for runs without words, so the
        parts tile the shard) and drop the word columns from the encoder's output."""
        from embedjob.layout import STATIC_PART_SUFFIX, part_name

        st, self._state = self._state, None
        if st is None:
            raise RuntimeError("StaticAccumulator.attach called without hook_for (one call per encoder batch)")
        sums = st["sums"].cpu().numpy()
        by_run: list[list[tuple[str, int]]] = [[] for _ in st["runs"]]
        for (run, word), s in st["slot_of"].items():
            by_run[run].append((word, s))
        for (shard, r0, r1), items in zip(st["runs"], by_run):
            items.sort()
            sl = np.fromiter((s for _, s in items), dtype=np.int64, count=len(items))
            table = part_table([w for w, _ in items], st["counts"][sl], sums[sl], self.dim)
            self.out.write_parquet(part_name(shard, r0, r1, STATIC_PART_SUFFIX), table, compression="none")
        return out.drop_columns([c for c in (WORD_IDS, WORDS) if c in out.column_names])


def part_table(words: list[str], counts: np.ndarray, sums: np.ndarray, dim: int) -> pa.Table:
    """The parts' schema: ``word`` (string), ``count`` (int64 occurrences), ``sum``
    (fixed_size_list<float32>[dim], sum of the occurrences' vectors)."""
    flat = pa.array(np.ascontiguousarray(sums, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.table({
        "word": pa.array(words, type=pa.string()),
        "count": pa.array(np.asarray(counts, dtype=np.int64), type=pa.int64()),
        "sum": pa.FixedSizeListArray.from_arrays(flat, dim),
    })


def _sums_of(table: pa.Table) -> np.ndarray:
    col = table.column("sum").combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


# -- shard commit ----------------------------------------------------------------------------
_PART_RE = re.compile(r"(\d+)-(\d+)\.static\.parquet$")


def choose_tiling(ranges: list[tuple[int, int]], n_rows: Optional[int] = None) -> Optional[list[int]]:
    """Indices of ranges (inclusive ``(first, last)`` rows) that cover ``0 .. n_rows-1`` exactly once,
    or None. ``n_rows`` defaults to the largest last row + 1. Depth-first, remembering dead ends,
    so it is linear in the number of ranges for the usual one-or-two-candidates-per-row case."""
    if not ranges:
        return [] if not n_rows else None
    end = (max(b for _, b in ranges) + 1) if n_rows is None else n_rows
    starts: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(ranges):
        if b >= a:
            starts.setdefault(a, []).append(i)
    for lst in starts.values():  # prefer longer runs (fewer parts), then later-listed
        lst.sort(key=lambda i: (-ranges[i][1], -i))
    dead: set[int] = set()
    path: list[int] = []

    def dfs(pos: int) -> bool:
        if pos == end:
            return True
        if pos in dead or pos > end:
            return False
        for i in starts.get(pos, []):
            path.append(i)
            if dfs(ranges[i][1] + 1):
                return True
            path.pop()
        dead.add(pos)
        return False

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, len(ranges) + 100))
    try:
        return list(path) if dfs(0) else None
    finally:
        sys.setrecursionlimit(limit)


def merge_part_tables(tables: list[pa.Table]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sum ``count`` and ``sum`` by ``word`` over part tables: (sorted words, counts, float64 sums)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return [], np.zeros(0, np.int64), np.zeros((0, 0), np.float64)
    words = np.concatenate([np.asarray(t.column("word").to_pylist(), dtype=object) for t in tables])
    counts = np.concatenate([t.column("count").to_numpy() for t in tables])
    sums = np.concatenate([_sums_of(t) for t in tables]).astype(np.float64)
    uniq, inv = np.unique(words.astype(str), return_inverse=True)
    out_counts = np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)
    out_sums = np.zeros((len(uniq), sums.shape[1]), dtype=np.float64)
    np.add.at(out_sums, inv, sums)
    return uniq.tolist(), out_counts, out_sums


def commit_static_parts(out, shard: str, part_paths: list[str], expected_rows: Optional[int] = None) -> dict[str, Any]:
    """Merge the staged static parts of one shard into ``static/parts/<shard>.parquet``.

    Only parts whose row ranges tile the shard exactly are used (a retried call cut differently may
    leave a stale part beside the complete set; it is ignored), so each row counts once. Raises
    :class:`StaticVectorsError` when no tiling exists (the shard is then not committed and redone).
    Returns a small summary for the shard's marker."""
    ranges, paths = [], []
    for p in part_paths:
        m = _PART_RE.search(p)
        if not m:
            raise StaticVectorsError(f"shard {shard}: staged static part {p!r} is not named <first>-<last>"
                                     ".static.parquet")
        ranges.append((int(m.group(1)), int(m.group(2))))
        paths.append(p)
    pick = choose_tiling(ranges, expected_rows)
    if pick is None:
        have = ", ".join(f"{a}-{b}" for a, b in sorted(ranges)) or "none"
        rows = f"rows 0-{expected_rows - 1}" if expected_rows else "its rows"
        raise StaticVectorsError(
            f"shard {shard}: the staged static parts ({have}) do not cover {rows} exactly once; "
            "the shard is not committed and will be redone"
        )
    tables = [out.read_parquet(paths[i]) for i in sorted(pick, key=lambda i: ranges[i])]
    dim = None
    for t in tables:
        dim = t.schema.field("sum").type.list_size
        break
    words, counts, sums = merge_part_tables(tables)
    if not words:
        sums = np.zeros((0, dim or 0), np.float64)
    rel = f"{PARTS_DIR}/{shard}.parquet"
    out.write_parquet(rel, part_table(words, counts, sums, sums.shape[1] if sums.ndim == 2 else (dim or 0)))
    return {"part": rel, "words": len(words), "occurrences": int(counts.sum()),
            "staged_parts": len(pick), "stale_parts_ignored": len(paths) - len(pick)}


# -- corpus-wide stage ---------------------------------------------------------------------------
def _postprocess(vectors: np.ndarray, mode: str, components: int) -> np.ndarray:
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


def run_static(cfg, out, committed_shards: list[str]) -> dict[str, Any]:
    """Pipeline stage: merge ``static/parts/<shard>.parquet`` of the committed shards, keep words
    seen at least ``static.min_count`` times, and write ``static/vectors.bin``, ``vectors.vocab.txt``
    and ``vectors.kv`` (only after everything succeeded; see :func:`embedjob.wordvectors.write_keyed_vectors`).
    Returns stats."""
    from embedjob.write import read_marker

    scfg: StaticConfig = cfg.static
    present = []
    for key in committed_shards:
        rel = f"{PARTS_DIR}/{key}.parquet"
        if out.exists(rel):
            present.append(rel)
            continue
        marker = read_marker(out, key) or {}
        if marker.get("rows_in", 0) and "static" not in marker.get("outputs", {}):
            raise StaticVectorsError(
                f"shard {key} was committed without static word vector parts ({out.url(rel)} is missing); "
                "rerun with output.overwrite=true to encode it again"
            )
        if marker.get("rows_in", 0):
            raise StaticVectorsError(f"static word vector part {out.url(rel)} of shard {key} is missing")
    # pass 1: counts only, to apply min_count before touching the sums
    totals: dict[str, int] = {}
    dim = None
    for rel in present:
        t = out.read_parquet(rel, columns=["word", "count"])
        for w, c in zip(t.column("word").to_pylist(), t.column("count").to_pylist()):
            totals[w] = totals.get(w, 0) + c
        if dim is None:
            dim = out.read_parquet_schema(rel).field("sum").type.list_size
    kept = sorted(w for w, c in totals.items() if c >= scfg.min_count)
    index = {w: i for i, w in enumerate(kept)}
    dim = dim or 0
    sums = np.zeros((len(kept), dim), dtype=np.float64)
    counts = np.array([totals[w] for w in kept], dtype=np.int64)
    # pass 2: sums of the kept words (words are unique within one shard part)
    for rel in present:
        t = out.read_parquet(rel)
        pos = np.fromiter((index.get(w, -1) for w in t.column("word").to_pylist()), dtype=np.int64,
                          count=t.num_rows)
        m = pos >= 0
        if m.any():
            sums[pos[m]] += _sums_of(t)[m]
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
        "vectors": out.url(f"{STATIC_DIR}/{KV_NAME}"),
        "word2vec_binary": out.url(f"{STATIC_DIR}/{BIN_NAME}"),
    }
    if empty_reason:
        stats["empty_reason"] = empty_reason
    return stats


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


# -- queries -----------------------------------------------------------------------------------
def job_filters(output_url: str, storage_options: Optional[dict[str, Any]] = None):
    """The gensim filter chain a finished job used (from ``<out>/manifest.json``)."""
    from embedjob.config import PreprocessConfig
    from embedjob.preprocess import build_filters
    from embedjob.storage import Storage

    out = Storage(output_url, storage_options or {})
    try:
        manifest = out.read_json("manifest.json")
    except FileNotFoundError:
        raise StaticVectorsError(f"no manifest.json under {out.url()} (is it a finished embedjob output?)") from None
    pre = (manifest.get("config") or {}).get("preprocess") or {}
    return build_filters(PreprocessConfig.model_validate(pre))


def normalize_query_word(output_url: str, storage_options: Optional[dict[str, Any]], word: str) -> str:
    """A query word as the job's vocabulary spells it (its gensim preprocessing, e.g. ``Cats`` -> ``cat``).

    Words the chain drops (stop words, numbers, too short) come back lower-cased, so a lookup fails
    naming the word."""
    from gensim.parsing import preprocess_string

    toks = preprocess_string(word, job_filters(output_url, storage_options))
    return toks[0] if toks else word.strip().lower()
