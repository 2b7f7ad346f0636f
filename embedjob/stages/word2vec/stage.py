"""Word2Vec / FastText trained data-parallel with Ray Train, gensim inside (issues 5 and 10).

gensim trains on one machine only (piskvorky/gensim#3399). Here every Ray Train worker trains an
ordinary gensim model on its slice of the corpus. Workers on the same machine train *one* model in
shared memory, lock-free, exactly as gensim's own threads do (``share_memory``); the models of
different machines (or of every worker, with ``share_memory: false``) are combined with
``torch.distributed.all_reduce`` over gloo several times an epoch, as Spark MLlib does:

1. the driver counts words over all token shards (:func:`embedjob.vocab.build_vocabulary`, Ray
   tasks) and every worker builds the *same* vocabulary from those counts with gensim's own rules
   (``min_count``, ``max_final_vocab``, ``sample``) and the *same* initial weights (same seed);
   the first worker of each machine then puts the trainable matrices in files on ``/dev/shm``
   that the machine's other workers map (:func:`share_arrays`);
2. each worker takes a ``1/N`` row slice of every token shard (so every worker sees the same mix
   of the corpus and the same amount of work), writes it to local ``LineSentence`` files (gensim's
   fast ``corpus_file`` mode) cut into ``1/sync_every`` segments of equal words;
3. for every epoch and segment, each worker runs ``model.train(..., epochs=1)`` with the learning
   rate of that stretch of the *global* schedule (alpha -> min_alpha over all epochs); then, when
   there are several models, the first worker of each machine combines them with ``all_reduce``:
   ``wv.vectors`` and ``syn1neg``/``syn1`` (Word2Vec); ``wv.vectors_vocab``,
   ``wv.vectors_ngrams`` and ``syn1neg``/``syn1`` (FastText).
   By default the models' *updates* since the last sync are summed (``sync_mode='sum'``), which
   keeps single-process quality; Spark-style averaging (``'average'``) divides every update by
   the number of models and so learns that many times more slowly;
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
import os
import shutil
import tempfile
import time
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field, model_validator

from embedjob import raytrain
from embedjob._config_base import Section
from embedjob.errors import Word2VecTrainingError
from embedjob.storage import Storage
from embedjob.token_shards import plan_slices, read_slices
from embedjob.wordvectors import (
    KV_NAME,
    SAFE_FORMATS,
    WordVectorsError,
    is_pickle_name,
    pickle_refusal,
    read_keyed_vectors,
    read_vector_folder,
    write_keyed_vectors,
)

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"


class Word2VecConfig(Section):
    enabled: bool = Field(
        False,
        description="Train Word2Vec/FastText on the job's tokens (off by default: Ray Train's start-up "
        "alone takes tens of seconds, too long for the default tiny corpus).",
    )
    model: Literal["word2vec", "fasttext"] = Field(
        "word2vec",
        description="'word2vec' (gensim Word2Vec) or 'fasttext' (gensim FastText: also vectors for unseen "
        "words, built from character n-grams).",
    )
    vector_size: int = Field(100, ge=1, description="Dimension of the word vectors.")
    window: int = Field(5, ge=1, description="Maximum distance between the current and predicted word.")
    min_count: int = Field(5, ge=1, description="Ignore words with a corpus-wide count below this.")
    max_final_vocab: Optional[int] = Field(
        None, ge=1, description="Keep at most this many words (gensim raises min_count to fit); null = no cap."
    )
    sg: Literal[0, 1] = Field(0, description="1 = skip-gram, 0 = CBOW (gensim's default).")
    hs: Literal[0, 1] = Field(0, description="1 = hierarchical softmax (syn1 is averaged); 0 = negative sampling.")
    negative: int = Field(5, ge=0, description="Negative samples per positive one (0 = none; then hs must be 1).")
    ns_exponent: float = Field(0.75, description="Exponent shaping the negative-sampling distribution.")
    cbow_mean: Literal[0, 1] = Field(1, description="CBOW: 1 = mean of context vectors, 0 = sum.")
    sample: float = Field(1e-3, ge=0, description="Down-sampling threshold of frequent words (corpus-wide counts).")
    alpha: float = Field(0.025, gt=0, description="Initial learning rate.")
    min_alpha: float = Field(
        0.0001, ge=0, description="Final learning rate; the rate decays linearly over all epochs of all workers."
    )
    epochs: int = Field(5, ge=1, description="Passes over the corpus.")
    workers: int = Field(2, ge=1, description="Ray Train workers (each trains on 1/workers of the corpus).")
    threads_per_worker: int = Field(
        1, ge=1, description="gensim threads (and Ray CPUs reserved) per Ray Train worker."
    )
    sync_every: float = Field(
        0.1, gt=0, le=1,
        description="Combine the weights of workers that do not share memory (other machines, or every worker "
        "with share_memory false) every this fraction of an epoch (0.1 = 10 times an epoch). More often = "
        "closer to single-process quality, at the cost of one all_reduce of the model each time (on the shared "
        "corpus, 2 workers with their own copies: 4 syncs an epoch lost 4.3 analogy points, 10 lost 1.5).",
    )
    seed: int = Field(1, description="Seed of the initial weights (the same on every worker).")
    ngram_sync_every: int = Field(
        1, ge=1,
        description="FastText: exchange the n-gram bucket matrix (bucket x vector_size, usually the largest) at every "
        "n-th sync only (always at the last); word vectors and the output layer are exchanged at every sync.",
    )
    share_memory: bool = Field(
        True,
        description="Workers on the same machine train one model in shared memory (a file on /dev/shm that each "
        "maps), updating it lock-free as gensim's own threads do: they need no sync with each other, and only "
        "one worker per machine takes part in the syncs across machines (sync_every). false = every worker "
        "keeps its own copy and syncs with all the others.",
    )
    sparse_sync: Literal["auto", "true", "false"] = Field(
        "auto",
        description="'true': a sync exchanges only the rows of the word (and FastText n-gram) matrices that some "
        "worker's segment can have changed (its words and their n-gram buckets), agreed once before training; the "
        "output layer is always exchanged whole. Same result as a full sync with less data over the network, but "
        "the row gathering costs about what it saves when all workers share one machine's memory. 'auto' = 'true' "
        "when the workers span several nodes; 'false' = exchange every row.",
    )
    use_corpus_file: bool = Field(
        True,
        description="Train from local LineSentence files (gensim's corpus_file mode, usually faster, "
        "threads scale without the GIL); false = gensim's iterable mode on in-memory token lists.",
    )
    compute_loss: bool = Field(
        True, description="Record gensim's training loss per epoch in report.json (Word2Vec only)."
    )
    init_from: Optional[str] = Field(
        None,
        description="Start vocabulary words found in this file from its vectors (the rest random): any "
        f"storage URL of {SAFE_FORMATS} (e.g. another job's word2vec/vectors.bin). Its dimension must "
        "equal vector_size. A pickle (gensim's native .kv) is refused unless init_trust_pickle is true.",
    )
    init_trust_pickle: bool = Field(
        False,
        description="Allow init_from to be a pickle (gensim's native KeyedVectors.save file, e.g. another job's "
        "word2vec/vectors.kv). Loading a pickle runs any code it holds: set this only for a file you trust.",
    )
    init_lock: Literal["trainable", "frozen"] = Field(
        "trainable",
        description="Words started from init_from: 'trainable' keeps training them, 'frozen' leaves their "
        "vectors unchanged (FastText: their own word vector rows; shared n-grams still train).",
    )
    init_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for init_from; empty = the output's storage options.",
    )
    min_n: int = Field(3, ge=1, description="FastText: shortest character n-gram.")
    max_n: int = Field(6, ge=0, description="FastText: longest character n-gram (below min_n = no n-grams).")
    bucket: int = Field(
        2_000_000, ge=0,
        description="FastText: rows of the hashed n-gram matrix (vectors_ngrams, averaged at every sync; "
        "2M x 100 float32 = 800 MB per worker).",
    )
    sync_mode: Literal["sum", "average"] = Field(
        "sum",
        description="How workers combine at a sync. 'sum': every worker's update since the last sync is "
        "added (the model moves as if the workers had trained one after another, as gensim's threads do "
        "on one shared model: single-process quality). 'average': plain parameter averaging as in Spark "
        "MLlib (each update divided by the workers: learns more slowly, lower quality at equal epochs).",
    )
    max_failures: int = Field(
        0, ge=0,
        description="Ray Train FailureConfig: restart the worker group this many times after a worker fails "
        "(training starts over); 0 = the job fails at once with the worker's error.",
    )
    ray_storage_path: Optional[str] = Field(
        None,
        description="Ray Train's own run folder (must be shared storage on a multi-node cluster); "
        "null = a local temporary folder, removed afterwards.",
    )

    @model_validator(mode="after")
    def _check_loss(self) -> "Word2VecConfig":
        if self.negative == 0 and self.hs == 0:
            raise ValueError("word2vec.negative is 0 and word2vec.hs is 0: set negative > 0 or hs = 1")
        return self

    @model_validator(mode="after")
    def _check_init_pickle(self) -> "Word2VecConfig":
        # Refused before any work when the name says pickle; a pickle under another name is refused when read.
        if self.init_from and is_pickle_name(self.init_from) and not self.init_trust_pickle:
            raise ValueError(pickle_refusal("word2vec.init_from", self.init_from, "word2vec.init_trust_pickle"))
        return self


# ---------------------------------------------------------------------------------------------
# Building blocks (plain functions, testable without Ray)
# ---------------------------------------------------------------------------------------------
def word_frequencies(dictionary, min_count: int = 1) -> dict[str, int]:
    """Corpus-wide word counts of a :func:`~embedjob.vocab.build_vocabulary` Dictionary, in its
    deterministic id order (most frequent first, ties by word), words below ``min_count`` dropped
    (they can never enter gensim's vocabulary, so they need not travel to the workers)."""
    id2token = {i: w for w, i in dictionary.token2id.items()}
    return {id2token[i]: int(c) for i, c in sorted(dictionary.cfs.items()) if c >= min_count}


def new_model(cfg: Word2VecConfig, word_freq: dict[str, int], corpus_count: int, *, threads: int = 1):
    """A gensim Word2Vec / FastText with the vocabulary built from ``word_freq`` by gensim's rules and
    weights initialised from ``cfg.seed`` — identical wherever it is built with the same inputs."""
    from gensim.models import FastText, Word2Vec

    common = dict(
        vector_size=cfg.vector_size, window=cfg.window, min_count=cfg.min_count,
        max_final_vocab=cfg.max_final_vocab, sg=cfg.sg, hs=cfg.hs, negative=cfg.negative,
        ns_exponent=cfg.ns_exponent, cbow_mean=cfg.cbow_mean, sample=cfg.sample, alpha=cfg.alpha,
        min_alpha=cfg.min_alpha, epochs=cfg.epochs, seed=cfg.seed, workers=threads,
    )
    if cfg.model == "fasttext":
        model = FastText(min_n=cfg.min_n, max_n=cfg.max_n, bucket=cfg.bucket, **common)
    else:
        model = Word2Vec(**common)
    if not word_freq:
        raise ValueError(
            f"no word occurs at least word2vec.min_count={cfg.min_count} times in the token shards; "
            "lower word2vec.min_count or give more text"
        )
    model.build_vocab_from_freq(dict(word_freq), corpus_count=corpus_count)
    return model


def trainable_slots(model) -> list[tuple[Any, str]]:
    """``(owner, attribute)`` of each matrix that training changes, i.e. what the workers share or
    average: ``wv.vectors`` (Word2Vec) or ``wv.vectors_vocab`` + ``wv.vectors_ngrams`` (FastText),
    then ``syn1`` and/or ``syn1neg``."""
    from gensim.models import FastText

    slots: list[tuple[Any, str]] = []
    if isinstance(model, FastText):
        slots.append((model.wv, "vectors_vocab"))
        if model.wv.bucket:
            slots.append((model.wv, "vectors_ngrams"))
    else:
        slots.append((model.wv, "vectors"))
    if model.hs:
        slots.append((model, "syn1"))
    if model.negative:
        slots.append((model, "syn1neg"))
    return slots


def trainable_arrays(model) -> list[np.ndarray]:
    """The matrices that training changes (see :func:`trainable_slots`)."""
    return [getattr(owner, name) for owner, name in trainable_slots(model)]


def touched_rows(model, docs: list[list[str]]) -> list[Optional[np.ndarray]]:
    """For each of :func:`trainable_arrays`, the rows that training on ``docs`` can change, or None
    where any row can (the output layers: negative samples are drawn from the whole vocabulary).

    Word rows: the vocabulary words in ``docs``; FastText n-gram rows: those words' n-gram buckets.
    Rows outside these keep their synced values, so a sync only needs to exchange these rows."""
    from gensim.models import FastText

    index = model.wv.key_to_index
    present = np.fromiter({index[t] for d in docs for t in d if t in index}, dtype=np.int64)
    present.sort()
    rows: list[Optional[np.ndarray]] = [present]
    if isinstance(model, FastText) and model.wv.bucket:
        buckets = model.wv.buckets_word
        grams = [buckets[i] for i in present]
        rows.append(np.unique(np.concatenate(grams)).astype(np.int64) if grams else np.zeros(0, np.int64))
    if model.hs:
        rows.append(None)
    if model.negative:
        rows.append(None)
    return rows


def _word_rows(model) -> np.ndarray:
    """The per-word input matrix (what init_from fills and init_lock freezes)."""
    from gensim.models import FastText

    return model.wv.vectors_vocab if isinstance(model, FastText) else model.wv.vectors


def apply_init(model, words: list[str], vectors: np.ndarray, lock: str) -> np.ndarray:
    """Copy ``vectors`` into the rows of ``words`` that are in the model's vocabulary; with
    ``lock='frozen'`` those rows get lock factor 0 (gensim leaves them unchanged). Returns the
    indices of the rows set."""
    from gensim.models import FastText

    index = model.wv.key_to_index
    pairs = [(index[w], j) for j, w in enumerate(words) if w in index]
    rows = np.array([p[0] for p in pairs], dtype=np.int64)
    if len(rows):
        _word_rows(model)[rows] = vectors[[p[1] for p in pairs]]
    if isinstance(model, FastText):
        model.wv.adjust_vectors()
    if lock == "frozen" and len(rows):
        lockf = np.ones(len(index), dtype=np.float32)
        lockf[rows] = 0.0
        if isinstance(model, FastText):
            model.wv.vectors_vocab_lockf = lockf
        else:
            model.wv.vectors_lockf = lockf
    return rows


def global_alpha(cfg: Word2VecConfig, progress: float) -> float:
    """Learning rate after ``progress`` (0..1) of the whole training, gensim's linear decay."""
    return cfg.alpha - (cfg.alpha - cfg.min_alpha) * min(max(progress, 0.0), 1.0)


def split_segments(docs: list[list[str]], parts: int) -> list[list[list[str]]]:
    """Cut ``docs`` into ``parts`` contiguous pieces of about equal token counts (some may be empty)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    if total == 0:
        return [[] for _ in range(parts)]
    cum = np.cumsum(lengths)
    bounds = [0] + [int(np.searchsorted(cum, total * k / parts, side="left")) + 1 for k in range(1, parts)] + [len(docs)]
    bounds = [min(max(b, 0), len(docs)) for b in bounds]
    for k in range(1, len(bounds)):
        bounds[k] = max(bounds[k], bounds[k - 1])
    return [docs[bounds[k]:bounds[k + 1]] for k in range(parts)]


def write_line_sentences(docs: list[list[str]], path: str) -> int:
    """Write ``docs`` as a gensim LineSentence file (one document a line); returns its token count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(" ".join(d))
            f.write("\n")
            n += len(d)
    return n


# ---------------------------------------------------------------------------------------------
# Ray Train worker
# ---------------------------------------------------------------------------------------------
def combine_synced(summed, last, world: int) -> None:
    """Turn ``summed`` (in place), the ``all_reduce`` SUM of the workers' copies of one matrix, into
    the synced weights.

    ``last`` given ('sum' mode): ``last + sum_i(w_i - last) = summed - (world - 1) * last``, and
    ``last`` becomes the new weights; ``last`` None ('average' mode): ``summed / world``."""
    if world <= 1:
        return
    if last is not None:
        summed.sub_(last, alpha=world - 1)
        last.copy_(summed)
    else:
        summed.div_(world)


def memory_groups(machines: list[str]) -> list[list[int]]:
    """The ranks of each machine (``machines[rank]`` = its key, e.g. the node IP), in rank order;
    workers of one group can share one model in memory."""
    groups: dict[str, list[int]] = {}
    for rank, key in enumerate(machines):
        groups.setdefault(key, []).append(rank)
    return sorted(groups.values())


def shared_memory_dir(nbytes: int) -> Optional[str]:
    """A folder whose files can hold ``nbytes`` of shared model: ``/dev/shm`` (memory) if it has room,
    else the temporary folder (page cache, written back to disk now and then); None if neither."""
    for folder in ("/dev/shm", tempfile.gettempdir()):
        try:
            if os.path.isdir(folder) and shutil.disk_usage(folder).free > nbytes + (64 << 20):
                if folder != "/dev/shm":
                    logger.warning("word2vec: /dev/shm cannot hold the %.0f MB model; sharing it through %s",
                                   nbytes / 2**20, folder)
                return folder
        except OSError:
            continue
    return None


def share_arrays(model, paths: list[str], *, create: bool) -> None:
    """Back each of the model's :func:`trainable_slots` by the file ``paths[i]`` mapped into memory.
    ``create`` writes the model's current values to new files; otherwise the files (made by another
    process on this machine) are mapped as they are. Processes that map the same files train the same
    weights in place, lock-free, as gensim's threads do on one model."""
    import mmap

    for (owner, name), path in zip(trainable_slots(model), paths):
        arr = getattr(owner, name)
        if arr.nbytes == 0:
            continue
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, arr.nbytes)
            elif os.fstat(fd).st_size != arr.nbytes:
                raise RuntimeError(f"shared model file {path} has {os.fstat(fd).st_size} bytes, expected {arr.nbytes}")
            buf = mmap.mmap(fd, arr.nbytes)
        finally:
            os.close(fd)
        shared = np.frombuffer(buf, dtype=arr.dtype).reshape(arr.shape)
        if create:
            shared[...] = arr
        setattr(owner, name, shared)


FAIL_RANK_ENV = "EMBEDJOB_DEBUG_WORD2VEC_FAIL_RANK"  # fault injection for tests: this rank raises
# Tests: treat every this many consecutive ranks as one machine (a multi-node layout on one machine).
MACHINE_SIZE_ENV = "EMBEDJOB_DEBUG_WORD2VEC_RANKS_PER_MACHINE"


def _share_model(model, config: dict[str, Any], rank: int, world: int) -> list[list[int]]:
    """Let the workers of each machine train one model in shared memory. Returns the groups of
    ranks that now share one model (a group of one = a worker with its own copy); every rank
    must call this (it runs collectives)."""
    import ray
    import torch.distributed as dist

    key = ray.util.get_node_ip_address()
    if config.get("ranks_per_machine"):
        key = f"{key}/{rank // int(config['ranks_per_machine'])}"
    machines: list[Any] = [None] * world
    dist.all_gather_object(machines, key)
    groups = memory_groups(machines)
    mine = next(g for g in groups if rank in g)
    paths = None
    if rank == mine[0] and len(mine) > 1:
        folder = shared_memory_dir(sum(a.nbytes for a in trainable_arrays(model)))
        if folder is None:
            logger.warning("word2vec: no room for a shared model on this machine; its workers keep their own copies")
        else:
            paths = [os.path.join(folder, f"embedjob-w2v-{config['run_id']}-{rank}-{i}")
                     for i in range(len(trainable_slots(model)))]
            share_arrays(model, paths, create=True)
    made: list[Any] = [None] * world
    dist.all_gather_object(made, paths)
    try:
        if rank != mine[0] and made[mine[0]] is not None:
            try:
                share_arrays(model, made[mine[0]], create=False)
            except OSError as e:
                raise RuntimeError(
                    f"word2vec worker {rank} cannot map the shared model that worker {mine[0]} made on the same "
                    f"machine ({e}); set word2vec.share_memory: false") from e
        dist.barrier()
    finally:
        for path in paths or []:  # every worker has mapped them: the memory lives until the last unmaps it
            if os.path.exists(path):
                os.remove(path)
    return [g2 for g in groups for g2 in ([g] if made[g[0]] is not None else [[r] for r in g])]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the shared model, train on this worker's slice, average weights
    with the others every segment; rank 0 writes the vectors and the report to ``output_url``."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    cfg = Word2VecConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    t_start = time.time()

    model = new_model(cfg, config["word_freq"], config["corpus_count"], threads=cfg.threads_per_worker)
    # Same initial weights everywhere, but each worker draws its own negative samples / subsampling.
    model.random = np.random.RandomState(cfg.seed + 7919 * rank)
    frozen_rows = np.zeros(0, dtype=np.int64)
    frozen_values = None
    if config.get("init_ref") is not None:
        words, vectors = ray.get(config["init_ref"])
        rows = apply_init(model, words, vectors, cfg.init_lock)
        if cfg.init_lock == "frozen":
            frozen_rows, frozen_values = rows, _word_rows(model)[rows].copy()
        del words, vectors

    is_fasttext = cfg.model == "fasttext"
    track_loss = cfg.compute_loss and not is_fasttext  # gensim keeps no training loss for FastText
    if is_fasttext:
        # FastText recomputes every word vector from its n-grams after each train() call (a slow
        # Python loop); do it once at the end instead.
        model.wv.adjust_vectors = lambda: None

    # Workers that share one machine's memory train one model; the syncs are between those groups,
    # each represented by its first rank ("leader").
    groups = _share_model(model, config, rank, world) if cfg.share_memory and world > 1 else [[r] for r in range(world)]
    leaders = [g[0] for g in groups]
    n_sync = len(groups)  # models that the syncs combine
    leading = rank in leaders
    shared = any(len(g) > 1 for g in groups)
    sync_group = dist.new_group(leaders) if shared and n_sync > 1 else None  # every rank must call new_group

    # One model (a single worker, or one machine sharing it): nothing to combine, so one gensim train()
    # call runs all epochs with gensim's own alpha decay; segments only exist for the syncs.
    parts = 1 if n_sync == 1 else max(1, int(round(1.0 / cfg.sync_every)))
    docs = read_slices(config["slices"][rank], config["storage_options"])
    n_docs = len(docs)
    segments = split_segments(docs, parts)
    del docs
    workdir = tempfile.mkdtemp(prefix=f"embedjob-w2v-{rank}-")
    seg_words: list[int] = []
    seg_files: list[Optional[str]] = []
    sparse = cfg.sparse_sync == "true" or (cfg.sparse_sync == "auto" and ctx.get_local_world_size() < world)
    seg_rows: list[list[Optional[np.ndarray]]] = []
    for k, seg in enumerate(segments):
        seg_rows.append(touched_rows(model, seg) if sparse and n_sync > 1 else [None] * len(trainable_arrays(model)))
        if cfg.use_corpus_file:
            path = os.path.join(workdir, f"segment-{k:03d}.txt")
            seg_words.append(write_line_sentences(seg, path))
            seg_files.append(path)
        else:
            seg_words.append(sum(len(d) for d in seg))
            seg_files.append(None)
    if cfg.use_corpus_file:
        segments = [[] for _ in segments]  # the files hold them now
    t_ready = time.time()

    arrays = [torch.from_numpy(a) for a in trainable_arrays(model)]
    # 'sum' needs the weights of the last sync: new = last + sum_i(worker_i - last).
    last = [t.clone() for t in arrays] if n_sync > 1 and leading and cfg.sync_mode == "sum" else []

    if config.get("fail_rank") is not None and int(config["fail_rank"]) == rank:
        raise RuntimeError(f"word2vec worker {rank}: failure injected by {FAIL_RANK_ENV}")

    # FastText's n-gram matrix (often the largest by far) may be exchanged at every n-th sync only;
    # it then carries the changes of several segments and is exchanged whole.
    ngram_pos = 1 if is_fasttext and model.wv.bucket else None
    ngram_every = cfg.ngram_sync_every if ngram_pos is not None else 1

    # Rows a sync exchanges after segment k: the union over workers of the rows their segment k can
    # change (None = all rows). Agreed once here, so every sync is a plain all_reduce of those rows.
    sync_rows: list[list[Optional[torch.Tensor]]] = []
    for k in range(parts):
        per_array: list[Optional[torch.Tensor]] = []
        for i, t in enumerate(arrays):
            r = seg_rows[k][i]
            if n_sync <= 1 or r is None or (i == ngram_pos and ngram_every > 1):
                per_array.append(None)
                continue
            mask = torch.zeros(t.shape[0], dtype=torch.uint8)
            mask[torch.from_numpy(r)] = 1
            dist.all_reduce(mask, op=dist.ReduceOp.MAX)
            idx = torch.nonzero(mask).flatten()
            # nearly every row: exchanging the whole matrix is cheaper than gathering and scattering rows
            per_array.append(None if len(idx) > 0.9 * t.shape[0] else idx)
        sync_rows.append(per_array)
    del seg_rows
    synced_rows = [0, 0]  # rows exchanged, rows a full exchange of every matrix at every sync would move

    def average(k: int, sync_no: int, final: bool) -> None:
        """Combine the groups' models (run by each group's leader, over ``sync_group``)."""
        if n_sync > 1:
            for i, t in enumerate(arrays):
                synced_rows[1] += t.shape[0]
                if i == ngram_pos and not final and (sync_no + 1) % ngram_every:
                    continue
                idx = sync_rows[k][i]
                if idx is None:
                    synced_rows[0] += t.shape[0]
                    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=sync_group)
                    combine_synced(t, last[i] if last else None, n_sync)
                    continue
                synced_rows[0] += len(idx)
                block = t.index_select(0, idx)
                dist.all_reduce(block, op=dist.ReduceOp.SUM, group=sync_group)
                prev = last[i].index_select(0, idx) if last else None
                combine_synced(block, prev, n_sync)
                t.index_copy_(0, idx, block)
                if last:
                    last[i].index_copy_(0, idx, block)
        if len(frozen_rows):
            # Summing identical values then dividing can round; frozen words stay bit-identical.
            _word_rows(model)[frozen_rows] = frozen_values

    epochs_report = []
    sync_seconds = wait_seconds = 0.0
    if n_sync == 1:
        per_epoch: list[tuple[int, int, float, float]] = []
        _record_epochs(model, per_epoch)
        if seg_words[0]:
            model.train(**({"corpus_file": seg_files[0], "total_words": seg_words[0]} if cfg.use_corpus_file else
                           {"corpus_iterable": segments[0], "total_examples": len(segments[0])}),
                        epochs=cfg.epochs, start_alpha=cfg.alpha, end_alpha=cfg.min_alpha,
                        compute_loss=cfg.compute_loss)
        # each epoch's words and loss summed over the workers (loss: gensim's running total, made per epoch)
        table = torch.zeros((cfg.epochs, 4), dtype=torch.float64)
        for e, (t_w, r_w, sec, cum_loss) in enumerate(per_epoch):
            table[e] = torch.tensor([t_w, r_w, sec, cum_loss - (per_epoch[e - 1][3] if e else 0.0)])
        if world > 1:
            dist.all_reduce(table, op=dist.ReduceOp.SUM)
        for e in range(cfg.epochs):
            epochs_report.append(_epoch_row(e + 1, table[e, 0], table[e, 1], float(table[e, 2]) / world,
                                            float(table[e, 3]) if track_loss else None))
            if rank == 0:
                logger.info("word2vec epoch %d/%d: %s", e + 1, cfg.epochs, epochs_report[-1])
    for epoch in range(cfg.epochs if n_sync > 1 else 0):
        t_epoch = time.time()
        trained = raw = 0
        loss = 0.0
        for k in range(parts):
            if seg_words[k]:
                model.alpha = global_alpha(cfg, (epoch + k / parts) / cfg.epochs)
                model.min_alpha = global_alpha(cfg, (epoch + (k + 1) / parts) / cfg.epochs)
                if cfg.use_corpus_file:
                    t_w, r_w = model.train(corpus_file=seg_files[k], total_words=seg_words[k], epochs=1,
                                           compute_loss=cfg.compute_loss)
                else:
                    t_w, r_w = model.train(corpus_iterable=segments[k], total_examples=len(segments[k]),
                                           epochs=1, compute_loss=cfg.compute_loss)
                trained += t_w
                raw += r_w
                if track_loss:
                    loss += float(model.get_latest_training_loss())
            if n_sync > 1:
                t_sync = time.time()
                dist.barrier()  # waiting for the slowest worker, timed apart from the exchange itself
                t_exchange = time.time()
                wait_seconds += t_exchange - t_sync
                if leading:
                    average(k, epoch * parts + k, final=epoch == cfg.epochs - 1 and k == parts - 1)
                if shared:
                    dist.barrier()  # a shared model is written again only after its leader's exchange
                sync_seconds += time.time() - t_exchange
        totals = torch.tensor([trained, raw, loss], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        epochs_report.append(_epoch_row(epoch + 1, totals[0], totals[1], time.time() - t_epoch,
                                        float(totals[2]) if track_loss else None))
        if rank == 0:
            logger.info("word2vec epoch %d/%d: %s", epoch + 1, cfg.epochs, epochs_report[-1])
    t_trained = time.time()
    shutil.rmtree(workdir, ignore_errors=True)

    counts = torch.tensor([n_docs, sum(seg_words)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    if rank == 0:
        if is_fasttext:
            del model.wv.adjust_vectors
            model.wv.adjust_vectors()
        model.alpha, model.min_alpha, model.epochs = cfg.alpha, cfg.min_alpha, cfg.epochs
        train_seconds = t_trained - t_ready
        effective = sum(r["effective_words"] for r in epochs_report)
        report = {
            "model": cfg.model,
            "workers": world,
            "threads_per_worker": cfg.threads_per_worker,
            "vocabulary": len(model.wv),
            "vector_size": cfg.vector_size,
            "documents": int(counts[0]),
            "tokens_per_epoch": int(counts[1]),
            "syncs_per_epoch": parts if n_sync > 1 else 0,
            "sync_mode": cfg.sync_mode,
            "shared_memory_groups": [len(g) for g in groups],
            "corpus_file": cfg.use_corpus_file,
            "init_from": cfg.init_from,
            "init_words": int(config.get("init_words", 0)),
            "epochs": epochs_report,
            "effective_words": effective,
            "train_seconds": round(train_seconds, 3),
            "sync_seconds": round(sync_seconds, 3),
            "sync_wait_seconds": round(wait_seconds, 3),
            "sparse_sync": sparse,
            "synced_row_fraction": round(synced_rows[0] / max(synced_rows[1], 1), 4),
            "setup_seconds": round(t_ready - t_start, 3),
            "words_per_s": round(effective / max(train_seconds, 1e-9), 1),
        }
        save_vectors(model.wv, config["output_url"], config["output_options"], report)
    if world > 1:
        dist.barrier()


def _epoch_row(epoch: int, effective_words, raw_words, seconds: float, loss: Optional[float]) -> dict[str, Any]:
    """One epoch of the report: the words of all workers, the epoch's seconds, words/s and loss."""
    return {"epoch": epoch, "effective_words": int(effective_words), "raw_words": int(raw_words),
            "seconds": round(seconds, 3), "words_per_s": round(float(effective_words) / max(seconds, 1e-9), 1),
            "loss": loss}


def _record_epochs(model, rows: list[tuple[int, int, float, float]]) -> None:
    """Make the model's ``train()`` append ``(effective words, raw words, seconds, running loss)``
    of each epoch to ``rows`` (gensim reports only the totals of a call)."""
    for name in ("_train_epoch", "_train_epoch_corpusfile"):
        inner = getattr(model, name)

        def wrapped(*args, _inner=inner, **kwargs):
            t = time.time()
            out = _inner(*args, **kwargs)
            rows.append((int(out[0]), int(out[1]), time.time() - t, float(model.running_training_loss)))
            return out

        setattr(model, name, wrapped)


def save_vectors(kv, output_url: str, storage_options: dict[str, Any], report: dict[str, Any]) -> None:
    """Write the vectors (:func:`~embedjob.wordvectors.write_keyed_vectors`) and, last,
    ``report.json`` under ``output_url``, each a committed write."""
    store = Storage(output_url, storage_options)
    names = write_keyed_vectors(kv, store)
    store.write_json(REPORT_NAME, {**report, "files": names})


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------
def _config_error(msg: str) -> Exception:
    from embedjob.config import ConfigError  # late: embedjob.config imports this module

    return ConfigError(msg)


def load_init(cfg: Word2VecConfig, storage_options: dict[str, Any], word_freq: dict[str, int]):
    """``(words, vectors)`` of ``cfg.init_from`` restricted to the candidate vocabulary; an unreadable
    file, a pickle (unless ``init_trust_pickle``) or a dimension mismatch is a ``ConfigError``."""
    try:
        kv = read_keyed_vectors(cfg.init_from, cfg.init_storage_options or storage_options,
                                setting="word2vec.init_from", trust_pickle=cfg.init_trust_pickle,
                                trust_setting="word2vec.init_trust_pickle")
    except WordVectorsError as e:
        raise _config_error(str(e)) from None
    if kv.vector_size != cfg.vector_size:
        raise _config_error(
            f"word2vec.init_from={cfg.init_from!r} has {kv.vector_size}-dimensional vectors but "
            f"word2vec.vector_size is {cfg.vector_size}; they must match"
        )
    words = [w for w in kv.index_to_key if w in word_freq]
    vectors = np.stack([kv[w] for w in words]).astype(np.float32) if words else np.zeros((0, cfg.vector_size), np.float32)
    logger.info("word2vec: %d of %d words of %s are in the vocabulary", len(words), len(kv), cfg.init_from)
    return words, vectors


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


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
    temporary folder — and the vectors are read back from the safe files (never ``vectors.kv``). Starts a local Ray if none is running (and shuts it down after).
    """
    import uuid

    import ray

    storage_options = storage_options or {}
    output_options = storage_options if output_options is None else output_options
    if not token_urls:
        raise ValueError("train_word2vec: no token shards given")
    started_ray = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 1, cfg.workers * cfg.threads_per_worker),
                 include_dashboard=False, log_to_driver=False)
        started_ray = True
    tmp_out = None
    try:
        need = cfg.workers * cfg.threads_per_worker
        have = _cluster_cpus()
        if need > have:
            raise _config_error(
                f"word2vec.workers={cfg.workers} x word2vec.threads_per_worker={cfg.threads_per_worker} "
                f"needs {need} CPUs but the Ray cluster has {have:g}; lower them or add nodes"
            )
        t0 = time.time()
        if dictionary is None:
            from embedjob.vocab import build_vocabulary

            dictionary = build_vocabulary(token_urls, storage_options)
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
        slices = plan_slices(token_urls, storage_options, cfg.workers)
        vocab_seconds = time.time() - t0
        if output_url is None:
            tmp_out = tempfile.mkdtemp(prefix="embedjob-w2v-out-")
            output_url, output_options = tmp_out, {}
        report = _fit(cfg, {
            "cfg": cfg.model_dump(),
            "word_freq": word_freq,
            "corpus_count": int(dictionary.num_docs),
            "slices": slices,
            "storage_options": storage_options,
            "output_url": output_url,
            "output_options": output_options,
            "fail_rank": os.environ.get(FAIL_RANK_ENV),
            "ranks_per_machine": os.environ.get(MACHINE_SIZE_ENV),
            "run_id": uuid.uuid4().hex[:12],
            "init_ref": init_ref,
            "init_words": init_words,
        })
        report["vocab_seconds"] = round(vocab_seconds, 3)
        report["total_seconds"] = round(time.time() - t0, 3)
        folder = Storage(output_url, output_options)
        folder.write_json(REPORT_NAME, report)
        return read_vector_folder(folder), report
    finally:
        if tmp_out:
            shutil.rmtree(tmp_out, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def _fit(cfg: Word2VecConfig, loop_config: dict[str, Any]) -> dict[str, Any]:
    """Run the Ray Train job; returns rank 0's report (read back from the output folder)."""
    import uuid

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path = cfg.ray_storage_path
    tmp_storage = None
    if storage_path is None:
        tmp_storage = storage_path = tempfile.mkdtemp(prefix="embedjob-raytrain-")
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
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


def run_word2vec(cfg, out, token_urls: list[str]) -> dict[str, Any]:
    """Pipeline stage: train on the job's token shards and write ``<out>/word2vec/``; returns stats."""
    wcfg: Word2VecConfig = cfg.word2vec
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
