"""The corpus-wide stages of a job, in order, from the committed per-shard outputs: vocabulary,
static word vectors, Word2Vec, topics, indices and dedup. Each is rerun only when its inputs (token
or vector files), its settings or the stages it reads changed since its last success
(``_done/stage-<name>.json``), and writes its results only after it succeeded. ``pipeline.py``
sequences the whole job and calls :func:`run_corpus_stages` after the per-shard stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable, Optional

from embedjob import preempt
from embedjob.config import JobConfig
from embedjob.errors import JobError, NothingToDo, root_cause
from embedjob.layout import stage_marker, stats_file
from embedjob.reconcile import read_marker
from embedjob.report.timeline import Timeline
from embedjob.stages.dedup.config import dedup_settings
from embedjob.stages.dedup.stage import run_dedup, text_source
from embedjob.stages.encode import EncoderSettings
from embedjob.stages.index.stage import run_index
from embedjob.stages.static.stage import run_static
from embedjob.stages.vocab import run_vocab
from embedjob.stages.word2vec.stage import run_word2vec
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


def recipe_hash(obj: Any) -> str:
    """A short, stable hash of ``obj`` (JSON, keys sorted): what a stage's outputs were made from."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- corpus-wide stages ------------------------------------------------------------------------
class CorpusStages:
    """Runs corpus-wide stages, each skipped when its inputs (token or vector files), its settings
    and the stages it reads are unchanged since its last success (``_done/stage-<name>.json``).

    Each stage's stats are added to ``stages`` as it ends, so a later stage's failure leaves the
    earlier ones on record."""

    def __init__(self, cfg: JobConfig, out: Storage, inputs_hash: dict[str, str], stages: dict[str, Any],
                 timeline: Optional[Timeline] = None):
        self.cfg, self.out, self.inputs_hash, self.stages = cfg, out, inputs_hash, stages
        self.timeline = timeline or Timeline()  # not started: stages are only recorded

    def run(self, name: str, settings: Any, fn: Callable[[], dict[str, Any]], deps: tuple[str, ...] = (),
            reads: str = "tokens") -> None:
        key = recipe_hash({"inputs": self.inputs_hash[reads], "settings": settings,
                     "deps": {d: self.stages[d].get("hash") for d in deps if d in self.stages}})
        preempt.check(name)  # SIGTERM: no stage starts
        prev = None if self.cfg.output.overwrite else read_marker(self.out, stage_marker(name))
        if prev and prev.get("hash") == key:
            logger.info("%s: unchanged since its last run, kept", name)
            self.stages[name] = {**prev.get("stats", {}), "status": "skipped-unchanged", "hash": key}
            return
        t = time.time()
        logger.info("%s: started", name)
        self.timeline.stage(name)
        try:
            result = fn()
        except NothingToDo as e:  # an empty corpus: the stage is skipped, not failed
            logger.info("%s: skipped: %s", name, e)
            self.stages[name] = {"status": "skipped", "reason": str(e), "seconds": round(time.time() - t, 3)}
            return
        except Exception as e:  # noqa: BLE001 - name the stage; earlier results stay as they were
            raise JobError(f"{name} stage failed: {root_cause(e)} (the outputs of its last successful run, "
                           "if any, are untouched)") from e
        result = {**result, "seconds": round(time.time() - t, 3)}
        self.out.write_json(stats_file(name), result)
        self.out.write_json(stage_marker(name), {"hash": key, "stats": result})
        self.stages[name] = {**result, "status": "done", "hash": key}
        logger.info("%s: done in %.1fs", name, time.time() - t)


def run_corpus_stages(cfg: JobConfig, out: Storage, token_urls: list[str], vector_urls: list[str],
                      committed: list[str], encoder: EncoderSettings, inputs_hash: dict[str, str],
                      stages: Optional[dict[str, Any]] = None, timeline: Optional[Timeline] = None,
                      input_urls: Optional[dict[str, Optional[str]]] = None) -> dict[str, Any]:
    """Vocabulary, static vectors, Word2Vec, topics, indices and dedup over the committed shards,
    in that order (each reads what the ones before it wrote); ``input_urls`` (shard -> input file)
    for the topics' ``label_column`` and the dedup report's texts."""
    stages = {} if stages is None else stages
    if not committed:
        logger.warning("no committed shard: corpus-wide stages skipped")
        return stages
    stage = CorpusStages(cfg, out, inputs_hash, stages, timeline).run
    stage("vocab", cfg.preprocess.model_dump(), lambda: run_vocab(out, token_urls))
    if cfg.static.enabled:
        stage("static", cfg.static.model_dump(), lambda: run_static(cfg.static, out, committed), deps=("vocab",),
              reads="vectors")
    if cfg.word2vec.enabled:
        # Settings that cannot change the vectors (restarts, Ray's folder, trusting a pickle) do not rerun the stage.
        stage("word2vec", cfg.word2vec.model_dump(exclude={"max_failures", "ray_storage_path", "init_trust_pickle"}),
              lambda: run_word2vec(cfg.word2vec, out, token_urls), deps=("vocab",))
    if cfg.topics.enabled:
        from embedjob.stages.topics.stage import run_topics

        stage("topics", cfg.topics.model_dump(exclude={"embeddings_trust_pickle"}),
              lambda: run_topics(cfg.topics, out, token_urls, input_urls=input_urls, id_column=cfg.input.id_column,
                                 input_storage_options=cfg.input.storage_options),
              deps=("vocab", "word2vec", "static"))
    if cfg.index.enabled:
        # Only the word vectors of stages on in this run: files a disabled stage left behind (or that
        # someone else put there) are not this run's to index.
        word_kinds = [kind for kind, on in (("word2vec", cfg.word2vec.enabled), ("bert", cfg.static.enabled)) if on]
        stage("index", cfg.index.model_dump(), lambda: run_index(cfg.index, out, vector_urls, encoder.normalize, word_kinds,
                                                                 chunks=cfg.encode.write_chunks),
              deps=("word2vec", "static"), reads="vectors")
    if cfg.dedup.enabled:
        stage("dedup", dedup_settings(cfg.dedup), lambda: run_dedup(cfg.dedup, out, vector_urls,
              texts=text_source(cfg.input, input_urls)), reads="vectors")
    return stages
