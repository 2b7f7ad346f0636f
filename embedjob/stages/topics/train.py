"""Training with Ray Train: the per-worker DDP loop (``train_loop_per_worker``), its epochs of BoW
batches and checkpoints under ``topics/checkpoints/``, and the driver side (``train_topic_model``:
resume, worker layout, ``TorchTrainer``)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import tempfile
import time
import uuid
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from embedjob import raytrain
from embedjob.errors import TopicsError
from embedjob.layout import CKPT_DIR, CKPT_LATEST
from embedjob.stages.topics.bow import bow_dataset, submit_bow
from embedjob.stages.topics.config import TopicsConfig, model_kwargs
from embedjob.stages.topics.model import (
    FORMAT,
    TopicModel,
    batch_tensors,
    init_model,
    model_from_bytes,
)
from embedjob.storage import Storage
from embedjob.token_shards import plan_slices

logger = logging.getLogger(__name__)


def _fingerprint(cfg: TopicsConfig, vocab: list[str], rho: Optional[np.ndarray]) -> str:
    """What a checkpoint must match to be resumed: settings that change the model, the vocabulary
    and the pre-fitted rho (by content, so a moved output folder still resumes)."""
    keep = cfg.model_dump(exclude={"enabled", "epochs", "resume", "checkpoint_every", "keep_checkpoints",
                                   "workers", "threads_per_worker", "use_gpu", "top_n", "diversity_top_n",
                                   "topics_json_top_n", "coherence", "coherence_docs", "coherence_processes",
                                   "cache_bow", "ranking_lambda", "embeddings_trust_pickle", "min_steps", "min_documents_seen",
                                   "label_column"})
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    h.update("\n".join(vocab).encode())
    if rho is not None:
        h.update(np.ascontiguousarray(rho).tobytes())
    return h.hexdigest()[:16]


def latest_checkpoint(store, fingerprint: str) -> Optional[dict[str, Any]]:
    """``{"path", "epoch"}`` of the newest checkpoint with this fingerprint, else None."""
    if not store.exists(CKPT_LATEST):
        return None
    try:
        info = store.read_json(CKPT_LATEST)
    except (OSError, ValueError):
        return None
    if info.get("fingerprint") != fingerprint or not store.exists(info.get("path", "")):
        logger.info("topics: checkpoint %s was made with other settings or vocabulary; starting over",
                    info.get("path"))
        return None
    return info


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train loop of one worker: DDP over its split of the BoW dataset."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        logger.info("topics: worker started %.1fs after fit()", time.time() - config["fit_started"])
    store = Storage(config["root"], config["storage_options"])
    rho = ray.get(config["rho_ref"]) if config["rho_ref"] is not None else None
    model = init_model(config["model_kwargs"], rho, config["missing"], config["seed"], config.get("word_counts"))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], fused=True)
    start, history = _restore(store, config["resume_path"], model, opt)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] * 1000 + rank + 7919 * start)
    shard = None if config.get("bow_slices") is not None else ray.train.get_dataset_shard("train")
    epochs, anneal = config["epochs"], config["kl_anneal_epochs"]
    cache: dict[str, Any] = {}
    for epoch in range(start, epochs):
        t0 = time.time()
        kl_w = min(1.0, (epoch + 1) / anneal) if anneal else 1.0
        batches = _epoch_batches(shard, config, config["seed"] + epoch * 131 + rank, cache)
        sums = _train_epoch(model, opt, batches, kl_w, config["clip_grad"], device)
        docs = max(float(sums[2]), 1.0)
        metrics = {"epoch": epoch + 1, "nll": float(sums[0]) / docs, "kl": float(sums[1]) / docs,
                   "docs": int(sums[2]), "seconds": round(time.time() - t0, 3)}
        history.append(metrics)
        # logged, checkpointed and reported at checkpoint epochs only: a small corpus's hundreds of
        # short epochs (min_steps) would otherwise spend more time in Ray Train's reports than in training
        if epoch + 1 == epochs or (epoch + 1) % config["checkpoint_every"] == 0:
            if rank == 0:
                logger.info("topics: epoch %d/%d nll %.2f kl %.2f (%d docs, %.1fs)", epoch + 1, epochs,
                            metrics["nll"], metrics["kl"], metrics["docs"], metrics["seconds"])
                _save_checkpoint(store, core, opt, epoch + 1, config, history)
            ray.train.report(metrics)


def _restore(store: Storage, path: Optional[str], model: TopicModel, opt) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint at ``path`` (if any) into ``model`` and ``opt``; returns ``(epochs done, history)``."""
    if not path:
        return 0, []
    blob = torch.load(io.BytesIO(store.read_bytes(path)), map_location="cpu", weights_only=True)
    model.load_state_dict(blob["state_dict"])
    opt.load_state_dict(blob["optimizer"])
    return int(blob["epoch"]), list(blob.get("history", []))


def _train_epoch(model, opt, batches, kl_w: float, clip_grad: Optional[float], device) -> torch.Tensor:
    """One epoch of optimisation steps; returns the global ``(nll sum, kl sum, documents)``."""
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        ids, offsets, weights, counts, doc_index = batch_tensors(batch.column("word_ids"), batch.column("counts"),
                                                                 device)
        nll, kl = model(ids, offsets, weights, counts, doc_index)
        loss = (nll + kl_w * kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
        sums += torch.tensor([float(nll.sum()), float(kl.sum()), float(len(nll))], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)  # gloo/NCCL: global epoch loss for the log
    return sums


def _epoch_batches(shard, config: dict[str, Any], seed: int, cache: dict[str, Any]):
    """One epoch of shuffled ``batch_size`` BoW batches (pyarrow tables) of this worker's split; the
    last partial batch is dropped (every worker's split has the same rows, so every DDP worker takes
    the same number of steps). With ``cache_bow`` the split (this worker's slice of every shard,
    ``bow_slices``) is fetched once and reshuffled in memory every epoch; otherwise it is streamed
    from the Ray Train dataset shard with a local shuffle buffer."""
    import ray

    bs = config["batch_size"]
    if shard is not None:
        yield from shard.iter_batches(batch_size=bs, batch_format="pyarrow", drop_last=True,
                                      local_shuffle_buffer_size=config["shuffle_buffer"], local_shuffle_seed=seed)
        return
    if "table" not in cache:
        t0 = time.time()
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        counts = np.array(ray.get(config["bow_counts"]), dtype=np.int64).reshape(-1, world)  # waits for the tasks
        keep = int(counts.sum(axis=0).min())  # every DDP worker must take the same number of steps
        if keep == 0:
            raise TopicsError(f"topics: {int(counts.sum())} documents have a word of the filtered vocabulary, too few "
                              f"for {world} workers; check topics.no_below/no_above or lower topics.workers")
        mine = ray.get([s[rank] for s in config["bow_slices"]])
        cache["table"] = pa.concat_tables(mine).slice(0, keep).combine_chunks()
        del mine
        logger.info("topics: %d BoW rows in memory %.1fs after the first epoch began", cache["table"].num_rows,
                    time.time() - t0)
    table = cache["table"]
    bs = min(bs, table.num_rows)  # a tiny corpus: one batch of all rows (the same on every worker)
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    for s in range(0, table.num_rows - bs + 1, bs):
        yield table.take(pa.array(perm[s:s + bs]))


def _save_checkpoint(store, model, opt, epoch: int, config: dict[str, Any], history: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "epoch": epoch, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "model_kwargs": config["model_kwargs"],
                "fingerprint": config["fingerprint"], "history": history}, buf)
    fp = config["fingerprint"]
    path = f"{CKPT_DIR}/epoch-{epoch:05d}-{fp}.pt"
    store.write_bytes(path, buf.getvalue())
    store.write_json(CKPT_LATEST, {"path": path, "epoch": epoch, "fingerprint": fp})
    # keep this run's newest checkpoints; those of other settings are replaced once this run has one
    # (and those of a longer earlier run with these settings: resume=false, fewer epochs)
    names = [n for n in store.list(CKPT_DIR, suffix=".pt") if n.startswith("epoch-")]
    mine = sorted(n for n in names if n.endswith(f"-{fp}.pt") and n <= posixpath.basename(path))
    stale = [n for n in names if n not in mine]
    for name in mine[:-config["keep_checkpoints"]] + stale:
        store.delete(f"{CKPT_DIR}/{name}")


def stats_from(resume: Optional[dict[str, Any]]) -> int:
    return int(resume["epoch"]) if resume else 0


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))


def training_layout(cfg: TopicsConfig, docs: Optional[int] = None) -> tuple[int, bool, int]:
    """``(workers, on GPUs, torch threads per worker)`` for this Ray cluster and ``cfg``; with
    ``docs``, at most one worker per 2 documents (at least one)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    need = cfg.workers or 1
    if cfg.use_gpu == "yes" and gpus < need:
        raise TopicsError(f"topics.use_gpu='yes' with topics.workers={cfg.workers}, but the Ray cluster has {gpus} GPUs")
    gpu = cfg.use_gpu != "no" and gpus >= need
    if cfg.workers:
        workers = cfg.workers
    elif gpu:
        workers = gpus
    else:
        workers = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1))
    if docs is not None:
        workers = min(workers, docs // 2) or 1
    return workers, gpu, cfg.threads_per_worker or max(1, _cluster_cpus() // workers)


def train_topic_model(cfg: TopicsConfig, out, token_urls: list[str], vocab: list[str], rho: Optional[np.ndarray],
                      missing: np.ndarray, word_counts: Optional[np.ndarray] = None) -> tuple[Any, dict[str, Any]]:
    """Train with ``TorchTrainer`` (or resume); returns the trained model (CPU) and stats."""
    import ray

    t0 = time.time()
    fp = _fingerprint(cfg, vocab, rho)
    resume = latest_checkpoint(out, fp) if cfg.resume else None
    ds, docs = _training_data(cfg, out, token_urls, vocab)
    workers, gpu, threads = training_layout(cfg, docs)
    batch_size, epochs = training_length(cfg, docs // workers)
    done = bool(resume and resume["epoch"] >= epochs)
    if epochs > cfg.epochs:
        logger.info("topics: %d epochs of %d-document batches (topics.min_steps=%d, min_documents_seen=%d: %d "
                    "epochs would be %d steps)", epochs, batch_size, cfg.min_steps, cfg.min_documents_seen, cfg.epochs,
                    cfg.epochs * max(1, docs // workers // batch_size))
    counts = slices = None
    if cfg.cache_bow and not done:
        # BoW tasks run while Ray Train starts its workers; each worker then takes its slice of every shard
        counts, slices = submit_bow(token_urls, vocab, out.storage_options, workers, _cluster_cpus())
    embedding_dim = rho.shape[1] if rho is not None else cfg.embedding_dim
    kwargs = model_kwargs(cfg, len(vocab), embedding_dim, int(missing.sum()))
    if done:
        logger.info("topics: checkpoint %s already has %d epochs", resume["path"], resume["epoch"])
    elif resume:
        logger.info("topics: resuming from %s (epoch %d)", resume["path"], resume["epoch"])
    config = {
        "root": out.url(), "storage_options": out.storage_options, "model_kwargs": kwargs,
        "rho_ref": ray.put(rho) if rho is not None else None, "missing": missing, "seed": cfg.seed,
        "word_counts": word_counts,
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "epochs": epochs, "batch_size": batch_size,
        "kl_anneal_epochs": cfg.kl_anneal_epochs, "clip_grad": cfg.clip_grad, "threads": threads,
        # as many checkpoints as the configured epochs would have written, however many epochs min_steps adds
        "checkpoint_every": cfg.checkpoint_every * max(1, epochs // cfg.epochs), "keep_checkpoints": cfg.keep_checkpoints, "fingerprint": fp,
        "resume_path": resume["path"] if resume else None, "shuffle_buffer": max(batch_size * 4, 1024),
    }
    if counts is not None:
        config["bow_counts"], config["bow_slices"] = counts, slices
    t1 = config["fit_started"] = time.time()
    if not done:
        _fit(config, ds, workers=workers, gpu=gpu, placement="PACK" if cfg.workers else "SPREAD")
    train_seconds = time.time() - t0
    if counts is not None:
        docs = int(sum(sum(c) for c in ray.get(counts)))
    model, history = _load_final(out, fp, epochs)
    final_metrics = history[-1] if history else {}
    stats = {"documents": docs, "workers": workers, "threads_per_worker": threads, "device": "cuda" if gpu else "cpu",
             "batch_size": batch_size, "epochs": epochs, "steps": epochs * max(1, docs // workers // batch_size), "resumed_from_epoch": resume["epoch"] if resume else 0,
             "final_nll": final_metrics.get("nll"), "final_kl": final_metrics.get("kl"),
             "bow_seconds": round(t1 - t0, 3), "train_seconds": round(train_seconds, 3),
             "epoch_seconds": round(sum(h["seconds"] for h in history[stats_from(resume):]), 3)}
    return model, stats


def training_length(cfg: TopicsConfig, docs_per_worker: int) -> tuple[int, int]:
    """``(batch size, epochs)`` for a worker holding ``docs_per_worker`` documents: ``batch_size``
    lowered so that an epoch has ``min_batches_per_epoch`` batches (not below 64 documents, nor
    above the worker's documents), and ``epochs`` raised until they add up to ``min_steps`` steps
    and ``min_documents_seen`` documents.

    >>> training_length(TopicsConfig(), 174_000)   # mixed-en on one worker: 84 steps an epoch
    (2048, 5)
    >>> training_length(TopicsConfig(), 1_000)     # 1k documents: 8 steps an epoch, 200 epochs
    (125, 200)
    """
    per = max(2, docs_per_worker)
    batch = max(2, min(cfg.batch_size, per, max(64, per // cfg.min_batches_per_epoch)))
    steps_per_epoch = max(1, per // batch)
    return batch, max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch), math.ceil(cfg.min_documents_seen / per))


def _training_data(cfg: TopicsConfig, out, token_urls: list[str], vocab: list[str]):
    """``(Ray Dataset or None, documents)``: with ``cache_bow`` an upper bound on the documents
    (empty ones count here; the BoW itself is built by :func:`submit_bow`), else the shuffled BoW
    dataset and its rows."""
    ds = None
    if cfg.cache_bow:
        docs = sum(stop - start for _, start, stop in plan_slices(token_urls, out.storage_options, 1)[0])
    else:
        ds = bow_dataset(token_urls, vocab, out.storage_options, cfg.seed)
        docs = ds.count()
    if docs == 0:
        raise TopicsError("topics: no document has a word of the filtered vocabulary; check topics.no_below/no_above")
    return ds, docs


def _fit(config: dict[str, Any], ds, *, workers: int, gpu: bool, placement: str) -> None:
    """Run :func:`train_loop_per_worker` on ``workers`` DDP workers with ``TorchTrainer``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory(prefix="embedjob-topics-") as tmp:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                         resources_per_worker=None if gpu else {"CPU": 1},
                                         placement_strategy=placement),
            run_config=RunConfig(name=f"topics-{uuid.uuid4().hex[:8]}", storage_path=tmp),
            datasets=None if ds is None else {"train": ds},
        )
        error = raytrain.fit(trainer)
        logger.info("topics: TorchTrainer.fit() returned after %.1fs", time.time() - config["fit_started"])
        if error is not None:
            raise TopicsError(f"topics: Ray Train training failed: {raytrain.root_message(error)}") from error


def _load_final(out, fingerprint: str, epochs: int) -> tuple[TopicModel, list[dict[str, Any]]]:
    """The trained model (CPU, eval mode) and the epoch history from the final checkpoint."""
    info = latest_checkpoint(out, fingerprint)
    if not info or info["epoch"] < epochs:
        raise TopicsError(f"topics: training ended without a final checkpoint under {out.url(CKPT_DIR)!r}")
    model, blob = model_from_bytes(out.read_bytes(info["path"]))
    return model, list(blob.get("history", []))
