"""``TopicsConfig`` (the ``topics:`` settings, with their validators) and the model arguments and
encoder input they resolve to."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from embedjob._config_base import Section
from embedjob.errors import TopicsError
from embedjob.wordvectors import SAFE_FORMATS, is_pickle_name, pickle_refusal

EMBEDDING_SOURCES = ("auto", "word2vec", "bert", "learned")

# embeddings='auto' takes the job's Word2Vec only when it was trained on at least this many tokens:
# below it (a few thousand short documents) Word2Vec's vectors are mostly noise and the ETM's topics
# repeat each other (README, Benchmarks: `bench topics --suite`).
AUTO_WORD2VEC_MIN_TOKENS = 1_000_000


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
        "auto",
        description="ETM word embeddings rho: 'auto' = the job's word2vec vectors when the corpus has at least "
        f"{AUTO_WORD2VEC_MIN_TOKENS:,} tokens (Word2Vec of a smaller corpus is mostly noise), else the job's BERT "
        "static vectors when the static stage wrote them, else 'learned'; "
        "'word2vec' (<output>/word2vec/vectors.bin), 'bert' "
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
    epochs: int = Field(5, ge=1, description="Training epochs over the corpus (raised to reach min_steps).")
    min_steps: int = Field(
        400, ge=0,
        description="Train for at least this many optimisation steps: epochs are raised until they add up to it, "
        "so that a small corpus (one or two batches per epoch) is not left after a handful of steps, where "
        "the ETM's topics are still copies of each other. 5 epochs of mixed-en (174k documents, batch 2048) "
        "are 425 steps; 0 = exactly `epochs`.",
    )
    min_documents_seen: int = Field(
        200_000, ge=0,
        description="And train until each worker has gone through at least this many documents (epochs x its "
        "documents): on a corpus of a thousand documents 400 steps still leave duplicate topics, and more steps of "
        "small batches do not help as much as more passes at the same batch size (README, Benchmarks). "
        "5 epochs of mixed-en are 870k documents; 0 = no floor.",
    )
    min_batches_per_epoch: int = Field(
        8, ge=1,
        description="Lower batch_size on a small corpus so that an epoch has at least this many batches per "
        "worker (not below 64 documents): full-batch steps on a few thousand documents converge to fewer topics.",
    )
    label_column: Optional[str] = Field(
        None,
        description="A column of the input shards holding a label per document (e.g. a category): metrics.json "
        "then scores argmax theta against it (NMI, ARI). Null labels are left out. Read with the ids, by the "
        "theta pass; the column never reaches other outputs.",
    )
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
