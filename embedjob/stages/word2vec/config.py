"""The ``word2vec:`` section of the job config: every setting of the Word2Vec / FastText stage."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from embedjob._config_base import Section
from embedjob.wordvectors import SAFE_FORMATS, is_pickle_name, pickle_refusal


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
