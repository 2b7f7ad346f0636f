"""Settings of the index stage (``index:`` in a job spec) and the pure arithmetic of its recipes:
which kind of FAISS index for how many vectors, which metric, how many clusters and sub-quantizers,
the ``faiss.index_factory`` string, and where an index's files live under the output. No FAISS here.

Kinds: ``flat`` (exact), ``hnsw`` (graph; added sequentially on the driver), ``ivf_flat`` and
``ivf_pq`` (coarse quantizer — and product quantizer — trained on a sample drawn from every
shard, then each shard is added in its own Ray task with its global positions as ids, and the
parts are merged with ``merge_from``: global ids stay right whatever the shard order).
``auto`` picks flat, hnsw or ivf_pq by corpus size. The metric is inner product when the
encoder normalised the vectors (cosine), else L2.

Example::

    cfg = IndexConfig(kind="auto")
    choose_kind(cfg, 1_000_000)            # 'hnsw'
    factory_string("hnsw", 384, 1_000_000, cfg)  # 'HNSW32,Flat'
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field

from embedjob._config_base import Section
from embedjob.layout import INDEX_DIR

DOCS = "docs"
CHUNK_INDEX = "chunks"  # encode.write_chunks: one vector per window; labels id, chunk, start_char, end_char
INDEX_RECIPE = "faiss_index_v1"
KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")


class IndexConfig(Section):
    enabled: bool = Field(True, description="Build FAISS indices over the document vectors (and word vectors).")
    kind: Literal["auto", "flat", "hnsw", "ivf_pq", "ivf_flat"] = Field(
        "auto",
        description="Index kind: 'flat' (exact), 'hnsw' (graph, best recall per query time, vectors kept in "
        "memory), 'ivf_flat' (clustered, exact vectors), 'ivf_pq' (clustered and compressed: the smallest). "
        "'auto' = flat up to auto_flat_max vectors, hnsw up to auto_hnsw_max, ivf_pq above.",
    )
    metric: Literal["auto", "ip", "l2"] = Field(
        "auto",
        description="'ip' (inner product; cosine on normalised vectors) or 'l2' (squared Euclidean distance). "
        "'auto' = ip when the encoder normalised the vectors (encode.normalize), else l2. Word indices are "
        "always cosine.",
    )
    auto_flat_max: int = Field(
        20_000, ge=0, description="kind=auto: an exact flat index up to this many vectors."
    )
    auto_hnsw_max: int = Field(
        5_000_000, ge=0,
        description="kind=auto: hnsw up to this many vectors, ivf_pq above (hnsw keeps every vector plus "
        "its graph in memory: about (4*dim + 8*hnsw_m) bytes each).",
    )
    hnsw_m: int = Field(32, ge=4, le=256, description="hnsw: graph neighbours per node (memory and recall grow with it).")
    hnsw_ef_construction: int = Field(
        80, ge=8, description="hnsw: candidate list size while building (build time and graph quality)."
    )
    hnsw_ef_search: int = Field(
        64, ge=1, description="hnsw: candidate list size per query, stored in the index (recall vs speed)."
    )
    ivf_nlist: Optional[int] = Field(
        None, ge=1,
        description="ivf_*: number of clusters; null = 4*sqrt(n) rounded to a power of two (at most "
        "train_sample/39, at least 1).",
    )
    ivf_nprobe: int = Field(
        32, ge=1, description="ivf_*: clusters visited per query, stored in the index (recall vs speed)."
    )
    pq_m: Optional[int] = Field(
        None, ge=1,
        description="ivf_pq: sub-quantizers (bytes per vector at pq_bits=8); must divide the dimension. "
        "null = the largest divisor of dim that is at most dim/8 (48 for 384-d; training cost grows with it).",
    )
    pq_bits: int = Field(8, ge=4, le=12, description="ivf_pq: bits per sub-quantizer code.")
    refine_k_factor: float = Field(
        0.0, ge=0,
        description="ivf_pq: re-rank k*refine_k_factor PQ candidates with exact distances on the full vectors "
        "(IndexRefineFlat; raises recall, stores the vectors too). 0 = no re-ranking.",
    )
    train_sample: int = Field(
        100_000, ge=256,
        description="ivf_*: vectors sampled uniformly across shards (proportionally to their rows) to train on.",
    )
    rescore_factor: int = Field(
        16, ge=1,
        description="output.vector_dtype binary: `embedjob search` takes the k * rescore_factor nearest by "
        "Hamming distance and ranks them by inner product with the stored int8 vectors (output.binary_rescore); "
        "1 = Hamming ranking only. 16 gave recall@10 0.979 against float32 exact search on 1,000 documents of "
        "mixed-en (all-MiniLM-L6-v2; 0.508 at 1, 0.934 at 8); `embedjob bench vectors` measures recall and query "
        "time per factor.",
    )
    words: bool = Field(True, description="Also index the word vectors (Word2Vec, BERT static) of the stages enabled "
                        "in the run.")
    use_gpu: Optional[bool] = Field(
        None,
        description="Train the ivf_* coarse quantizer (k-means) on a GPU with GPU FAISS; null = when GPU FAISS is "
        "installed and sees a GPU on the driver. hnsw and adding are on CPU.",
    )
    seed: int = Field(0, description="Seed of the training sample and k-means (same seed, same index).")


def resolve_metric(cfg: IndexConfig, normalized: bool) -> str:
    """``ip`` or ``l2`` as configured, ``auto`` following the encoder's ``normalize``."""
    if cfg.metric != "auto":
        return cfg.metric
    return "ip" if normalized else "l2"



def choose_kind(cfg: IndexConfig, n: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.auto_flat_max:
        return "flat"
    if n <= cfg.auto_hnsw_max:
        return "hnsw"
    return "ivf_pq"



def default_nlist(cfg: IndexConfig, n: int) -> int:
    """Clusters for ``n`` vectors: ``ivf_nlist`` or 4*sqrt(n) as a power of two, capped so every
    cluster gets at least 39 training points (FAISS's own advice)."""
    train_n = min(n, cfg.train_sample)
    if cfg.ivf_nlist is not None:
        nlist = cfg.ivf_nlist
    else:
        nlist = 2 ** int(round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return int(max(1, min(nlist, train_n // 39 if train_n >= 39 else 1, n)))



def default_pq_m(cfg: IndexConfig, dim: int) -> int:
    if cfg.pq_m is not None:
        if dim % cfg.pq_m:
            raise ValueError(f"index.pq_m={cfg.pq_m} does not divide the vector dimension {dim}")
        return cfg.pq_m
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)



def factory_string(kind: str, dim: int, n: int, cfg: IndexConfig) -> str:
    """The ``faiss.index_factory`` description of an index of ``kind`` for ``n`` vectors."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    nlist = default_nlist(cfg, n)
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf_pq":
        return f"IVF{nlist},PQ{default_pq_m(cfg, dim)}x{cfg.pq_bits}"
    raise ValueError(f"index.kind={kind!r}; valid: auto, {', '.join(KINDS)}")



def min_train_points(kind: str, dim: int, n: int, cfg: IndexConfig) -> int:
    """Fewest training vectors a kind needs (k-means needs at least one point per centroid)."""
    if kind == "ivf_flat":
        return default_nlist(cfg, n)
    if kind == "ivf_pq":
        return max(default_nlist(cfg, n), 2 ** cfg.pq_bits)
    return 0


def index_files(name: str) -> dict[str, str]:
    """Relative paths of an index's files under the output root."""
    return {"index": f"{INDEX_DIR}/{name}.faiss", "ids": f"{INDEX_DIR}/{name}_ids.parquet",
            "meta": f"{INDEX_DIR}/{name}.json", "rescore": f"{INDEX_DIR}/{name}_rescore.npy"}
