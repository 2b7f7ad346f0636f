"""Topic model stage (issue 6): the Embedded Topic Model (Dieng, Ruiz & Blei, TACL 2020) and
ProdLDA (Srivastava & Sutton, 2017) in torch, trained data-parallel with Ray Train.

Pipeline of :func:`run_topics`:

1. bag of words: the job's corpus-wide gensim ``Dictionary`` (``vocab/dictionary.json``) after
   ``filter_extremes``; each token shard becomes rows ``(word_ids, counts)`` in Ray tasks that run
   while Ray Train starts its workers (``cache_bow``, the default), or in a globally shuffled Ray
   Data pass (``cache_bow: false``);
2. training: ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPUs; by default one worker per node or
   per GPU): each worker takes a ``1/N`` slice of every shard's BoW rows from the object store and
   reshuffles it in memory every epoch, or (``cache_bow: false``) streams its split of the Ray Data
   dataset; rank 0 writes a checkpoint to ``topics/checkpoints/`` through the job's storage every
   ``checkpoint_every`` epochs, and ``resume`` continues from the latest matching one;
3. outputs: ``topics/topics.json`` (top words), ``topics/topic_word.npy`` (K x V), the
   document-topic proportions ``topics/theta/<shard>.parquet`` (``id``, ``theta``) computed by a
   Ray Data pass over all token shards, ``topics/metrics.json`` (NPMI and C_V coherence with
   gensim's ``CoherenceModel`` against the job's own tokens, topic diversity) and
   ``topics/model.pt`` (a plain dict: state dict, model arguments, vocabulary — read it with
   ``torch.load(weights_only=True)``).

The model and the batch transforms are plain functions/classes testable without Ray; theta for
new documents::

    trained = load_topic_model("output/local")          # reads topics/model.pt
    theta = trained.infer_tokens([["cat", "dog"], ["bank", "rate"]])   # (2, K), rows sum to 1

What makes CPU training of a 20k-word vocabulary quick: with pre-fitted rho the ETM encoder reads
the document's mean word embedding (``EmbeddingBag`` over rho) instead of the V-dimensional bag of
words, so it has E x hidden weights rather than V x hidden (and DDP all-reduces that little); the
``bow`` encoder is an ``EmbeddingBag`` over the normalised bag of words (nnz x hidden, not
V x hidden); the reconstruction term is evaluated only at the non-zero (document, word) pairs,
normalising the K x V logits once per step; each worker keeps its BoW rows in memory; the BoW is
built while the workers start.

Top words (``topics.json``, coherence, diversity) are chosen by LDAvis relevance
(``ranking_lambda``); the full topic-word matrix is in ``topic_word.npy``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from embedjob import raytrain
from embedjob._config_base import Section
from embedjob.errors import TopicsError
from embedjob.layout import CKPT_DIR, DICTIONARY_JSON, TOPICS_DIR, shard_key_of
from embedjob.storage import StorageError
from embedjob.token_shards import plan_slices
from embedjob.vocab import build_vocabulary, read_dictionary
from embedjob.wordvectors import (
    SAFE_FORMATS,
    VECTOR_FOLDERS,
    WordVectorsError,
    is_pickle_name,
    job_vectors_file,
    load_job_vectors,
    pickle_refusal,
    read_keyed_vectors,
)

logger = logging.getLogger(__name__)

FORMAT = "embedjob-topics-v1"
EMBEDDING_SOURCES = ("word2vec", "bert", "learned")


class TopicsConfig(Section):
    enabled: bool = Field(False, description="Train the topic model.")
    model: Literal["etm", "prodlda"] = Field(
        "etm",
        description="'etm': Embedded Topic Model (topic-word = softmax of topic vectors . word embeddings rho); "
        "'prodlda': ProdLDA (free topic-word weights, Dirichlet prior via its Laplace approximation). "
        "Both share the encoder, data path, training loop and outputs.",
    )
    num_topics: int = Field(20, ge=2, description="Number of topics K.")
    embeddings: str = Field(
        "word2vec",
        description="ETM word embeddings rho: 'word2vec' (<output>/word2vec/vectors.bin), 'bert' "
        "(<output>/static/vectors.bin), 'learned' (trained from scratch), or the URL of a vector file: "
        f"{SAFE_FORMATS}. A pickle (gensim's native .kv) is refused unless embeddings_trust_pickle is true. "
        "Vocabulary words missing from the vectors get rows that are learned (initialised at random with the "
        "vectors' per-dimension spread). Ignored by prodlda.",
    )
    embeddings_trust_pickle: bool = Field(
        False,
        description="Allow embeddings to be a pickle (gensim's native KeyedVectors.save file, .kv). Loading a "
        "pickle runs any code it holds: set this only for a file you trust.",
    )
    embedding_dim: int = Field(300, ge=2, description="Dimension of rho when embeddings='learned'.")
    prior: Literal["normal", "dirichlet"] = Field(
        "dirichlet",
        description="ETM prior over the topic logits: 'normal' = N(0, I) as in Dieng et al.; 'dirichlet' = the Laplace "
        "approximation of a symmetric Dirichlet(prior_alpha) (ProdLDA's prior), which with a small prior_alpha favours "
        "documents made of few topics and so more distinct topics. prodlda always uses the Dirichlet approximation.",
    )
    prior_alpha: Optional[float] = Field(
        None, gt=0,
        description="Dirichlet concentration per topic (null = 0.05 for etm, 1.0 for prodlda, the ProdLDA paper's value).",
    )
    background: bool = Field(
        True,
        description="ETM: add the corpus's log word frequencies to every topic's word logits, so that topics "
        "model deviations from the background (as SAGE and Scholar do) instead of each relearning the most "
        "frequent words; topics.json then ranks a topic's words by that deviation. Ignored by prodlda.",
    )
    train_embeddings: bool = Field(
        False, description="Fine-tune pre-fitted rho (false keeps the given vectors frozen; missing words are learned either way)."
    )
    no_below: int = Field(5, ge=1, description="filter_extremes: drop words in fewer than this many documents.")
    no_above: float = Field(
        0.5, gt=0, le=1, description="filter_extremes: drop words in more than this fraction of documents."
    )
    keep_n: Optional[int] = Field(
        20000, ge=1, description="filter_extremes: keep at most this many most frequent words (null = all)."
    )
    epochs: int = Field(5, ge=1, description="Training epochs over the corpus.")
    batch_size: int = Field(
        2048, ge=2, description="Documents per optimisation step and per worker (capped at the documents a worker holds)."
    )
    lr: float = Field(2e-2, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1.2e-6, ge=0, description="Adam weight decay.")
    encoder: Literal["auto", "bow", "embeddings"] = Field(
        "auto",
        description="ETM encoder input: 'bow' = the normalised bag of words through a learned V x hidden layer; "
        "'embeddings' = the document's mean word embedding (bag of words . rho, rho held fixed for the encoder) "
        "through a learned E x hidden layer: far fewer weights (quicker steps, small DDP all-reduces) and, with "
        "pre-fitted rho, better topics; 'auto' = 'embeddings' when rho is pre-fitted, else 'bow'. prodlda: 'bow'.",
    )
    hidden_size: int = Field(128, ge=8, description="Width of the encoder's two hidden layers.")
    dropout: Optional[float] = Field(
        None, ge=0, lt=1,
        description="Dropout on the encoder output and, for prodlda, on theta before the decoder (null = 0 for etm, "
        "as in Dieng et al.'s code: its noise on theta blurs topics together, costing diversity (README, Benchmarks); "
        "0.2 for prodlda, the ProdLDA paper's value).",
    )
    batchnorm: bool = Field(
        True, description="Batch-normalise the encoder's mean and log-variance (ProdLDA's trick; sharper, more diverse topics)."
    )
    kl_anneal_epochs: int = Field(
        0, ge=0, description="Raise the KL weight linearly from 0 to 1 over this many epochs (0 = full weight from the start)."
    )
    clip_grad: Optional[float] = Field(2.0, gt=0, description="Clip the gradient norm to this (null = no clipping).")
    workers: Optional[int] = Field(
        None, ge=1,
        description="Ray Train workers (DDP processes); each takes 1 CPU, or 1 GPU when use_gpu. null = one per GPU "
        "when training on GPUs, else one per Ray node, spread over the nodes (a worker uses its share of the CPUs "
        "as torch threads: on one machine that is quicker than several single-thread DDP processes).",
    )
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto", description="Train on GPUs (NCCL) — 'auto' = when the Ray cluster has at least `workers` GPUs (at "
        "least one when workers is null); else CPU (gloo)."
    )
    threads_per_worker: Optional[int] = Field(
        None, ge=1, description="torch threads per worker (and per theta actor); null = cluster CPUs / workers."
    )
    cache_bow: bool = Field(
        True,
        description="The BoW of each token shard is built by Ray tasks while Ray Train starts its workers; each worker "
        "takes an equal 1/N slice of every shard's rows from the object store, keeps it in memory and reshuffles "
        "it there every epoch (quick epochs, the same mix of the corpus on every worker). false = a globally "
        "shuffled Ray Data dataset, streamed to the workers every epoch (ray.train.get_dataset_shard; for BoW "
        "splits larger than a worker's memory).",
    )
    ranking_lambda: float = Field(
        0.5, ge=0, le=1,
        description="How a topic's top words are chosen (topics.json, coherence, diversity): LDAvis relevance "
        "(Sievert & Shirley 2014) lambda * log p(w|k) + (1 - lambda) * log(p(w|k) / p(w)), p(w) = the corpus "
        "frequency. 1 = by probability (frequent words shared by many topics), 0 = by lift (rare words). "
        "Higher = more coherent (NPMI), lower = more diverse topics. The LDAvis user study found 0.6 best for "
        "reading a topic; 0.5 balances the two on mixed-en (README, Benchmarks).",
    )
    top_n: int = Field(10, ge=2, description="Top words per topic used for coherence (and printed).")
    diversity_top_n: int = Field(25, ge=1, description="Top words per topic counted by topic diversity.")
    topics_json_top_n: int = Field(25, ge=1, description="Top words per topic written to topics.json.")
    coherence: list[Literal["c_npmi", "c_v"]] = Field(
        default_factory=lambda: ["c_npmi", "c_v"], description="gensim coherence measures to compute."
    )
    coherence_docs: Optional[int] = Field(
        20000, ge=1,
        description="Reference documents for coherence: a seeded sample of the job's token shards of at most "
        "this many (C_V is slow on big corpora; null = all). Recorded in metrics.json.",
    )
    coherence_processes: int = Field(1, ge=1, description="Processes gensim's CoherenceModel may use.")
    resume: bool = Field(
        True, description="Continue from the latest checkpoint under topics/checkpoints when it was made with "
        "the same settings and vocabulary; false = start over.",
    )
    checkpoint_every: int = Field(1, ge=1, description="Write a checkpoint every this many epochs (and after the last).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted).")
    seed: int = Field(0, description="Seed of initialisation, sampling and the coherence reference sample.")

    @field_validator("embeddings")
    @classmethod
    def _known_embeddings(cls, v: str) -> str:
        if v in EMBEDDING_SOURCES or "://" in v or v.endswith((".kv", ".bin", ".txt", ".vec", ".gz", ".npy")) \
                or os.sep in v:
            return v
        raise ValueError(
            f"unknown embeddings {v!r}: use one of {', '.join(EMBEDDING_SOURCES)} or the URL/path of a vector "
            f"file ({SAFE_FORMATS})"
        )

    @model_validator(mode="after")
    def _check_embeddings_pickle(self) -> "TopicsConfig":
        # Refused before any work when the name says pickle; a pickle under another name is refused when read.
        if self.embeddings not in EMBEDDING_SOURCES and is_pickle_name(self.embeddings) \
                and not self.embeddings_trust_pickle:
            raise ValueError(pickle_refusal("topics.embeddings", self.embeddings, "topics.embeddings_trust_pickle"))
        return self


# ---------------------------------------------------------------------------------------------
# bag of words
# ---------------------------------------------------------------------------------------------
def filter_dictionary(dictionary, cfg: TopicsConfig):
    """A filtered copy of the corpus dictionary (``filter_extremes`` with the config's settings);
    ids stay in the dictionary's (deterministic) order."""
    import copy

    d = copy.deepcopy(dictionary)
    d.filter_extremes(no_below=cfg.no_below, no_above=cfg.no_above, keep_n=cfg.keep_n)
    if len(d) == 0:
        raise TopicsError(
            f"topics: no word left after filter_extremes(no_below={cfg.no_below}, no_above={cfg.no_above}, "
            f"keep_n={cfg.keep_n}) over {dictionary.num_docs} documents; lower topics.no_below or raise topics.no_above"
        )
    return d


def vocab_list(dictionary) -> list[str]:
    """Words by id (``vocab[i]`` is the word of id ``i``)."""
    out = [""] * len(dictionary)
    for w, i in dictionary.token2id.items():
        out[i] = w
    return out


BOW_SCHEMA = pa.schema([("word_ids", pa.list_(pa.int32())), ("counts", pa.list_(pa.float32()))])


def bow_arrays(tokens: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> tuple[pa.ListArray, pa.ListArray]:
    """Bag of words of each document of a ``list<string>`` column: ``(word_ids, counts)`` lists,
    word ids sorted, words outside ``vocab`` dropped (a document may end up empty). Vectorised."""
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks() if tokens.num_chunks else pa.array([], pa.list_(pa.string()))
    n = len(tokens)
    v = len(vocab)
    flat = pc.list_flatten(tokens)
    parents = pc.list_parent_indices(tokens).to_numpy().astype(np.int64)
    wid = pc.fill_null(pc.index_in(flat, value_set=vocab), -1).to_numpy().astype(np.int64)
    keep = wid >= 0
    keys, counts = np.unique(parents[keep] * v + wid[keep], return_counts=True)
    doc = keys // max(v, 1)
    offsets = np.searchsorted(doc, np.arange(n + 1)).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array((keys % max(v, 1)).astype(np.int32)))
    cnt = pa.ListArray.from_arrays(pa.array(offsets), pa.array(counts.astype(np.float32)))
    return ids, cnt


def bow_from_token_lists(docs: Sequence[Sequence[str]], vocab: Sequence[str]) -> tuple[pa.ListArray, pa.ListArray]:
    """:func:`bow_arrays` for Python token lists."""
    return bow_arrays(pa.array([list(d) for d in docs], pa.list_(pa.string())), pa.array(list(vocab), pa.string()))


def _bow_shards(batch: dict[str, np.ndarray], vocab: list[str], storage_options: dict[str, Any]) -> pa.Table:
    """Ray Data transform: token shard URLs -> BoW rows of their non-empty documents."""
    from embedjob.storage import Storage

    vocab_arr = pa.array(vocab, pa.string())
    parts = []
    for url in batch["url"]:
        table = Storage(str(url), storage_options).read_parquet("", columns=["tokens"])
        ids, cnt = bow_arrays(table.column("tokens"), vocab_arr)
        t = pa.Table.from_arrays([ids, cnt], schema=BOW_SCHEMA)
        parts.append(t.filter(pc.greater(pc.list_value_length(t.column("word_ids")), 0)))
    return pa.concat_tables(parts) if parts else BOW_SCHEMA.empty_table()


def batch_tensors(word_ids: pa.Array | pa.ChunkedArray, counts: pa.Array | pa.ChunkedArray, device: Any = "cpu"):
    """BoW list columns -> ``(ids, offsets, weights, counts, doc_index)`` tensors for the model:
    flat word ids, bag start offsets, length-normalised weights (the encoder input), raw counts and
    the document of each entry."""
    import torch

    if isinstance(word_ids, pa.ChunkedArray):
        word_ids = word_ids.combine_chunks()
    if isinstance(counts, pa.ChunkedArray):
        counts = counts.combine_chunks()
    offsets = word_ids.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    ids = word_ids.flatten().to_numpy().astype(np.int64)
    cnt = counts.flatten().to_numpy().astype(np.float32)
    lengths = np.diff(offsets)
    doc_index = np.repeat(np.arange(len(lengths)), lengths)
    totals = np.bincount(doc_index, weights=cnt, minlength=len(lengths))
    totals = np.where(lengths > 0, totals, 1.0).astype(np.float32)
    weights = cnt / totals[doc_index]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return t(ids), t(offsets[:-1]), t(weights), t(cnt), t(doc_index)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def build_model(**kwargs: Any):
    """A :class:`TopicModel` (defined lazily so importing this module does not import torch)."""
    return _model_class()(**kwargs)


_MODEL_CLASS = None


def _model_class():
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    import torch
    from torch import nn
    from torch.nn import functional as F

    class TopicModel(nn.Module):
        """Variational encoder over the normalised BoW + ETM or ProdLDA decoder.

        ETM: beta = softmax_V(rho @ alpha^T), p(w|d) = theta_d . beta[:, w], prior N(0, I).
        ProdLDA: p(.|d) = softmax(BN(W theta_d + b)), prior: Laplace approximation of Dirichlet(1).
        """

        def __init__(self, vocab_size: int, num_topics: int, hidden_size: int = 512, *, kind: str = "etm",
                     embedding_dim: int = 300, rho_trainable: bool = True, n_missing: int = 0,
                     dropout: float = 0.2, batchnorm: bool = True, background: bool = False,
                     encoder: str = "bow", prior: str = "normal", prior_alpha: float = 1.0):
            super().__init__()
            self.vocab_size, self.num_topics, self.kind = vocab_size, num_topics, kind
            self.batchnorm = batchnorm
            if encoder not in ("bow", "embeddings") or (encoder == "embeddings" and kind != "etm"):
                raise TopicsError(f"topics.encoder: {encoder!r} is not valid for model {kind!r}")
            self.encoder = encoder
            if encoder == "bow":
                self.embed = nn.EmbeddingBag(vocab_size, hidden_size, mode="sum")
                self.embed_bias = nn.Parameter(torch.zeros(hidden_size))
            else:
                self.enc_in = nn.Linear(embedding_dim, hidden_size)
            self.enc2 = nn.Linear(hidden_size, hidden_size)
            self.drop = nn.Dropout(dropout)
            self.mu = nn.Linear(hidden_size, num_topics)
            self.logvar = nn.Linear(hidden_size, num_topics)
            if batchnorm:
                self.mu_bn = nn.BatchNorm1d(num_topics, affine=False)
                self.logvar_bn = nn.BatchNorm1d(num_topics, affine=False)
            if kind == "etm":
                if rho_trainable:
                    self.rho = nn.Parameter(torch.randn(vocab_size, embedding_dim) / math.sqrt(embedding_dim))
                else:
                    self.register_buffer("rho", torch.zeros(vocab_size, embedding_dim))
                self.n_missing = n_missing
                self.register_buffer("missing_idx", torch.zeros(n_missing, dtype=torch.long))
                if n_missing:
                    self.rho_missing = nn.Parameter(torch.randn(n_missing, embedding_dim) / math.sqrt(embedding_dim))
                self.alpha = nn.Linear(embedding_dim, num_topics, bias=False)
                self.background = background
                if background:  # log unigram frequencies, set by init_model, saved with the weights
                    self.register_buffer("log_background", torch.zeros(vocab_size))
            elif kind == "prodlda":
                self.beta = nn.Linear(num_topics, vocab_size)
                self.beta_bn = nn.BatchNorm1d(vocab_size, affine=False)
                self.theta_drop = nn.Dropout(dropout)
                prior = "dirichlet"
            else:
                raise TopicsError(f"topics.model: unknown model {kind!r}; valid: etm, prodlda")
            self.prior = prior
            if prior == "dirichlet":
                # Laplace approximation of a symmetric Dirichlet(a) in the softmax basis (Srivastava &
                # Sutton 2017): mean 0, variance (1/a)(1 - 2/K) + 1/(K a); a = 1 gives 1 - 1/K.
                k, a = float(num_topics), float(prior_alpha)
                self.register_buffer("prior_var", torch.full((num_topics,), (1.0 / a) * (1.0 - 2.0 / k) + 1.0 / (k * a)))

        # -- pieces ---------------------------------------------------------------------------
        def word_embeddings(self):
            if self.n_missing:
                return self.rho.index_copy(0, self.missing_idx, self.rho_missing)
            return self.rho

        def encode(self, ids, offsets, weights):
            if self.encoder == "bow":
                h = F.softplus(self.embed(ids, offsets, per_sample_weights=weights) + self.embed_bias)
            else:  # the document's mean word embedding (rho's initial rows for words still being learned)
                x = F.embedding_bag(ids, self.rho.detach(), offsets, mode="sum", per_sample_weights=weights)
                h = F.softplus(self.enc_in(x))
            h = self.drop(F.softplus(self.enc2(h)))
            mu, logvar = self.mu(h), self.logvar(h)
            if self.batchnorm:
                mu, logvar = self.mu_bn(mu), self.logvar_bn(logvar)
            return mu, logvar

        def theta(self, ids, offsets, weights):
            """Document-topic proportions (the posterior mean's softmax, no sampling)."""
            mu, _ = self.encode(ids, offsets, weights)
            return F.softmax(mu, dim=1)

        def topic_logits(self):
            """(K, V) ETM logits: alpha_k . rho (+ the log background frequency)."""
            logits = self.alpha.weight @ self.word_embeddings().t()
            if self.background:
                logits = logits + self.log_background
            return logits

        def log_topic_word(self):
            """(K, V) log topic-word distributions."""
            if self.kind == "etm":
                return F.log_softmax(self.topic_logits(), dim=1)
            return F.log_softmax(self.beta.weight.t(), dim=1)

        def topic_word(self):
            """(K, V) topic-word distributions."""
            return self.log_topic_word().exp()

        def kl(self, mu, logvar):
            if self.prior == "normal":
                return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(1)
            pv = self.prior_var
            return 0.5 * (logvar.exp() / pv + mu.pow(2) / pv - 1.0 + pv.log() - logvar).sum(1)

        def forward(self, ids, offsets, weights, counts, doc_index):
            """Per-document (reconstruction NLL, KL)."""
            mu, logvar = self.encode(ids, offsets, weights)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
            n = z.shape[0]
            if self.kind == "etm":
                # p(w|d) = theta_d . beta[:, w], only at the document's words: beta is normalised once as
                # a (V, K) matrix, whose rows are gathered at the batch's word ids (contiguous K-vectors),
                # and the dot products are taken in probability space: no exp/log per (word, topic) pair,
                # about a third of the time of a logsumexp over log theta + log beta at K=50 on a CPU.
                beta_t = F.softmax(self.topic_logits(), dim=1).t().contiguous()
                theta = F.softmax(z, dim=1)
                p = (beta_t.index_select(0, ids) * theta.index_select(0, doc_index)).sum(1)
                logp = p.clamp_min(1e-30).log()
            else:
                theta = F.softmax(z, dim=1)
                logits = self.beta_bn(self.beta(self.theta_drop(theta)))
                logp = F.log_softmax(logits, dim=1)[doc_index, ids]
            nll = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, doc_index, -counts * logp)
            return nll, self.kl(mu, logvar)

    _MODEL_CLASS = TopicModel
    return TopicModel


def model_kwargs(cfg: TopicsConfig, vocab_size: int, embedding_dim: int, n_missing: int) -> dict[str, Any]:
    trainable = cfg.embeddings == "learned" or cfg.train_embeddings
    dropout = cfg.dropout if cfg.dropout is not None else (0.0 if cfg.model == "etm" else 0.2)
    return {"vocab_size": vocab_size, "num_topics": cfg.num_topics, "hidden_size": cfg.hidden_size,
            "kind": cfg.model, "embedding_dim": embedding_dim, "rho_trainable": trainable,
            "n_missing": 0 if trainable else n_missing, "dropout": dropout, "batchnorm": cfg.batchnorm,
            "background": cfg.model == "etm" and cfg.background,
            "encoder": encoder_input(cfg),
            "prior": cfg.prior if cfg.model == "etm" else "dirichlet",
            "prior_alpha": cfg.prior_alpha or (0.05 if cfg.model == "etm" else 1.0)}


def encoder_input(cfg: TopicsConfig) -> str:
    """What the encoder reads (``topics.encoder`` with 'auto' resolved)."""
    if cfg.model != "etm":
        if cfg.encoder == "embeddings":
            raise TopicsError("topics.encoder='embeddings' needs model 'etm' (prodlda has no word embeddings)")
        return "bow"
    if cfg.encoder == "auto":
        return "embeddings" if cfg.embeddings != "learned" else "bow"
    if cfg.encoder == "embeddings" and cfg.embeddings == "learned":
        raise TopicsError("topics.encoder='embeddings' needs pre-fitted rho (topics.embeddings is 'learned'); "
                          "use topics.encoder='bow' or 'auto'")
    return cfg.encoder


def corpus_word_counts(dictionary) -> np.ndarray:
    """Corpus frequency of every word of ``dictionary``, by id (what :func:`relevance` and the ETM
    background use as ``p(w)``)."""
    return np.array([dictionary.cfs.get(i, 0) for i in range(len(dictionary))], np.float64)


def relevance(log_topic_word: np.ndarray, word_counts: Optional[np.ndarray], lam: float) -> np.ndarray:
    """LDAvis relevance (Sievert & Shirley 2014) of every (topic, word):
    ``lam * log p(w|k) + (1 - lam) * log(p(w|k) / p(w))`` with ``p(w)`` the corpus frequency (+1
    smoothed); ``lam = 1`` (or no counts) ranks by probability."""
    if word_counts is None or lam >= 1.0:
        return np.asarray(log_topic_word)
    freq = np.asarray(word_counts, np.float64) + 1.0
    log_p = np.log(freq / freq.sum())
    return np.asarray(log_topic_word, np.float64) - (1.0 - lam) * log_p[None, :]


def init_model(kwargs: dict[str, Any], rho: Optional[np.ndarray], missing: Optional[np.ndarray], seed: int,
               word_counts: Optional[np.ndarray] = None):
    """A freshly initialised model with the pre-fitted rows of rho copied in (and, for an ETM with a
    background, the log frequencies of ``word_counts``)."""
    torch = _torch()
    torch.manual_seed(seed)
    model = build_model(**kwargs)
    if kwargs.get("background") and word_counts is not None:
        freq = np.asarray(word_counts, np.float64) + 1.0
        with torch.no_grad():
            model.log_background.copy_(torch.from_numpy(np.log(freq / freq.sum()).astype(np.float32)))
    if kwargs["kind"] == "etm" and rho is not None:
        with torch.no_grad():
            model.rho.copy_(torch.from_numpy(rho))
            if kwargs["n_missing"]:
                model.missing_idx.copy_(torch.from_numpy(np.flatnonzero(missing)))
                model.rho_missing.copy_(torch.from_numpy(rho[missing]))
    return model


def infer_theta(model, word_ids: pa.Array, counts: pa.Array, *, batch_size: int = 4096) -> np.ndarray:
    """Document-topic proportions ``(n, K)`` float32 of BoW documents (:func:`bow_arrays` output)
    with a trained model; rows sum to 1 (an empty document gets the encoder's bias-only answer)."""
    torch = _torch()
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(word_ids), batch_size):
            ids, offsets, weights, _, _ = batch_tensors(word_ids[s:s + batch_size], counts[s:s + batch_size])
            out.append(model.theta(ids, offsets, weights).float().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.num_topics), np.float32)


@dataclass
class TrainedTopicModel:
    """A trained model with its vocabulary (what ``topics/model.pt`` holds)."""

    model: Any
    vocab: list[str]
    config: dict[str, Any]

    def infer_tokens(self, docs: Sequence[Sequence[str]]) -> np.ndarray:
        """Theta of new documents given as token lists (tokenise them as the job did:
        ``embedjob.preprocess.preprocess_texts``)."""
        ids, cnt = bow_from_token_lists(docs, self.vocab)
        return infer_theta(self.model, ids, cnt)

    def topic_word(self) -> np.ndarray:
        with _torch().no_grad():
            return self.model.topic_word().float().numpy()


def model_bytes(model, kwargs: dict[str, Any], vocab: list[str], cfg: TopicsConfig, extra: dict | None = None) -> bytes:
    torch = _torch()
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "model_kwargs": kwargs, "state_dict": model.state_dict(), "vocab": vocab,
                "config": cfg.model_dump(), **(extra or {})}, buf)
    return buf.getvalue()


def load_topic_model(url: str, storage_options: Optional[dict[str, Any]] = None) -> TrainedTopicModel:
    """Load ``topics/model.pt`` from a job output folder (or the file's own URL)."""
    from embedjob.storage import Storage

    store = Storage(url, storage_options or {})
    rel = "" if url.endswith(".pt") else f"{TOPICS_DIR}/model.pt"
    if not store.exists(rel):
        raise TopicsError(f"no topic model at {store.url(rel)!r}: run the job with topics.enabled=true")
    blob = _torch().load(io.BytesIO(store.read_bytes(rel)), map_location="cpu", weights_only=True)
    model = build_model(**blob["model_kwargs"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return TrainedTopicModel(model, list(blob["vocab"]), dict(blob.get("config", {})))


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------
def embedding_matrix(kv, vocab: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rho (V, E) float32, missing mask (V,))``: rows of vocabulary words from ``kv``; missing
    words get N(mean, std) rows with the known rows' per-dimension mean and spread (the model learns
    them further)."""
    dim = kv.vector_size
    rho = np.zeros((len(vocab), dim), np.float32)
    missing = np.ones(len(vocab), bool)
    for i, w in enumerate(vocab):
        idx = kv.key_to_index.get(w)
        if idx is not None:
            rho[i] = kv.vectors[idx]
            missing[i] = False
    known = rho[~missing]
    if len(known) == 0:
        raise TopicsError("topics.embeddings: none of the vocabulary's words is in the given vectors "
                          "(were they trained on other tokens?)")
    rng = np.random.default_rng(seed)
    mean, std = known.mean(0), known.std(0) + 1e-6
    rho[missing] = (mean + rng.standard_normal((int(missing.sum()), dim)) * std).astype(np.float32)
    return rho, missing


def resolve_embeddings(cfg: TopicsConfig, out, vocab: list[str]) -> tuple[Optional[np.ndarray], np.ndarray, dict]:
    """rho for the ETM per ``topics.embeddings`` plus stats for the record."""
    if cfg.model != "etm" or cfg.embeddings == "learned":
        return None, np.zeros(len(vocab), bool), {"embeddings": "learned" if cfg.model == "etm" else None}
    try:
        if cfg.embeddings in VECTOR_FOLDERS:
            rel = job_vectors_file(cfg.embeddings)
            if not out.exists(rel):
                stage = VECTOR_FOLDERS[cfg.embeddings]
                raise TopicsError(
                    f"topics.embeddings={cfg.embeddings!r} needs {out.url(rel)!r}, which does not exist: enable the "
                    f"{stage} stage ({stage}.enabled=true), or set topics.embeddings to 'learned' or a vector file URL"
                )
            url = out.url(rel)
            kv = load_job_vectors(out.url(), out.storage_options, cfg.embeddings)
        else:
            url = cfg.embeddings
            kv = read_keyed_vectors(url, out.storage_options, setting="topics.embeddings",
                                    trust_pickle=cfg.embeddings_trust_pickle,
                                    trust_setting="topics.embeddings_trust_pickle")
    except WordVectorsError as e:
        raise TopicsError(str(e)) from None
    if len(kv) == 0:  # e.g. the static stage kept no word (none reached static.min_count)
        raise TopicsError(f"topics.embeddings={cfg.embeddings!r}: {url!r} holds no word vectors (see the stats of the "
                          "stage that wrote it); set topics.embeddings to 'learned' or to another vector file")
    rho, missing = embedding_matrix(kv, vocab, cfg.seed)
    logger.info("topics: rho from %s: %d words, dim %d, %d vocabulary words missing (learned)",
                url, len(vocab), rho.shape[1], int(missing.sum()))
    return rho, missing, {"embeddings": url, "embedding_dim": int(rho.shape[1]), "missing_words": int(missing.sum())}


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def top_words(topic_word: np.ndarray, vocab: list[str], n: int) -> list[list[str]]:
    order = np.argsort(-topic_word, axis=1)[:, :n]
    return [[vocab[j] for j in row] for row in order]


def topic_diversity(topics: list[list[str]], n: int = 25) -> float:
    """Unique words among the top ``n`` of all topics / (n * K) (Dieng et al. 2020)."""
    words = [w for t in topics for w in t[:n]]
    return len(set(words)) / float(n * len(topics)) if topics else 0.0


def reference_texts(token_urls: list[str], storage_options: dict[str, Any], limit: Optional[int],
                    seed: int) -> list[list[str]]:
    """The coherence reference: the job's token lists, a seeded sample of at most ``limit`` spread
    over the shards in proportion to their sizes."""
    import pyarrow.parquet as pq

    from embedjob.storage import Storage

    sizes = []
    for u in token_urls:
        s = Storage(u, storage_options)
        with s.open("", "rb") as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    texts: list[list[str]] = []
    for u, n in zip(token_urls, sizes):
        if n == 0:
            continue
        tokens = Storage(u, storage_options).read_parquet("", columns=["tokens"]).column("tokens")
        if limit is not None and total > limit:
            take = int(round(limit * n / total))
            idx = np.sort(rng.choice(n, size=min(take, n), replace=False))
            tokens = tokens.take(pa.array(idx))
        texts.extend(t for t in tokens.to_pylist() if t)
    return texts


def coherence_scores(topics: list[list[str]], texts: list[list[str]], dictionary, *, measures: Sequence[str],
                     topn: int, processes: int = 1) -> dict[str, Any]:
    """gensim CoherenceModel scores: ``{measure: {"mean": m, "per_topic": [...]}}``."""
    from gensim.models.coherencemodel import CoherenceModel

    out: dict[str, Any] = {}
    for m in measures:
        cm = CoherenceModel(topics=[t[:topn] for t in topics], texts=texts, dictionary=dictionary, coherence=m,
                            topn=topn, processes=processes)
        per = [float(x) for x in cm.get_coherence_per_topic()]
        # A top word absent from the reference texts makes gensim divide by a zero probability (inf):
        # such a topic's score is undefined; it is left out of the mean and counted.
        finite = [x for x in per if math.isfinite(x)]
        out[m] = {"mean": float(np.mean(finite)) if finite else float("nan"),
                  "per_topic": [x if math.isfinite(x) else None for x in per],
                  "undefined_topics": len(per) - len(finite), "window_size": cm.window_size}
    return out


def evaluate_topics(topics: list[list[str]], texts: list[list[str]], dictionary, cfg: TopicsConfig) -> dict[str, Any]:
    """metrics.json body: NPMI / C_V (gensim, top ``top_n`` words) and topic diversity, with the
    settings they were computed with."""
    t = time.time()
    scores = coherence_scores(topics, texts, dictionary, measures=cfg.coherence, topn=cfg.top_n,
                              processes=cfg.coherence_processes)
    out: dict[str, Any] = {
        "num_topics": len(topics),
        "diversity": topic_diversity(topics, cfg.diversity_top_n),
        "coherence": scores,
        "settings": {
            "coherence": "gensim.models.coherencemodel.CoherenceModel",
            "topn": cfg.top_n,
            "window_size": {m: s["window_size"] for m, s in scores.items()},
            "reference": "job tokens (tokens/*.parquet)",
            "reference_docs": len(texts),
            "reference_docs_cap": cfg.coherence_docs,
            "reference_seed": cfg.seed,
            "dictionary_words": len(dictionary),
            "diversity_top_n": cfg.diversity_top_n,
            "ranking": f"LDAvis relevance, lambda={cfg.ranking_lambda}",
        },
        "seconds": round(time.time() - t, 3),
    }
    if "c_npmi" in scores:
        out["npmi"] = scores["c_npmi"]["mean"]
    if "c_v" in scores:
        out["c_v"] = scores["c_v"]["mean"]
    return out


# ---------------------------------------------------------------------------------------------
# training (Ray Train)
# ---------------------------------------------------------------------------------------------
def _fingerprint(cfg: TopicsConfig, vocab: list[str], rho: Optional[np.ndarray]) -> str:
    """What a checkpoint must match to be resumed: settings that change the model, the vocabulary
    and the pre-fitted rho (by content, so a moved output folder still resumes)."""
    keep = cfg.model_dump(exclude={"enabled", "epochs", "resume", "checkpoint_every", "keep_checkpoints",
                                   "workers", "threads_per_worker", "use_gpu", "top_n", "diversity_top_n",
                                   "topics_json_top_n", "coherence", "coherence_docs", "coherence_processes",
                                   "cache_bow", "ranking_lambda", "embeddings_trust_pickle"})
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    h.update("\n".join(vocab).encode())
    if rho is not None:
        h.update(np.ascontiguousarray(rho).tobytes())
    return h.hexdigest()[:16]


def latest_checkpoint(store, fingerprint: str) -> Optional[dict[str, Any]]:
    """``{"path", "epoch"}`` of the newest checkpoint with this fingerprint, else None."""
    if not store.exists(f"{CKPT_DIR}/latest.json"):
        return None
    try:
        info = store.read_json(f"{CKPT_DIR}/latest.json")
    except (OSError, ValueError):
        return None
    if info.get("fingerprint") != fingerprint or not store.exists(info.get("path", "")):
        logger.info("topics: checkpoint %s was made with other settings or vocabulary; starting over",
                    info.get("path"))
        return None
    return info


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train loop of one worker: DDP over its split of the BoW dataset."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from embedjob.storage import Storage

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if rank == 0:
        logger.info("topics: worker started %.1fs after fit()", time.time() - config["fit_started"])
    store = Storage(config["root"], config["storage_options"])
    rho = ray.get(config["rho_ref"]) if config["rho_ref"] is not None else None
    model = init_model(config["model_kwargs"], rho, config["missing"], config["seed"], config.get("word_counts"))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], fused=True)
    start = 0
    history: list[dict[str, Any]] = []
    if config["resume_path"]:
        blob = torch.load(io.BytesIO(store.read_bytes(config["resume_path"])), map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        start = int(blob["epoch"])
        history = list(blob.get("history", []))
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] * 1000 + rank + 7919 * start)
    shard = None if config.get("bow_slices") is not None else ray.train.get_dataset_shard("train")
    epochs, anneal = config["epochs"], config["kl_anneal_epochs"]
    cache: dict[str, Any] = {}
    for epoch in range(start, epochs):
        model.train()
        t0 = time.time()
        kl_w = min(1.0, (epoch + 1) / anneal) if anneal else 1.0
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in _epoch_batches(shard, config, config["seed"] + epoch * 131 + rank, cache):
            ids, offsets, weights, counts, doc_index = batch_tensors(batch.column("word_ids"), batch.column("counts"),
                                                                     device)
            nll, kl = model(ids, offsets, weights, counts, doc_index)
            loss = (nll + kl_w * kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip_grad"])
            opt.step()
            sums += torch.tensor([float(nll.sum()), float(kl.sum()), float(len(nll))], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # gloo/NCCL: global epoch loss for the log
        docs = max(float(sums[2]), 1.0)
        metrics = {"epoch": epoch + 1, "nll": float(sums[0]) / docs, "kl": float(sums[1]) / docs,
                   "docs": int(sums[2]), "seconds": round(time.time() - t0, 3)}
        last = epoch + 1 == epochs
        history.append(metrics)
        if rank == 0:
            logger.info("topics: epoch %d/%d nll %.2f kl %.2f (%d docs, %.1fs)", epoch + 1, epochs, metrics["nll"],
                        metrics["kl"], metrics["docs"], metrics["seconds"])
            if last or (epoch + 1) % config["checkpoint_every"] == 0:
                _save_checkpoint(store, core, opt, epoch + 1, config, history)
        ray.train.report(metrics)


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
    torch = _torch()
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "epoch": epoch, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "model_kwargs": config["model_kwargs"],
                "fingerprint": config["fingerprint"], "history": history}, buf)
    fp = config["fingerprint"]
    path = f"{CKPT_DIR}/epoch-{epoch:05d}-{fp}.pt"
    store.write_bytes(path, buf.getvalue())
    store.write_json(f"{CKPT_DIR}/latest.json", {"path": path, "epoch": epoch, "fingerprint": fp})
    # keep this run's newest checkpoints; those of other settings are replaced once this run has one
    names = [n for n in store.list(CKPT_DIR, suffix=".pt") if n.startswith("epoch-")]
    mine = sorted(n for n in names if n.endswith(f"-{fp}.pt"))
    stale = [n for n in names if not n.endswith(f"-{fp}.pt")]
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


def worker_slices(n: int, world: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` of each worker's ``1/world`` slice of a shard of ``n`` rows."""
    return [(n * r // world, n * (r + 1) // world) for r in range(world)]


def _bow_task(urls: list[str], vocab: list[str], storage_options: dict[str, Any], world: int) -> list[Any]:
    """Ray task: for each token shard in ``urls``, the row counts of the workers' slices of its BoW
    (non-empty documents), then one BoW table per worker."""
    out: list[Any] = []
    for url in urls:
        table = _bow_shards({"url": [url]}, vocab, storage_options)
        bounds = worker_slices(table.num_rows, world)
        out.append([stop - start for start, stop in bounds])
        out.extend(table.slice(start, stop - start) for start, stop in bounds)
    return out


def submit_bow(token_urls: list[str], vocab: list[str], storage_options: dict[str, Any], world: int, tasks: int):
    """Start building the BoW of every token shard in ``tasks`` Ray tasks (each a stripe of the
    shards; no CPU reserved, so that they run while the Ray Train workers start), each shard cut into
    ``world`` slices: shards are often one source or one topic each, and this way every worker gets
    the same mix of the corpus and fetches only its own rows. Returns, per shard, the ref of its
    slices' row counts and the refs of its ``world`` slices."""
    import ray

    remote = ray.remote(num_cpus=0)(_bow_task)
    vocab_ref = ray.put(vocab)
    counts: list[Any] = [None] * len(token_urls)
    slices: list[Any] = [None] * len(token_urls)
    for t in range(min(tasks, len(token_urls))):
        mine = list(range(t, len(token_urls), tasks))
        refs = remote.options(num_returns=(world + 1) * len(mine)).remote(
            [token_urls[i] for i in mine], vocab_ref, storage_options, world)
        for j, i in enumerate(mine):
            counts[i], slices[i] = refs[(world + 1) * j], refs[(world + 1) * j + 1:(world + 1) * (j + 1)]
    return counts, slices


def bow_dataset(token_urls: list[str], vocab: list[str], storage_options: dict[str, Any], seed: int = 0):
    """Ray Dataset of the BoW rows (``word_ids``, ``counts``) of all non-empty documents, globally
    shuffled and materialised once in the object store so that every epoch streams it without
    re-reading the shards.

    The shuffle matters: shards are often one source or one topic each, and a worker that only sees
    one topic gets batch-norm statistics (and gradients) of that topic alone, which stops DDP workers
    from learning distinct topics."""
    import ray

    ds = ray.data.from_items([{"url": u} for u in token_urls], override_num_blocks=len(token_urls))
    ds = ds.map_batches(_bow_shards, fn_kwargs={"vocab": vocab, "storage_options": storage_options},
                        batch_size=1, batch_format="numpy")
    return ds.random_shuffle(seed=seed).materialize()


def train_topic_model(cfg: TopicsConfig, out, token_urls: list[str], vocab: list[str], rho: Optional[np.ndarray],
                      missing: np.ndarray, word_counts: Optional[np.ndarray] = None) -> tuple[Any, dict[str, Any]]:
    """Train with ``TorchTrainer`` (or resume); returns the trained model (CPU) and stats."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.time()
    fp = _fingerprint(cfg, vocab, rho)
    resume = latest_checkpoint(out, fp) if cfg.resume else None
    done = bool(resume and resume["epoch"] >= cfg.epochs)
    ds = counts = None
    if cfg.cache_bow and not done:

        # an upper bound on the documents (empty ones count here); the BoW itself is built below
        docs = sum(stop - start for _, start, stop in plan_slices(token_urls, out.storage_options, 1)[0])
    elif not done:
        ds = bow_dataset(token_urls, vocab, out.storage_options, cfg.seed)
        docs = ds.count()
    else:
        docs = None  # nothing to train: the checkpoint already has every epoch
    if not done and docs == 0:
        raise TopicsError("topics: no document has a word of the filtered vocabulary; check topics.no_below/no_above")
    docs_bound = docs or 0
    workers, gpu, threads = training_layout(cfg, docs_bound)
    batch_size = max(2, min(cfg.batch_size, docs_bound // workers))
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
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "epochs": cfg.epochs, "batch_size": batch_size,
        "kl_anneal_epochs": cfg.kl_anneal_epochs, "clip_grad": cfg.clip_grad, "threads": threads,
        "checkpoint_every": cfg.checkpoint_every, "keep_checkpoints": cfg.keep_checkpoints, "fingerprint": fp,
        "resume_path": resume["path"] if resume else None, "shuffle_buffer": max(batch_size * 4, 1024),
    }
    if counts is not None:
        config["bow_counts"], config["bow_slices"] = counts, slices
    t1 = config["fit_started"] = time.time()
    if not done:
        with tempfile.TemporaryDirectory(prefix="embedjob-topics-") as tmp:
            trainer = TorchTrainer(
                _train_loop,
                train_loop_config=config,
                torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                             resources_per_worker=None if gpu else {"CPU": 1},
                                             placement_strategy="PACK" if cfg.workers else "SPREAD"),
                run_config=RunConfig(name=f"topics-{uuid.uuid4().hex[:8]}", storage_path=tmp),
                datasets=None if ds is None else {"train": ds},
            )
            error = raytrain.fit(trainer)
            logger.info("topics: TorchTrainer.fit() returned after %.1fs", time.time() - t1)
            if error is not None:
                raise TopicsError(f"topics: Ray Train training failed: {raytrain.root_message(error)}") from error
    train_seconds = time.time() - t0
    if counts is not None:
        docs = int(sum(sum(c) for c in ray.get(counts)))
    info = latest_checkpoint(out, fp)
    if not info or info["epoch"] < cfg.epochs:
        raise TopicsError(f"topics: training ended without a final checkpoint under {out.url(CKPT_DIR)!r}")
    blob = _torch().load(io.BytesIO(out.read_bytes(info["path"])), map_location="cpu", weights_only=True)
    model = build_model(**kwargs)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    history = list(blob.get("history", []))
    final_metrics = history[-1] if history else {}
    stats = {"documents": docs, "workers": workers, "threads_per_worker": threads, "device": "cuda" if gpu else "cpu",
             "batch_size": batch_size, "epochs": cfg.epochs, "resumed_from_epoch": resume["epoch"] if resume else 0,
             "final_nll": final_metrics.get("nll"), "final_kl": final_metrics.get("kl"),
             "bow_seconds": round(t1 - t0, 3), "train_seconds": round(train_seconds, 3),
             "epoch_seconds": round(sum(h["seconds"] for h in history[stats_from(resume):]), 3)}
    return model, stats


# ---------------------------------------------------------------------------------------------
# theta for every document (Ray Data pass)
# ---------------------------------------------------------------------------------------------
class ThetaWriter:
    """Ray Data callable: token shard URL -> ``(id, theta)`` Parquet written to a staging folder."""

    def __init__(self, model_blob: bytes, vocab: list[str], root: str, storage_options: dict[str, Any],
                 staging: str, threads: int = 1):
        torch = _torch()
        torch.set_num_threads(threads)
        blob = torch.load(io.BytesIO(model_blob), map_location="cpu", weights_only=True)
        self.model = build_model(**blob["model_kwargs"])
        self.model.load_state_dict(blob["state_dict"])
        self.model.eval()
        self.vocab = pa.array(vocab, pa.string())
        self.root, self.storage_options, self.staging = root, storage_options, staging

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from embedjob.storage import Storage

        store = Storage(self.root, self.storage_options)
        keys, docs, empty = [], [], []
        for url, key in zip(batch["url"], batch["key"]):
            table = Storage(str(url), self.storage_options).read_parquet("", columns=["id", "tokens"])
            ids, cnt = bow_arrays(table.column("tokens"), self.vocab)
            theta = infer_theta(self.model, ids, cnt)
            k = theta.shape[1]
            col = pa.FixedSizeListArray.from_arrays(pa.array(theta.reshape(-1), pa.float32()), k)
            out = pa.table({"id": table.column("id"), "theta": col.cast(pa.list_(pa.float32()))})
            store.write_parquet(f"{self.staging}/{key}.parquet", out)
            keys.append(str(key))
            docs.append(table.num_rows)
            empty.append(int((pc.list_value_length(ids).to_numpy() == 0).sum()))
        return {"key": np.array(keys), "docs": np.array(docs), "empty": np.array(empty)}


def theta_pass(model_blob: bytes, vocab: list[str], out, token_urls: list[str], staging: str, *,
               actors: int, threads: int) -> dict[str, Any]:
    import ray

    items = [{"url": u, "key": shard_key_of(u)} for u in token_urls]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ThetaWriter, fn_constructor_kwargs={
        "model_blob": model_blob, "vocab": vocab, "root": out.url(), "storage_options": out.storage_options,
        "staging": staging, "threads": threads}, batch_size=1, compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items)))),
        num_cpus=1, batch_format="numpy")
    rows = ds.take_all()
    return {"theta_docs": int(sum(r["docs"] for r in rows)), "theta_empty_docs": int(sum(r["empty"] for r in rows)),
            "theta_shards": len(rows)}


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def load_job_dictionary(out, token_urls: list[str]):
    """The job's dictionary, ``<out>/vocab/dictionary.json`` (:func:`embedjob.vocab.read_dictionary`;
    never the pickled ``dictionary.gensim``), or, when there is none (an output written before it
    existed, or no vocab stage), built from the token shards."""
    if out.exists(DICTIONARY_JSON):
        try:
            return read_dictionary(out)
        except StorageError as e:
            raise TopicsError(str(e)) from None
    logger.info("topics: no %s; counting the vocabulary from the token shards", out.url(DICTIONARY_JSON))
    return build_vocabulary(token_urls, out.storage_options)


def run_topics(cfg, out, token_urls: list[str]) -> dict[str, Any]:
    """Train the topic model on the job's token shards and write ``<out>/topics/``; returns stats.

    Results are written only after training, theta and metrics all succeeded; theta files are
    staged under ``topics/_staging/`` first.
    """
    tc: TopicsConfig = cfg.topics
    if not token_urls:
        raise TopicsError("topics: no token shard to train on")
    t0 = time.time()
    dictionary = filter_dictionary(load_job_dictionary(out, token_urls), tc)
    vocab = vocab_list(dictionary)
    logger.info("topics: %s, K=%d, vocabulary %d words after filter_extremes", tc.model, tc.num_topics, len(vocab))
    rho, missing, emb_stats = resolve_embeddings(tc, out, vocab)
    word_counts = corpus_word_counts(dictionary)
    model, train_stats = train_topic_model(tc, out, token_urls, vocab, rho, missing, word_counts)
    kwargs = model_kwargs(tc, len(vocab), rho.shape[1] if rho is not None else tc.embedding_dim, int(missing.sum()))
    with _torch().no_grad():
        log_tw = model.log_topic_word().double().numpy()
    tw = np.exp(log_tw)
    topics = top_words(relevance(log_tw, word_counts, tc.ranking_lambda), vocab,
                       max(tc.topics_json_top_n, tc.diversity_top_n, tc.top_n))
    blob = model_bytes(model, kwargs, vocab, tc)

    staging = f"{TOPICS_DIR}/_staging/{uuid.uuid4().hex[:12]}"
    try:
        t = time.time()
        theta_stats = theta_pass(blob, vocab, out, token_urls, staging, actors=train_stats["workers"],
                                 threads=train_stats["threads_per_worker"])
        theta_stats["theta_seconds"] = round(time.time() - t, 3)
        texts = reference_texts(token_urls, out.storage_options, tc.coherence_docs, tc.seed)
        metrics = evaluate_topics(topics, texts, dictionary, tc)
        metrics.update({"model": tc.model, "training": train_stats, "vocabulary": len(vocab), **emb_stats})

        # commit: theta, matrices, topics, model, metrics last
        keys = [shard_key_of(u) for u in token_urls]
        for k in keys:
            out.write_bytes(f"{TOPICS_DIR}/theta/{k}.parquet", out.read_bytes(f"{staging}/{k}.parquet"))
        for name in out.list(f"{TOPICS_DIR}/theta", suffix=".parquet"):
            if name[: -len(".parquet")] not in set(keys):
                out.delete(f"{TOPICS_DIR}/theta/{name}")
    finally:
        out.delete(staging, recursive=True)
    buf = io.BytesIO()
    np.save(buf, tw.astype(np.float32))
    out.write_bytes(f"{TOPICS_DIR}/topic_word.npy", buf.getvalue())
    npmi = metrics["coherence"].get("c_npmi", {}).get("per_topic", [])
    cv = metrics["coherence"].get("c_v", {}).get("per_topic", [])
    word_index = {w: i for i, w in enumerate(vocab)}
    out.write_json(f"{TOPICS_DIR}/topics.json", {
        "model": tc.model, "num_topics": tc.num_topics, "vocabulary": len(vocab),
        "topics": [{"topic": i, "words": words[: tc.topics_json_top_n],
                    "weights": [round(float(tw[i, word_index[w]]), 6) for w in words[: tc.topics_json_top_n]],
                    **({"npmi": npmi[i]} if i < len(npmi) else {}), **({"c_v": cv[i]} if i < len(cv) else {})}
                   for i, words in enumerate(topics)],
    })
    out.write_bytes(f"{TOPICS_DIR}/model.pt", blob)
    out.write_json(f"{TOPICS_DIR}/metrics.json", metrics)
    stats = {"model": tc.model, "num_topics": tc.num_topics, "vocabulary": len(vocab), **train_stats, **theta_stats,
             "npmi": metrics.get("npmi"), "c_v": metrics.get("c_v"), "diversity": metrics["diversity"],
             "coherence_seconds": metrics["seconds"], "total_seconds": round(time.time() - t0, 3), **emb_stats}
    logger.info("topics: NPMI %s, C_V %s, diversity %.3f", stats["npmi"], stats["c_v"], stats["diversity"])
    return stats


# ---------------------------------------------------------------------------------------------
# CLI: embedjob topics OUTPUT
# ---------------------------------------------------------------------------------------------
def format_topics(topics_doc: dict[str, Any], metrics: Optional[dict[str, Any]] = None, n: int = 10) -> str:
    lines = []
    if metrics:
        parts = [f"{metrics.get('model', topics_doc.get('model'))}, K={topics_doc.get('num_topics')}"]
        if metrics.get("npmi") is not None:
            parts.append(f"NPMI {metrics['npmi']:.4f}")
        if metrics.get("c_v") is not None:
            parts.append(f"C_V {metrics['c_v']:.4f}")
        parts.append(f"diversity {metrics.get('diversity', float('nan')):.3f}")
        lines.append(", ".join(parts))
    for t in topics_doc["topics"]:
        score = []
        if "npmi" in t:
            score.append("npmi undefined" if t["npmi"] is None else f"npmi {t['npmi']:+.3f}")
        if "c_v" in t:
            score.append("c_v undefined" if t["c_v"] is None else f"c_v {t['c_v']:.3f}")
        lines.append(f"{t['topic']:3d} [{' '.join(score)}] {' '.join(t['words'][:n])}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``embedjob topics OUTPUT [--storage-option K=V] [--top N] [--json]``: print the topics and
    their coherence from a job's output."""
    import argparse

    import yaml

    from embedjob.storage import Storage, StorageError

    p = argparse.ArgumentParser(prog="embedjob topics", description="Print the topics of a job's topic model.")
    p.add_argument("output", help="job output URL (folder holding topics/)")
    p.add_argument("--storage-option", action="append", default=[], metavar="K=V",
                   help="fsspec option of the output storage (value parsed as YAML); repeatable")
    p.add_argument("--top", type=int, default=10, help="words printed per topic")
    p.add_argument("--json", action="store_true", help="print topics.json and metrics.json as one JSON object")
    args = p.parse_args(argv)
    opts: dict[str, Any] = {}
    for kv in args.storage_option:
        if "=" not in kv:
            p.error(f"--storage-option {kv!r}: expected K=V")
        k, v = kv.split("=", 1)
        node = opts
        parts = k.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(v)
    try:
        store = Storage(args.output, opts)
        if not store.exists(f"{TOPICS_DIR}/topics.json"):
            print(f"no topics at {store.url(TOPICS_DIR + '/topics.json')!r}: run the job with topics.enabled=true")
            return 1
        doc = store.read_json(f"{TOPICS_DIR}/topics.json")
        metrics = store.read_json(f"{TOPICS_DIR}/metrics.json") if store.exists(f"{TOPICS_DIR}/metrics.json") else None
    except (StorageError, OSError) as e:
        print(f"cannot read {args.output!r}: {e}")
        return 1
    if args.json:
        print(json.dumps({"topics": doc, "metrics": metrics}))
    else:
        print(format_topics(doc, metrics, args.top))
    return 0
