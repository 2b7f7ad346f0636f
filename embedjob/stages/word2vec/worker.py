"""One Ray Train worker of the Word2Vec / FastText stage, :func:`train_loop_per_worker`, in phases:

1. :func:`build_model`: the same vocabulary and initial weights on every worker, started from
   ``init_from`` when given;
2. :func:`form_groups`: the workers of one machine train one model in shared memory; the syncs are
   between those groups;
3. :func:`~embedjob.stages.word2vec.segments.cut_segments`: this worker's slice of the token shards,
   cut into one segment per sync;
4. :meth:`~embedjob.stages.word2vec.sync.ModelSync.agree_rows`: the rows each sync exchanges;
5. training: :func:`train_in_one_call` when there is one model, else :class:`SyncedTraining`
   (segment by segment, a sync after each, with the learning rate of the *global* schedule);
6. :func:`finish`: rank 0 writes the vectors and the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from embedjob.debug import WORD2VEC_FAIL_RANK_ENV
from embedjob.stages.word2vec.config import Word2VecConfig
from embedjob.stages.word2vec.model import (
    apply_init,
    global_alpha,
    new_model,
    trainable_arrays,
    word_rows,
)
from embedjob.stages.word2vec.report import epoch_row, save_vectors
from embedjob.stages.word2vec.segments import Segments, cut_segments
from embedjob.stages.word2vec.shared_memory import share_model
from embedjob.stages.word2vec.sync import ModelSync
from embedjob.token_shards import read_slices

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------
@dataclass
class FrozenWords:
    """Word rows started from ``init_from`` with ``init_lock: frozen``, and their values."""

    rows: np.ndarray
    values: Optional[np.ndarray] = None

    def restore(self, model) -> None:
        """Summing identical values then dividing can round; frozen words stay bit-identical."""
        if len(self.rows):
            word_rows(model)[self.rows] = self.values


def build_model(cfg: Word2VecConfig, config: dict[str, Any], rank: int) -> tuple[Any, FrozenWords]:
    """This worker's model: the same vocabulary and initial weights as every other worker's."""
    model = new_model(cfg, config["word_freq"], config["corpus_count"], threads=cfg.threads_per_worker)
    # Same initial weights everywhere, but each worker draws its own negative samples / subsampling.
    model.random = np.random.RandomState(cfg.seed + 7919 * rank)
    frozen = FrozenWords(np.zeros(0, dtype=np.int64))
    if config.get("init_ref") is not None:
        words, vectors = ray.get(config["init_ref"])
        rows = apply_init(model, words, vectors, cfg.init_lock)
        if cfg.init_lock == "frozen":
            frozen = FrozenWords(rows, word_rows(model)[rows].copy())
        del words, vectors
    if cfg.model == "fasttext":
        # FastText recomputes every word vector from its n-grams after each train() call (a slow
        # Python loop); do it once at the end instead (finish).
        model.wv.adjust_vectors = lambda: None
    return model, frozen


@dataclass
class SyncGroups:
    """The groups of ranks that train one model each: one machine's workers sharing memory, or one
    worker with its own copy. The syncs are between the groups, each represented by its first rank
    (its "leader")."""

    groups: list[list[int]]
    rank: int
    leader_group: Any = None  # process group of the leaders, when not every rank is one

    @property
    def leaders(self) -> list[int]:
        return [g[0] for g in self.groups]

    @property
    def n_models(self) -> int:
        """Models that the syncs combine."""
        return len(self.groups)

    @property
    def leading(self) -> bool:
        return self.rank in self.leaders

    @property
    def shared(self) -> bool:
        return any(len(g) > 1 for g in self.groups)


def form_groups(model, cfg: Word2VecConfig, config: dict[str, Any], rank: int, world: int) -> SyncGroups:
    """Share the model among the workers of each machine (when ``share_memory``); every rank must
    call this (it runs collectives)."""
    if cfg.share_memory and world > 1:
        groups = share_model(model, rank=rank, world=world, run_id=config["run_id"],
                             ranks_per_machine=config.get("ranks_per_machine"))
    else:
        groups = [[r] for r in range(world)]
    sync_groups = SyncGroups(groups, rank)
    if sync_groups.shared and sync_groups.n_models > 1:
        sync_groups.leader_group = dist.new_group(sync_groups.leaders)  # every rank must call new_group
    return sync_groups


class _TimedEpoch:
    """Stands in for one of gensim's per-epoch methods and appends ``(effective words, raw words,
    seconds, running loss)`` of each epoch to ``rows`` (gensim reports only the totals of a call)."""

    def __init__(self, model, inner, rows: list[tuple[int, int, float, float]]):
        self.model, self.inner, self.rows = model, inner, rows

    def __call__(self, *args, **kwargs):
        t = time.time()
        out = self.inner(*args, **kwargs)
        self.rows.append((int(out[0]), int(out[1]), time.time() - t, float(self.model.running_training_loss)))
        return out


def train_in_one_call(model, cfg: Word2VecConfig, segs: Segments, *, rank: int, world: int,
                      track_loss: bool) -> list[dict[str, Any]]:
    """One model (a single worker, or one machine sharing it): nothing to combine, so one gensim
    train() call runs all epochs with gensim's own alpha decay. Returns the report's epoch rows."""
    per_epoch: list[tuple[int, int, float, float]] = []
    for name in ("_train_epoch", "_train_epoch_corpusfile"):
        setattr(model, name, _TimedEpoch(model, getattr(model, name), per_epoch))
    if segs.words[0]:
        model.train(**segs.corpus(0), epochs=cfg.epochs, start_alpha=cfg.alpha, end_alpha=cfg.min_alpha,
                    compute_loss=cfg.compute_loss)
    # each epoch's words and loss summed over the workers (loss: gensim's running total, made per epoch)
    table = torch.zeros((cfg.epochs, 4), dtype=torch.float64)
    for e, (t_w, r_w, sec, cum_loss) in enumerate(per_epoch):
        table[e] = torch.tensor([t_w, r_w, sec, cum_loss - (per_epoch[e - 1][3] if e else 0.0)])
    if world > 1:
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
    rows = []
    for e in range(cfg.epochs):
        rows.append(epoch_row(e + 1, table[e, 0], table[e, 1], float(table[e, 2]) / world,
                              float(table[e, 3]) if track_loss else None))
        if rank == 0:
            logger.info("word2vec epoch %d/%d: %s", e + 1, cfg.epochs, rows[-1])
    return rows


@dataclass
class EpochLog:
    """What training reports: one row per epoch, and the seconds spent in syncs."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    sync_seconds: float = 0.0  # exchanging weights
    wait_seconds: float = 0.0  # waiting for the slowest worker before each exchange


class SyncedTraining:
    """Several models: every epoch trains segment by segment, each with the learning rate of that
    stretch of the *global* schedule (alpha -> min_alpha over all epochs), and a sync after each."""

    def __init__(self, model, cfg: Word2VecConfig, segs: Segments, groups: SyncGroups, sync: ModelSync,
                 frozen: FrozenWords, *, rank: int, world: int, track_loss: bool):
        self.model, self.cfg, self.segs, self.groups, self.sync, self.frozen = model, cfg, segs, groups, sync, frozen
        self.rank, self.world, self.track_loss = rank, world, track_loss
        self.parts = len(segs.words)
        self.log = EpochLog()

    def run(self) -> EpochLog:
        for epoch in range(self.cfg.epochs):
            self._epoch(epoch)
        return self.log

    def _epoch(self, epoch: int) -> None:
        t_epoch = time.time()
        trained = raw = 0
        loss = 0.0
        for k in range(self.parts):
            if self.segs.words[k]:
                t_w, r_w, seg_loss = self._train_segment(epoch, k)
                trained += t_w
                raw += r_w
                loss += seg_loss
            self._sync_after(epoch, k)
        totals = torch.tensor([trained, raw, loss], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        self.log.rows.append(epoch_row(epoch + 1, totals[0], totals[1], time.time() - t_epoch,
                                       float(totals[2]) if self.track_loss else None))
        if self.rank == 0:
            logger.info("word2vec epoch %d/%d: %s", epoch + 1, self.cfg.epochs, self.log.rows[-1])

    def _train_segment(self, epoch: int, k: int) -> tuple[int, int, float]:
        cfg, model = self.cfg, self.model
        model.alpha = global_alpha(cfg, (epoch + k / self.parts) / cfg.epochs)
        model.min_alpha = global_alpha(cfg, (epoch + (k + 1) / self.parts) / cfg.epochs)
        t_w, r_w = model.train(**self.segs.corpus(k), epochs=1, compute_loss=cfg.compute_loss)
        return t_w, r_w, float(model.get_latest_training_loss()) if self.track_loss else 0.0

    def _sync_after(self, epoch: int, k: int) -> None:
        t_sync = time.time()
        dist.barrier()  # waiting for the slowest worker, timed apart from the exchange itself
        t_exchange = time.time()
        self.log.wait_seconds += t_exchange - t_sync
        if self.groups.leading:
            final = epoch == self.cfg.epochs - 1 and k == self.parts - 1
            self.sync.exchange(k, epoch * self.parts + k, final=final)
            self.frozen.restore(self.model)
        if self.groups.shared:
            dist.barrier()  # a shared model is written again only after its leader's exchange
        self.log.sync_seconds += time.time() - t_exchange


@dataclass
class Timings:
    start: float  # the worker started
    ready: float  # model built and segments written: training starts
    trained: float = 0.0  # training done


def finish(model, cfg: Word2VecConfig, config: dict[str, Any], *, rank: int, world: int, groups: SyncGroups,
           segs: Segments, sync: ModelSync, log: EpochLog, sparse: bool, times: Timings) -> None:
    """Sum the corpus counts over the workers; rank 0 writes the vectors and the report. Every rank
    must call this (it runs collectives)."""
    counts = torch.tensor([segs.n_docs, sum(segs.words)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    if rank == 0:
        if cfg.model == "fasttext":
            del model.wv.adjust_vectors
            model.wv.adjust_vectors()
        model.alpha, model.min_alpha, model.epochs = cfg.alpha, cfg.min_alpha, cfg.epochs
        train_seconds = times.trained - times.ready
        effective = sum(r["effective_words"] for r in log.rows)
        report = {
            "model": cfg.model,
            "workers": world,
            "threads_per_worker": cfg.threads_per_worker,
            "vocabulary": len(model.wv),
            "vector_size": cfg.vector_size,
            "documents": int(counts[0]),
            "tokens_per_epoch": int(counts[1]),
            "syncs_per_epoch": len(segs.words) if groups.n_models > 1 else 0,
            "sync_mode": cfg.sync_mode,
            "shared_memory_groups": [len(g) for g in groups.groups],
            "corpus_file": cfg.use_corpus_file,
            "init_from": cfg.init_from,
            "init_words": int(config.get("init_words", 0)),
            "epochs": log.rows,
            "effective_words": effective,
            "train_seconds": round(train_seconds, 3),
            "sync_seconds": round(log.sync_seconds, 3),
            "sync_wait_seconds": round(log.wait_seconds, 3),
            "sparse_sync": sparse,
            "synced_row_fraction": sync.moved_fraction(),
            "setup_seconds": round(times.ready - times.start, 3),
            "words_per_s": round(effective / max(train_seconds, 1e-9), 1),
        }
        save_vectors(model.wv, config["output_url"], config["output_options"], report)
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the shared model, train on this worker's slice, combine weights
    with the others every segment; rank 0 writes the vectors and the report to ``output_url``."""
    cfg = Word2VecConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    times = Timings(start=time.time(), ready=0.0)

    model, frozen = build_model(cfg, config, rank)
    track_loss = cfg.compute_loss and cfg.model != "fasttext"  # gensim keeps no training loss for FastText
    groups = form_groups(model, cfg, config, rank, world)
    n_models = groups.n_models

    # One model needs no syncs, so no segments; several are synced 1/sync_every times an epoch.
    parts = 1 if n_models == 1 else max(1, int(round(1.0 / cfg.sync_every)))
    sparse = cfg.sparse_sync == "true" or (cfg.sparse_sync == "auto" and ctx.get_local_world_size() < world)
    segs = cut_segments(model, read_slices(config["slices"][rank], config["storage_options"]), parts,
                        corpus_file=cfg.use_corpus_file, track_rows=sparse and n_models > 1, rank=rank)
    times.ready = time.time()

    ngram_pos = 1 if cfg.model == "fasttext" and model.wv.bucket else None
    sync = ModelSync(trainable_arrays(model), n_models=n_models, group=groups.leader_group,
                     keep_last=n_models > 1 and groups.leading and cfg.sync_mode == "sum",
                     ngram_pos=ngram_pos, ngram_every=cfg.ngram_sync_every)

    if config.get("fail_rank") is not None and int(config["fail_rank"]) == rank:
        raise RuntimeError(f"word2vec worker {rank}: failure injected by {WORD2VEC_FAIL_RANK_ENV}")

    sync.agree_rows(segs.rows)
    segs.rows = []  # agreed: no longer needed
    if n_models == 1:
        log = EpochLog(rows=train_in_one_call(model, cfg, segs, rank=rank, world=world, track_loss=track_loss))
    else:
        log = SyncedTraining(model, cfg, segs, groups, sync, frozen, rank=rank, world=world,
                             track_loss=track_loss).run()
    times.trained = time.time()
    segs.remove()
    finish(model, cfg, config, rank=rank, world=world, groups=groups, segs=segs, sync=sync, log=log,
           sparse=sparse, times=times)
