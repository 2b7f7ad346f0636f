"""Every path under ``<output>/``: folders, file names, staged part names and markers.

Ground floor: imports nothing of embedjob. A stage writes and reads its files by these names, so a
reader (or a newcomer) finds what goes where in one place.
"""

from __future__ import annotations

import posixpath

# per-shard outputs: one <shard>.parquet each, committed together with the shard's done marker
VECTORS = "vectors"
TOKENS_DIR = "tokens"
STATIC_DIR = "static"
PARTS_DIR = f"{STATIC_DIR}/parts"  # per-shard static word-vector partial sums
CHUNKS = "chunks"  # encode.write_chunks: one row per window (id, chunk, character span, n_tokens, vector)
PER_SHARD_DIRS = (VECTORS, TOKENS_DIR, PARTS_DIR, CHUNKS)
CARRIED_DIR = f"{STATIC_DIR}/carried"  # output.reuse: a superseded commit's static part, kept for its reused rows

# bookkeeping
TMP = "_tmp"  # staged parts of shards being written: _tmp/<shard>/<first>-<last>.arrow
DONE = "_done"  # commit markers: _done/<shard>.json, and _done/stage-<name>.json for corpus stages
STAGE_MARKER_PREFIX = "stage-"
SUPERSEDED = "_superseded"  # outputs a rerun moved aside: _superseded/<run id>/<same path>
LEASE_FILE = "_lease.json"  # the output's lease: one writer at a time
STATS_DIR = "stats"
LANCE_STATS = f"{STATS_DIR}/lance.json"  # the lance stage's stats and merge_state (the version it recorded)
TIMELINE = f"{STATS_DIR}/timeline.json"  # throughput and memory sampled by the driver during the run
MANIFEST = "manifest.json"
REPORT_HTML = "report.html"  # the run's HTML report, written at the end of every run
CONFIG = "config.json"
# Staged parts are Arrow IPC files: embedjob reads them back once, at the shard's commit, and Parquet's
# encoding of their lists (vectors, tokens, word sums) costs more CPU than its bytes save.
PART_SUFFIX = ".arrow"  # a block's rows (embedjob/stages/write.py)
STATIC_PART_SUFFIX = ".static.arrow"  # a call's static word sums (embedjob/stages/static/parts.py)
REUSE_TMP = f"{TMP}/_reuse"  # output.reuse: _tmp/_reuse/<run id>/plan/<shard>/<partition>.parquet

# corpus-wide stages
VOCAB_DIR = "vocab"
DICTIONARY_JSON = f"{VOCAB_DIR}/dictionary.json"  # what embedjob reads
DICTIONARY_GENSIM = f"{VOCAB_DIR}/dictionary.gensim"  # gensim native (a pickle): for users only
DICTIONARY_TXT = f"{VOCAB_DIR}/dictionary.txt"  # gensim save_as_text: for users
WORD2VEC_DIR = "word2vec"
TOPICS_DIR = "topics"
TOPICS_JSON = f"{TOPICS_DIR}/topics.json"  # each topic's top words and coherence
TOPICS_METRICS = f"{TOPICS_DIR}/metrics.json"  # coherence, diversity, redundancy, training
TOPICS_MODEL = f"{TOPICS_DIR}/model.pt"  # a plain dict torch.load(weights_only=True) reads
TOPIC_WORD = f"{TOPICS_DIR}/topic_word.npy"  # K x vocabulary, the model vocabulary's order
THETA_DIR = f"{TOPICS_DIR}/theta"  # theta/<shard>.parquet: id, theta
TOPICS_STAGING = f"{TOPICS_DIR}/_staging"  # theta files of a run, moved to theta/ when it succeeds
CKPT_DIR = f"{TOPICS_DIR}/checkpoints"
CKPT_LATEST = f"{CKPT_DIR}/latest.json"  # the newest checkpoint of the run that resumes
INDEX_DIR = "index"
LANCE_DIR = "lance"
LANCE_DOCS = f"{LANCE_DIR}/docs.lance"  # Lance dataset of the document vectors (output.lance)
LANCE_DATA = f"{LANCE_DOCS}/data"  # its data files: each shard's fragments, listed by the shard's marker
DEDUP_DIR = "dedup"  # dedup stage: written whole to a staging folder, then moved in place
DEDUP_PAIRS = f"{DEDUP_DIR}/pairs.parquet"  # id_a, id_b, cosine
DEDUP_GROUPS = f"{DEDUP_DIR}/groups.parquet"  # id, group, keep
DEDUP_CLUSTERS = f"{DEDUP_DIR}/clusters"  # dedup.clusters: clusters/<shard>.parquet (id, cluster, distance)
DEDUP_CENTROIDS = f"{DEDUP_DIR}/centroids.parquet"  # dedup.clusters: cluster, vector
DEDUP_EXAMPLES = f"{DEDUP_DIR}/examples.json"  # a few groups with each text's first line (the report's)
DEDUP_STATE = f"{DEDUP_DIR}/dedup.json"  # written last: build id, settings, shards covered, counts
DEDUP_STAGING = f"{TMP}/{STAGE_MARKER_PREFIX}dedup"  # _tmp/stage-dedup/<build id>/: the next dedup/


def part_name(shard: str, row_start: int, row_end: int, suffix: str = PART_SUFFIX) -> str:
    """``_tmp/<shard>/<first row>-<last row><suffix>``: a retried block rewrites the same name."""
    return f"{TMP}/{shard}/{row_start:012d}-{row_end:012d}{suffix}"


def shard_key_of(url: str) -> str:
    """The shard key of a per-shard output file: ``.../tokens/part-00003.parquet`` -> ``part-00003``."""
    name = posixpath.basename(url.rstrip("/"))
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def shard_file(folder: str, shard: str) -> str:
    """``<folder>/<shard>.parquet``: a shard's file in a per-shard folder (vectors, tokens, chunks, theta...)."""
    return f"{folder}/{shard}.parquet"


def stats_file(stage: str) -> str:
    """``stats/<stage>.json``: the stats of a stage's last run."""
    return f"{STATS_DIR}/{stage}.json"


def failed_marker(shard: str) -> str:
    """``_tmp/<shard>/_FAILED.json``: why a shard's read or encode failed (read by the driver)."""
    return f"{TMP}/{shard}/_FAILED.json"


def shard_marker(shard: str) -> str:
    """``_done/<shard>.json``: the commit point of a shard's outputs."""
    return f"{DONE}/{shard}.json"


def stage_marker(name: str) -> str:
    """``_done/stage-<name>.json``: the last success of a corpus-wide stage."""
    return f"{DONE}/{STAGE_MARKER_PREFIX}{name}.json"


def carried_part(commit: str) -> str:
    """``static/carried/<commit>.parquet``: the static part of ``commit``, once its rows live on in other shards."""
    return f"{CARRIED_DIR}/{commit}.parquet"
