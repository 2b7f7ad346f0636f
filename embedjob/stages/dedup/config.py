"""Settings of the dedup stage (``dedup:`` in a job spec) and the pure arithmetic of its plan:
exact or partitioned, how many partitions, how many reduce tasks. No numpy, FAISS or Ray here.

Example::

    cfg = DedupConfig(enabled=True, threshold=0.9)
    choose_mode(cfg, 10_000)        # 'exact'
    choose_mode(cfg, 1_000_000)     # 'partitioned'
    partitions_for(cfg, 1_000_000)  # 1000: about partition_size documents a partition
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field

from embedjob._config_base import Section
from embedjob.errors import ConfigError

DEDUP_RECIPE = "dedup_v1"  # what the pairs depend on besides the vectors and the threshold
KEEP_POLICIES = ("first", "longest", "central")


class DedupConfig(Section):
    enabled: bool = Field(
        False,
        description="Find near-duplicate documents from the document vectors: dedup/pairs.parquet (id_a, id_b, "
        "cosine; every pair with cosine >= threshold, once, id_a < id_b) and dedup/groups.parquet (id, group, "
        "keep: connected groups of duplicates, one document kept per group).",
    )
    threshold: float = Field(
        0.9, gt=0, le=1,
        description="Cosine similarity at or above which two documents are duplicates, in (0, 1].",
    )
    keep: Literal["first", "longest", "central"] = Field(
        "first",
        description="Which document of a group is kept: 'first' (smallest id), 'longest' (most tokens, ties: "
        "smallest id) or 'central' (nearest its group's mean direction, ties: smallest id).",
    )
    mode: Literal["auto", "exact", "partitioned"] = Field(
        "auto",
        description="'exact' compares every pair (blocked matrix products, memory bounded by block_rows); "
        "'partitioned' compares each document only with those of its nearest partitions (FAISS k-means; "
        "SemDeDup-style, measured by `embedjob bench dedup`); 'auto' = exact up to exact_max documents.",
    )
    exact_max: int = Field(
        50_000, ge=0,
        description="mode=auto: exact search up to this many documents (n^2/2 dot products: about 15 s on 2 "
        "cores at 50k x 384 dims), partitioned above.",
    )
    partition_size: int = Field(
        1000, ge=50,
        description="partitioned: documents per partition on average (partitions = documents / partition_size); "
        "the work is about probes x documents x partition_size dot products.",
    )
    partitions: Optional[int] = Field(
        None, ge=1, description="partitioned: number of partitions; null = documents / partition_size."
    )
    probes: int = Field(
        3, ge=1, le=64,
        description="partitioned: each document is compared with the documents of its `probes` nearest "
        "partitions (recall rises, time grows about linearly with it).",
    )
    train_sample: int = Field(
        50_000, ge=1000,
        description="Vectors sampled uniformly across shards to train the k-means (partitions and clusters).",
    )
    kmeans_iterations: int = Field(20, ge=1, description="k-means iterations (partitions and clusters).")
    task_memory_mb: int = Field(
        512, ge=64,
        description="partitioned: vector bytes one reduce task holds at most (its partitions' rows, each row "
        "once per probe); sets the number of reduce tasks (at least 2 per CPU).",
    )
    block_rows: int = Field(
        2048, ge=64,
        description="Rows of one block of the similarity matrix (block_rows x 4 x block_rows float32: the "
        "largest array a comparison holds, 64 MiB at 2048).",
    )
    clusters: Optional[int] = Field(
        None, ge=2,
        description="Also cluster the documents with k-means into this many clusters: dedup/clusters/<shard>.parquet "
        "(id, cluster, distance = 1 - cosine to the centroid; rows as in vectors/<shard>.parquet) and "
        "dedup/centroids.parquet; the report's document map is coloured by cluster. null = no clusters.",
    )
    report_thresholds: list[float] = Field(
        default_factory=lambda: [0.9, 0.95, 0.98, 0.99, 1.0],
        description="Thresholds (those >= threshold) at which the report counts the documents dropped.",
    )
    examples: int = Field(5, ge=0, le=50, description="Duplicate groups shown in the report (largest first).")
    seed: int = Field(0, description="Seed of the training sample and the k-means.")


def choose_mode(cfg: DedupConfig, n: int) -> str:
    """``exact`` or ``partitioned`` for ``n`` documents as configured."""
    if cfg.mode != "auto":
        return cfg.mode
    return "exact" if n <= cfg.exact_max else "partitioned"


def partitions_for(cfg: DedupConfig, n: int) -> int:
    """Partitions for ``n`` documents: ``partitions`` or n / partition_size, at least 1 and at most
    one per 39 training vectors (FAISS's k-means advice)."""
    k = cfg.partitions or max(1, round(n / cfg.partition_size))
    return int(max(1, min(k, n, max(1, min(n, cfg.train_sample) // 39))))


def reduce_tasks_for(cfg: DedupConfig, n: int, dim: int, partitions: int, cpus: int) -> int:
    """Reduce tasks: enough that one holds at most ``task_memory_mb`` of rows (each row comes
    ``probes`` times), at least two per CPU for balance, at most one per partition."""
    need = math.ceil(cfg.probes * n * dim * 4 / (cfg.task_memory_mb * 2**20))
    return int(max(1, min(partitions, max(need, 2 * max(1, cpus)))))


def dedup_settings(cfg: DedupConfig) -> dict:
    """What the stage's outputs depend on (its rerun key); ``examples`` and ``report_thresholds``
    included: they are written by the stage."""
    return {"recipe": DEDUP_RECIPE, **cfg.model_dump()}


def pair_settings(cfg: DedupConfig) -> dict:
    """What the pairs depend on (besides the vectors): a rerun with the same keeps its earlier
    pairs and computes only those of new documents."""
    return {"recipe": DEDUP_RECIPE, "threshold": cfg.threshold}


def check_dedup(cfg: DedupConfig, vector_dtype: str, input_rows: Optional[int]) -> None:
    """Settings that cannot work, before any work: dedup on vectors without a cosine (binary), or
    more clusters than the input has rows (``input_rows``; None: not known, e.g. old shards kept)."""
    if not cfg.enabled:
        return
    if vector_dtype == "binary":
        raise ConfigError("dedup.enabled needs document vectors with a cosine, but output.vector_dtype=binary keeps "
                          "only their signs: use float32, float16 or int8, or set dedup.enabled: false")
    if cfg.clusters is not None and input_rows is not None and cfg.clusters > input_rows:
        raise ConfigError(f"dedup.clusters={cfg.clusters} is more than the {input_rows} documents of the input")
