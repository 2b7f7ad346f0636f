"""Write stage: staged block parts, then one committed output file set per input shard.

Encoded blocks are written by Ray tasks as *staged parts* named by shard and row range
(``_tmp/<shard>/<first row>-<last row>.arrow``, an Arrow IPC file): a retried block rewrites the same name. When
the driver has seen every row of a shard, :func:`commit_shard` merges its parts (deduplicated by
row index, so a block that ran twice still counts once), writes ``vectors/<shard>.parquet`` and
``tokens/<shard>.parquet``, and only then the shard's done marker ``_done/<shard>.json`` — the
commit point. A reader (or a rerun) trusts a shard only when its marker is there.

Output files are plain Parquet readable by pyarrow, pandas and duckdb without embedjob:
``vectors/``: ``id`` (string), ``vector`` (fixed_size_list<float32>[dim]), ``n_tokens`` (int32);
``tokens/``: ``id``, ``tokens`` (list<string>).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from embedjob._config_base import Section
from embedjob.errors import ConfigError, IncompleteShardError
from embedjob.layout import (
    CHUNKS,
    PART_SUFFIX,
    PARTS_DIR,
    STATIC_PART_SUFFIX,
    TMP,
    TOKENS_DIR,
    VECTORS,
    part_name,
    shard_file,
    shard_marker,
)
from embedjob.schema import (
    CAPPED,
    CHUNK_CHARS,
    CHUNK_TOKENS,
    CHUNK_VECTORS,
    EMPTY,
    ENCODED_TOKENS,
    ENCODER_NODE,
    ENCODER_RSS,
    ROW,
    SHARD,
    TEXT_HASH,
    TOKENS,
    WINDOWS,
    contiguous_runs,
)
from embedjob.stages.lance_sink.write import write_shard_fragments
from embedjob.stages.reuse import copy as reuse_copy
from embedjob.stages.reuse import static as reuse_static
from embedjob.stages.static.parts import commit_static_parts
from embedjob.storage import Storage, parquet_list_names
from embedjob.vector_codec import INT8_SCHEME, add_rescore_column, codec_of, unit_int8_max, with_codec
from embedjob.vector_codec import encode as encode_vectors

logger = logging.getLogger(__name__)


class OutputConfig(Section):
    url: str = Field("output/local", description="Folder to write all outputs to; any fsspec URL.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Options for the output's fsspec filesystem."
    )
    overwrite: bool = Field(
        False,
        description="Recompute every shard and stage even when committed outputs match (old outputs "
        "are replaced only as new ones are committed).",
    )
    removed_shards: Literal["move", "keep"] = Field(
        "move",
        description="Committed outputs of shards no longer in the input: 'move' puts them under "
        "_superseded/<run id>/ (the output mirrors the input; nothing is deleted); 'keep' keeps them, listed in "
        "the manifest as kept-not-in-input and read by the corpus stages (for inputs whose old shards are "
        "removed once processed). Outputs of another recipe (model, pooling, preprocessing...) are always "
        "moved aside.",
    )
    lease_timeout_s: float = Field(
        120.0, gt=0,
        description="A run holds the output's lease (_lease.json) and refreshes it every lease_timeout_s / 4; "
        "a second run on the same output stops at once while the lease is fresher than this, and takes it "
        "over (with a warning) once it is older, i.e. its run was killed.",
    )
    force_unlock: bool = Field(
        False,
        description="Take over the output's lease even while another run holds it (`embedjob run "
        "--force-unlock`); for the rare manual case of a run known to be gone. That run, if alive, stops "
        "before writing its manifest.",
    )
    vector_dtype: Literal["float32", "float16", "int8", "binary"] = Field(
        "float32",
        description="How document vectors are stored (vectors/*.parquet and Lance): float32; float16 (half "
        "the bytes); int8 (a quarter: round(x * 127 / int8_max), one scale shared by every shard, so raw rows "
        "compare in any reader; the scale kept in the file's metadata, the shard's marker and the manifest); "
        "binary (1 bit a dimension, x > 0, searched by Hamming distance). Part of the recipe: a change "
        "re-encodes every shard.",
    )
    int8_max: Optional[float] = Field(
        None, gt=0,
        description="vector_dtype int8: the value stored as 127 (and -127), the same for every shard; larger "
        "values are clipped (counted as 'clipped' in each shard's vector_codec). null = min(1, 6 / sqrt(dim)) "
        "when the encoder normalises (6 standard deviations of a component of a random unit vector: 0.306 for "
        "384 dimensions, where all-MiniLM-L6-v2's largest |component| was 0.257 on 1,000 documents of mixed-en); "
        "a model without normalisation needs it set (a little above the largest |component| of its vectors). "
        "Part of the recipe.",
    )
    binary_rescore: bool = Field(
        True,
        description="vector_dtype binary: also store each vector as int8 (the shared int8 scale) in the column "
        "'rescore' of vectors/<shard>.parquet (dim bytes a row more), which the index stage keeps beside its "
        "Hamming index to rescore the k * index.rescore_factor nearest by Hamming distance (recall@10 0.51 "
        "without, measured in `embedjob bench vectors`). Vectors that are not normalised need output.int8_max "
        "for it. Part of the recipe.",
    )
    reuse: Literal["auto", "off"] = Field(
        "auto",
        description="Before encoding, find for each document of a new or changed shard a vector of the same recipe, "
        "id and text (blake2b of the text, column text_hash of vectors/) among the commits it replaces, and copy it "
        "(with its tokens and chunks) instead of encoding: a re-partitioned or edited corpus encodes only new and "
        "changed documents. 'off' encodes every document of every shard to process. Not with static word vectors "
        "(their per-shard sums need every document encoded); outputs written before text_hash existed serve once "
        "re-encoded.",
    )
    lance: bool = Field(
        False,
        description="Also write the document vectors to the Lance dataset lance/docs.lance (id, vector, n_tokens, "
        "shard, carry_columns), which LanceDB, DuckDB and Ray Data open: each shard's rows written as fragments "
        "with its commit, one dataset version per run holding exactly the committed shards.",
    )
    carry_columns: list[str] = Field(
        default_factory=list,
        description="Input columns copied into the Lance dataset beside the vectors (e.g. [text]); needs lance: true.",
    )
    lance_index: Literal["none", "ivf_pq", "ivf_hnsw_sq"] = Field(
        "none",
        description="ANN index Lance builds on the dataset's vector column at the end of the job (recall@10 "
        "against exact search in stats/lance.json); float32, float16 or binary vectors (binary: IVF_FLAT with "
        "the Hamming distance, whichever kind is named; Lance indexes no int8 vectors).",
    )
    lance_index_min_rows: int = Field(
        5000, ge=1, description="Build lance_index only when the dataset holds at least this many rows."
    )

    @model_validator(mode="after")
    def _lance_settings(self) -> "OutputConfig":
        if self.carry_columns and not self.lance:
            raise ValueError("output.carry_columns needs output.lance: true (only the Lance dataset carries them)")
        if self.lance_index != "none" and not self.lance:
            raise ValueError(f"output.lance_index={self.lance_index!r} needs output.lance: true")
        if self.lance_index != "none" and self.vector_dtype == "int8":
            raise ValueError(f"output.lance_index={self.lance_index!r} needs output.vector_dtype float32, float16 "
                             "or binary: Lance indexes no int8 vector column (its vector indices take float "
                             "vectors, and packed bits with the Hamming distance)")
        if self.lance and importlib.util.find_spec("lance") is None:
            raise ValueError("output.lance needs the pylance package: pip install 'embedjob[lance]'")
        clash = sorted(set(self.carry_columns) & {"id", "vector", "n_tokens", "shard"})
        if clash:
            raise ValueError(f"output.carry_columns {clash} clash with the dataset's own columns")
        return self

    def recipe_part(self) -> dict[str, Any]:
        """How vectors are stored, for the recipe hash; empty for the defaults (older recipes stay valid)."""
        stored = {"vector_dtype": self.vector_dtype} if self.vector_dtype != "float32" else {}
        if self.vector_dtype == "int8":  # the shared scale (older int8 outputs: per-shard ranges, another recipe)
            stored["int8"] = {"scheme": INT8_SCHEME, "int8_max": self.int8_max}
        if self.vector_dtype == "binary" and self.binary_rescore:
            stored["rescore"] = {"scheme": INT8_SCHEME, "int8_max": self.int8_max}
        return {"stored": {**stored, "lance": self.lance, "carry": self.carry_columns}} if (stored or self.lance) else {}

    def int8_max_for(self, normalized: bool, dim: int) -> float:
        """The int8 scale's top value for ``dim``-dimensional vectors that are (not) unit length; a
        ConfigError, before any work, when the vectors are not normalised and ``int8_max`` is not set."""
        if self.int8_max is not None:
            return float(self.int8_max)
        if not normalized:
            raise ConfigError("output.vector_dtype=int8: the encoder does not normalise its vectors, so their "
                              "range is unknown; set output.int8_max (the value stored as 127, shared by every "
                              "shard) or encode.normalize: true")
        return unit_int8_max(dim)



class BlockWriter:
    """Ray Data batch transform: writes each shard's rows of the block as a staged part and
    returns one small row per part (shard, row range, counts) for the driver's bookkeeping."""

    def __init__(self, out_url: str, storage_options: dict[str, Any], id_column: str):
        self.out = Storage(out_url, storage_options)
        self.id_column = id_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = []
        for shard, part in _contiguous_runs(batch):
            rows = part.column(ROW)
            r0, r1 = int(rows[0].as_py()), int(rows[-1].as_py())
            cols = {
                ROW: rows,
                "id": part.column(self.id_column),
                "vector": part.column("vector"),
                "n_tokens": part.column("n_tokens"),
                TOKENS: part.column(TOKENS),
                EMPTY: part.column(EMPTY),
                **{c: part.column(c) for c in (*CHUNK_COLUMNS, TEXT_HASH) if c in part.column_names},
            }
            self.out.write_arrow(part_name(shard, r0, r1), pa.table(cols))
            reports.append({
                "shard": shard, "row_start": r0, "row_end": r1, "rows": part.num_rows,
                "empty": int(pc.sum(part.column(EMPTY)).as_py() or 0),
                "tokens": int(pc.sum(part.column("n_tokens")).as_py() or 0),
                "words": int(pc.sum(pc.list_value_length(part.column(TOKENS))).as_py() or 0),
                "node": part.column(ENCODER_NODE)[0].as_py() if ENCODER_NODE in part.column_names else None,
                "rss_mb": pc.max(part.column(ENCODER_RSS)).as_py() if ENCODER_RSS in part.column_names else None,
                **_window_report(part, self.id_column),
            })
        return pa.Table.from_pylist(reports, schema=REPORT_SCHEMA)


CHUNK_COLUMNS = (CHUNK_CHARS, CHUNK_VECTORS, CHUNK_TOKENS)


def _window_report(part: pa.Table, id_column: str) -> dict[str, Any]:
    """The encoder's window counters of a part (absent when nothing reported them)."""
    if WINDOWS not in part.column_names:
        return {}
    capped = part.column(CAPPED)
    return {"windows": int(pc.sum(part.column(WINDOWS)).as_py() or 0),
            "encoded_tokens": int(pc.sum(part.column(ENCODED_TOKENS)).as_py() or 0),
            "capped_ids": [str(x) for x in part.column(id_column).filter(capped).to_pylist()]}


def _contiguous_runs(batch: pa.Table):
    """(shard, rows) pieces of a batch, each a run of consecutive row indices of one shard."""
    shards = batch.column(SHARD).to_numpy(zero_copy_only=False).astype(str)
    for shard, _, _, positions in contiguous_runs(shards, batch.column(ROW).to_numpy()):
        yield shard, batch.take(pa.array(positions))


REPORT_SCHEMA = pa.schema([
    ("shard", pa.string()), ("row_start", pa.int64()), ("row_end", pa.int64()), ("rows", pa.int64()),
    ("empty", pa.int64()), ("tokens", pa.int64()), ("words", pa.int64()),
    ("node", pa.string()),  # Ray node of the encoder actor that encoded these rows
    ("rss_mb", pa.float64()),  # peak RSS of that encoder actor when it encoded them (MiB)
    ("windows", pa.int64()), ("encoded_tokens", pa.int64()),  # windows and tokens the model was fed
    ("capped_ids", pa.list_(pa.string())),  # ids of documents cut at encode.max_windows
])


ROW_GROUP_ROWS = 16_384  # rows per Parquet row group of vectors/ and tokens/: a reuse copy reads only its rows' groups


def commit_shard(out_url: str, storage_options: dict[str, Any], shard: str, expected_rows: int,
                 on_empty_text: str, marker: dict[str, Any], dim: Optional[int] = None,
                 sink: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Merge a shard's staged parts into its output files (and Lance fragments), then write its
    done marker. ``sink``: ``vector_dtype``, and with ``lance`` the ``carry_columns`` and the input
    shard to read them from (``input_url``, ``input_options``).

    Returns the marker (with row, token and timing counts)."""
    t0 = time.time()
    out = Storage(out_url, storage_options)
    names = out.list(f"{TMP}/{shard}")
    data_parts = [n for n in names if n.endswith(PART_SUFFIX) and not n.endswith(STATIC_PART_SUFFIX)]
    tables = [out.read_arrow(f"{TMP}/{shard}/{n}") for n in data_parts]
    tables = [t.cast(parquet_list_names(t.schema)) for t in tables]  # the types the outputs read back with
    if tables:
        table = pa.concat_tables(tables).combine_chunks()
        table = _dedupe_rows(table)
    else:
        table = _empty_part(dim)
    sink = sink or {}
    static = sink.get("static")  # static word vectors on: {"docs": carried homes' counts, "drop": homes not carried}
    reused = reuse_copy.load_reused(out, sink.get("reuse_plan"), shard, static)  # output.reuse: rows not encoded
    n_reused = reused.num_rows if reused is not None else 0
    if table.num_rows + n_reused != expected_rows:
        raise IncompleteShardError(
            f"shard {shard}: staged parts hold {table.num_rows} rows"
            + (f" and {n_reused} are reused" if n_reused else "") + f", the input has {expected_rows}"
        )
    empty = table.column(EMPTY)
    n_empty = int(pc.sum(empty).as_py() or 0)
    if on_empty_text == "skip" and n_empty:
        table = table.filter(pc.invert(empty))
    vectors, codec = _stored_vectors(table, sink.get("vector_dtype", "float32"), sink.get("int8_max"),
                                     rescore=bool(sink.get("rescore")))
    commit = reuse_copy.new_commit_id()  # stamped in every file: the lookup trusts files of the marker's commit
    vectors = reuse_copy.with_text_hash(vectors, table)
    if static is not None:
        vectors = reuse_static.with_own_home(vectors, commit)
    tokens = table.select(["id", TOKENS])
    chunks = chunks_table(table) if CHUNK_VECTORS in table.column_names else None
    rows = table.column(ROW).to_numpy()
    if reused is not None:
        chunk_rows = reuse_copy.chunk_rows_of(table) if chunks is not None else None
        vectors, tokens, chunks, rows = reuse_copy.merge(reused, vectors, tokens, chunks, rows, chunk_rows)
        codec = codec if table.num_rows else codec_of(vectors.schema)
    out.write_parquet(shard_file(VECTORS, shard), reuse_copy.stamped(vectors, commit), row_group_size=ROW_GROUP_ROWS)
    lance_part = None
    if sink.get("lance"):
        lance_part = write_shard_fragments(out, shard, reuse_copy.without_hash(vectors), pa.array(rows), sink)
    out.write_parquet(shard_file(TOKENS_DIR, shard), reuse_copy.stamped(tokens, commit), row_group_size=ROW_GROUP_ROWS)
    extra: dict[str, Any] = {}
    if chunks is not None:
        out.write_parquet(shard_file(CHUNKS, shard), reuse_copy.stamped(chunks, commit))
        extra["chunks"] = shard_file(CHUNKS, shard)
    static_parts = [n for n in names if n.endswith(STATIC_PART_SUFFIX)]
    if static_parts:  # the word sums of the rows encoded here (the reused keep their homes' parts)
        extra["static"] = commit_static_parts(out, shard, [f"{TMP}/{shard}/{n}" for n in static_parts],
                                               expected_rows=expected_rows, commit=commit,
                                               skip=reused.rows if reused is not None else None)
    elif static is not None:  # nothing encoded here: an older part of this name is no home of these rows
        out.delete(shard_file(PARTS_DIR, shard))
    marker = dict(marker)
    marker.update({
        "shard": shard,
        "rows_in": expected_rows,
        "rows_out": vectors.num_rows,
        "empty_text": n_empty,
        "skipped_empty": n_empty if on_empty_text == "skip" else 0,
        "bert_tokens": int(pc.sum(vectors.column("n_tokens")).as_py() or 0),
        "words": int(pc.sum(pc.list_value_length(tokens.column(TOKENS))).as_py() or 0),
        "outputs": {"vectors": shard_file(VECTORS, shard), "tokens": shard_file(TOKENS_DIR, shard), **extra},
        **({"vector_codec": codec} if codec["dtype"] != "float32" else {}),
        **({"lance": lance_part} if lance_part is not None else {}),
        "commit": commit,
        **({"reuse": {"reused": n_reused, "encoded": table.num_rows}} if sink.get("reuse_plan") else {}),
        **({"static_homes": reuse_static.homes_of(vectors, commit, static["docs"])} if static is not None else {}),
        "committed_at": time.time(),
        "commit_seconds": round(time.time() - t0, 3),
    })
    out.write_json(shard_marker(shard), marker)  # the commit point
    out.delete(f"{TMP}/{shard}", recursive=True)
    return marker


def _stored_vectors(table: pa.Table, dtype: str, int8_max: Optional[float] = None, *,
                    rescore: bool = False) -> tuple[pa.Table, dict[str, Any]]:
    """``id``, ``vector`` (encoded as ``dtype``, the codec in the schema metadata), ``n_tokens`` (and,
    binary with ``rescore``, ``rescore``: the vectors as int8 with the scale of ``int8_max``)."""
    vec = table.column("vector").combine_chunks()
    dim = getattr(vec.type, "list_size", None)
    if dtype == "float32" or not len(vec) or not dim:
        codec = {"dtype": dtype, **({"dim": dim} if dim else {})}
        vectors = table.select(["id", "vector", "n_tokens"])
    else:
        valid = np.asarray(vec.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        values = vec.values.to_numpy(zero_copy_only=False)[vec.offset * dim:(vec.offset + len(vec)) * dim]
        x = np.nan_to_num(np.asarray(values, dtype=np.float32)).reshape(len(vec), dim)  # null rows: masked
        arr, codec = encode_vectors(x, dtype, valid, int8_max=int8_max)
        vectors = pa.table({"id": table.column("id"), "vector": arr, "n_tokens": table.column("n_tokens")})
        if dtype == "binary" and rescore:
            vectors, codec = add_rescore_column(vectors, x, valid, codec, int8_max)
    return vectors.replace_schema_metadata(with_codec(vectors.schema, codec).metadata), codec


def chunks_table(table: pa.Table) -> pa.Table:
    """``chunks/<shard>.parquet`` from a shard's rows: one row per window, in row then window order,
    with ``id``, ``chunk`` (its index in the document), ``start_char``/``end_char`` (``text[start_char:end_char]``
    is its text), ``n_tokens`` and ``vector``. Rows without text have no chunks."""
    vec = table.column(CHUNK_VECTORS).combine_chunks()
    row_of = pc.list_parent_indices(vec).to_numpy()
    counts = pc.list_value_length(vec).fill_null(0).to_numpy()
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    chunk = np.arange(len(row_of), dtype=np.int64) - first[row_of] if len(row_of) else np.zeros(0, np.int64)
    chars = np.asarray(pc.list_flatten(table.column(CHUNK_CHARS).combine_chunks()), dtype=np.int64).reshape(-1, 2)
    return pa.table({
        "id": table.column("id").take(pa.array(row_of)),
        "chunk": pa.array(chunk.astype(np.int32)),
        "start_char": pa.array(chars[:, 0].astype(np.int64)),
        "end_char": pa.array(chars[:, 1].astype(np.int64)),
        "n_tokens": pc.list_flatten(table.column(CHUNK_TOKENS).combine_chunks()),
        "vector": pc.list_flatten(vec),
    })


def _dedupe_rows(table: pa.Table) -> pa.Table:
    rows = table.column(ROW).to_numpy()
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = sorted_rows[1:] != sorted_rows[:-1]
    return table.take(pa.array(order[keep]))


def _empty_part(dim: Optional[int]) -> pa.Table:
    vec_type = pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())
    return pa.table({
        ROW: pa.array([], pa.int64()), "id": pa.array([], pa.string()),
        "vector": pa.array([], vec_type), "n_tokens": pa.array([], pa.int32()),
        TOKENS: pa.array([], pa.list_(pa.string())), EMPTY: pa.array([], pa.bool_()),
    })


def write_block(batch: pa.Table, *, out_url: str, storage_options: dict[str, Any], id_column: str) -> pa.Table:
    """Task-friendly form of :class:`BlockWriter`."""
    return BlockWriter(out_url, storage_options, id_column)(batch)


def staged_writes(ds, out: Storage, id_column: str):
    """``ds`` followed by the staged write of every encoded block (:func:`write_block`)."""
    import ray

    return ds.map_batches(
        write_block, fn_kwargs={"out_url": out.url(), "storage_options": out.storage_options,
                                "id_column": id_column},
        batch_format="pyarrow", batch_size=None, zero_copy_batch=True, compute=ray.data.TaskPoolStrategy(),
    )
