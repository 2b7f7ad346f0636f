"""The Word2Vec / FastText stage, driver side: :func:`train_word2vec` runs the Ray Train job that
trains gensim data-parallel, :func:`run_word2vec` is the pipeline stage.

gensim trains on one machine only (piskvorky/gensim#3399). Here every Ray Train worker trains an
ordinary gensim model on its slice of the corpus. Workers on the same machine train *one* model in
shared memory, lock-free, exactly as gensim's own threads do (``share_memory``); the models of
different machines (or of every worker, with ``share_memory: false``) are combined with
``torch.distributed.all_reduce`` over gloo several times an epoch, as Spark MLlib does:

1. the driver counts words over all token shards (:func:`embedjob.stages.vocab.build_vocabulary`, Ray
   tasks) and every worker builds the *same* vocabulary from those counts with gensim's own rules
   (``min_count``, ``max_final_vocab``, ``sample``) and the *same* initial weights (same seed);
   the first worker of each machine then puts the trainable matrices in files on ``/dev/shm``
   that the machine's other workers map (:mod:`~embedjob.stages.word2vec.shared_memory`);
2. each worker takes a ``1/N`` row slice of every token shard (so every worker sees the same mix
   of the corpus and the same amount of work), writes it to local ``LineSentence`` files (gensim's
   fast ``corpus_file`` mode) cut into ``1/sync_every`` segments of equal words;
3. for every epoch and segment, each worker runs ``model.train(..., epochs=1)`` with the learning
   rate of that stretch of the *global* schedule (alpha -> min_alpha over all epochs); then, when
   there are several models, the first worker of each machine combines them with ``all_reduce``:
   ``wv.vectors`` and ``syn1neg``/``syn1`` (Word2Vec); ``wv.vectors_vocab``,
   ``wv.vectors_ngrams`` and ``syn1neg``/``syn1`` (FastText), see :mod:`~embedjob.stages.word2vec.sync`;
4. rank 0 writes the KeyedVectors (:func:`embedjob.wordvectors.write_keyed_vectors`) and ``report.json``.

Outputs under ``<out>/word2vec/``: ``vectors.bin`` (``KeyedVectors.load_word2vec_format(path,
binary=True)``) with the counts in ``vectors.vocab.txt``, FastText's matrices in
``vectors_ngrams.npy``, ``vectors_vocab.npy`` + ``fasttext.json``, ``vectors.kv`` (gensim native, a
pickle: for users, never read by embedjob) and ``report.json``::

    kv, report = train_word2vec(token_urls, Word2VecConfig(workers=2), {})
    kv.most_similar("king")
    load_job_vectors("output/local", {}, "word2vec").most_similar("king")
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from typing import Any, Optional

from embedjob import raytrain
from embedjob.debug import word2vec_switches
from embedjob.errors import ConfigError, NothingToDo, Word2VecTrainingError
from embedjob.stages.vocab import build_vocabulary
from embedjob.stages.word2vec.config import Word2VecConfig
from embedjob.stages.word2vec.model import load_init, word_frequencies
from embedjob.stages.word2vec.report import REPORT_NAME
from embedjob.storage import Storage
from embedjob.token_shards import plan_slices
from embedjob.wordvectors import KV_NAME, read_vector_folder

logger = logging.getLogger(__name__)


def train_word2vec(
    token_urls: list[str],
    cfg: Word2VecConfig,
    storage_options: Optional[dict[str, Any]] = None,
    *,
    output_url: Optional[str] = None,
    output_options: Optional[dict[str, Any]] = None,
    dictionary=None,
):
    """Train on the ``tokens`` column of ``token_urls`` with ``cfg.workers`` Ray Train workers.

    Returns ``(KeyedVectors, report)``. The vectors and report are written to ``output_url``
    (``vectors.bin`` and its companions, ``vectors.kv``, ``report.json``) — by default a local
    temporary folder — and the vectors are read back from the safe files (never ``vectors.kv``).
    The caller starts Ray first (the pipeline does)::

        ray.init()
        kv, report = train_word2vec(token_urls, Word2VecConfig(workers=2), {})
    """
    import ray  # heavy: the driver of the Ray Train job only

    storage_options = storage_options or {}
    output_options = storage_options if output_options is None else output_options
    if not token_urls:
        raise ValueError("train_word2vec: no token shards given")
    if not ray.is_initialized():
        raise RuntimeError("train_word2vec: Ray is not running; call ray.init() first (the pipeline does)")
    _check_cpus(cfg, float(ray.cluster_resources().get("CPU", 0)))
    t0 = time.time()
    loop_config = _loop_config(token_urls, cfg, storage_options, dictionary)
    vocab_seconds = time.time() - t0
    tmp_out = None
    try:
        if output_url is None:
            tmp_out = tempfile.mkdtemp(prefix="embedjob-w2v-out-")
            output_url, output_options = tmp_out, {}
        report = _fit(cfg, {**loop_config, "output_url": output_url, "output_options": output_options})
        report["vocab_seconds"] = round(vocab_seconds, 3)
        report["total_seconds"] = round(time.time() - t0, 3)
        folder = Storage(output_url, output_options)
        folder.write_json(REPORT_NAME, report)
        return read_vector_folder(folder), report
    finally:
        if tmp_out:
            shutil.rmtree(tmp_out, ignore_errors=True)


def _check_cpus(cfg: Word2VecConfig, have: float) -> None:
    need = cfg.workers * cfg.threads_per_worker
    if need > have:
        raise ConfigError(
            f"word2vec.workers={cfg.workers} x word2vec.threads_per_worker={cfg.threads_per_worker} "
            f"needs {need} CPUs but the Ray cluster has {have:g}; lower them or add nodes"
        )


def _loop_config(token_urls: list[str], cfg: Word2VecConfig, storage_options: dict[str, Any],
                 dictionary) -> dict[str, Any]:
    """What every worker needs: the corpus-wide word counts (from ``dictionary``, else counted now),
    the ``init_from`` vectors (in Ray's object store) and each worker's slice of the token shards."""
    import ray  # heavy: the driver of the Ray Train job only

    if dictionary is None:
        dictionary = build_vocabulary(token_urls, storage_options)
    if dictionary.num_pos == 0:
        raise NothingToDo(f"nothing to train on: the {len(token_urls)} token shard(s) hold no token "
                          "(every text empty or null, or every word dropped by preprocessing)")
    word_freq = word_frequencies(dictionary, cfg.min_count)
    if not word_freq:
        raise ValueError(
            f"no word occurs at least word2vec.min_count={cfg.min_count} times in {len(token_urls)} "
            "token shards; lower word2vec.min_count or give more text"
        )
    init_ref, init_words = None, 0
    if cfg.init_from:
        words, vectors = load_init(cfg, storage_options, word_freq)
        init_ref, init_words = ray.put((words, vectors)), len(words)
    return {
        "cfg": cfg.model_dump(),
        "word_freq": word_freq,
        "corpus_count": int(dictionary.num_docs),
        "slices": plan_slices(token_urls, storage_options, cfg.workers),
        "storage_options": storage_options,
        "run_id": uuid.uuid4().hex[:12],
        "init_ref": init_ref,
        "init_words": init_words,
    }


def _fit(cfg: Word2VecConfig, loop_config: dict[str, Any]) -> dict[str, Any]:
    """Run the Ray Train job; returns rank 0's report (read back from the output folder)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # late: worker imports torch and ray at its top
    from embedjob.stages.word2vec.worker import (
        train_loop_per_worker,
    )

    storage_path = cfg.ray_storage_path
    tmp_storage = None
    if storage_path is None:
        tmp_storage = storage_path = tempfile.mkdtemp(prefix="embedjob-raytrain-")
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={**loop_config, **word2vec_switches()},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=False,
                                         resources_per_worker={"CPU": cfg.threads_per_worker}),
            run_config=RunConfig(name=f"embedjob-word2vec-{uuid.uuid4().hex[:8]}", storage_path=storage_path,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )
        t = time.time()
        error = raytrain.fit(trainer)
        if error is not None:
            raise Word2VecTrainingError(
                f"word2vec: Ray Train training failed ({cfg.workers} workers, word2vec.max_failures="
                f"{cfg.max_failures} restarts allowed): {raytrain.root_message(error)}") from error
        logger.info("word2vec: Ray Train finished in %.1fs", time.time() - t)
        report = Storage(loop_config["output_url"], loop_config["output_options"]).read_json(REPORT_NAME)
        report["ray_train_seconds"] = round(time.time() - t, 3)
        return report
    finally:
        if tmp_storage:
            shutil.rmtree(tmp_storage, ignore_errors=True)


def run_word2vec(wcfg: Word2VecConfig, out: Storage, token_urls: list[str]) -> dict[str, Any]:
    """Pipeline stage: train on the job's token shards and write ``<out>/word2vec/``; returns stats."""
    _, report = train_word2vec(
        token_urls, wcfg, out.storage_options,
        output_url=out.url("word2vec"), output_options=out.storage_options,
    )
    return {
        "model": report["model"],
        "workers": report["workers"],
        "vocabulary": report["vocabulary"],
        "vector_size": report["vector_size"],
        "documents": report["documents"],
        "tokens_per_epoch": report["tokens_per_epoch"],
        "epochs": len(report["epochs"]),
        "words_per_s": report["words_per_s"],
        "loss": [e["loss"] for e in report["epochs"]],
        "train_seconds": report["train_seconds"],
        "sync_seconds": report["sync_seconds"],
        "sync_wait_seconds": report["sync_wait_seconds"],
        "synced_row_fraction": report["synced_row_fraction"],
        "shared_memory_groups": report["shared_memory_groups"],
        "init_words": report["init_words"],
        "vectors": out.url(f"word2vec/{KV_NAME}"),
    }
