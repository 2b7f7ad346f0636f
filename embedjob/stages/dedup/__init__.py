"""The dedup stage: near-duplicate documents (and, optionally, k-means clusters) from the committed
document vectors.

What lives where:

* ``config.py`` — ``DedupConfig`` (the ``dedup:`` settings) and the plan's arithmetic (exact or
  partitioned, partitions, reduce tasks);
* ``pairs.py`` — pairs with cosine >= threshold from numpy arrays: exact blocked products, k-means
  partitions, routing rows to buckets, pairs within partitions;
* ``groups.py`` — connected groups of duplicates and the keep policies;
* ``shards.py`` — the work on one vector shard or bucket, as Ray tasks;
* ``stage.py`` — ``run_dedup``: plans, runs the tasks, writes ``dedup/`` through a staging folder;
* ``outputs.py`` — the output tables, examples for the report, the commit and the incremental state.

Only the config class is imported here, so that loading a job's config stays cheap.
"""

from embedjob.stages.dedup.config import DedupConfig

__all__ = ["DedupConfig"]
