"""The encoder settings as they are actually used (config + model folder + device), with no
dependency beyond numpy: importable on a bare GPU host (see ``.ci/gpu-check``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from embedjob.errors import ModelError
from embedjob.models import resolve_model_path
from embedjob.stages.encode.modules import output_dim, read_pipeline
from embedjob.stages.encode.tokenizer import Tokenizer
from embedjob.stages.encode.windows import max_document_tokens

if TYPE_CHECKING:
    from embedjob.stages.encode.config import EncodeConfig

ENCODER_RECIPE = "bert_docvec_v1"
# What document vectors depend on: hashed into the recipe (``pipeline.shard_stage_hash``). The window
# keys count only with ``long_documents: windows``, so a truncating job keeps its earlier recipe.
RECIPE_KEYS = ("model_fingerprint", "pooling", "normalize", "max_length", "recipe")
WINDOW_RECIPE_KEYS = ("long_documents", "window_overlap", "max_windows", "window_pooling")


def cpu_supports_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16, where bf16 matmuls are native."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on CUDA and bf16-capable CPUs, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_supports_bf16() else "float32"


@dataclass
class EncoderSettings:
    """The encoder settings as they are actually used: what the config and the model folder say,
    then the device and dtype the cluster gives, the model's fingerprint and its dimension. Handed
    to the encoder actors, hashed into the recipe, recorded in the manifest (:meth:`as_dict`)."""

    recipe: str = ENCODER_RECIPE
    dim: Optional[int] = None
    model: str = ""
    model_path: str = ""
    pooling: str = "mean"
    normalize: bool = False
    max_length: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    model_fingerprint: str = ""
    backend: str = "torch"
    # long documents: "truncate" here, so that a manifest written before windows existed reads back as it ran
    long_documents: str = "truncate"
    window_overlap: int = 32
    max_windows: int = 64
    window_pooling: str = "mean"
    write_chunks: bool = False
    snap_to_sentences: bool = False
    # the model's sentence-transformers pipeline (embedjob.stages.encode.modules): pooling above is its
    # modes joined by '+' ('cls', 'cls+mean'), then these heads (Dense, LayerNorm...), normalize last
    include_prompt: bool = True
    heads: list = dataclasses.field(default_factory=list)
    prompt: str = ""
    prompt_name: Optional[str] = None
    dimensions: Optional[int] = None  # Matryoshka: vectors cut to this many dimensions, then normalised
    do_lower_case: bool = False
    tokenizer_kwargs: dict = dataclasses.field(default_factory=dict)
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    transformer_path: str = ""
    trust_remote_code: bool = False
    head_tokens: int = 1  # tokens every window starts with ([CLS] and the prompt's)
    tail_tokens: int = 1  # tokens every window ends with ([SEP], </s>, EOS)
    architecture: str = ""  # config.json model_type
    batching: str = ""  # 'packed' or 'padded' (filled in where the encoder is built; the driver's guess)

    def recipe_dict(self) -> dict[str, Any]:
        """The settings document vectors depend on (:data:`RECIPE_KEYS`, plus the window settings
        when documents are cut into windows)."""
        keys = RECIPE_KEYS + (WINDOW_RECIPE_KEYS if self.long_documents == "windows" else ())
        keys += ("write_chunks",) if self.write_chunks else ()
        keys += ("snap_to_sentences",) if self.snap_to_sentences and self.long_documents == "windows" else ()
        # the module pipeline, prompt and dimensions, when they are not the plain mean/cls/max model's
        keys += ("heads",) if self.heads else ()
        keys += ("prompt",) if self.prompt else ()
        keys += ("include_prompt",) if self.prompt and not self.include_prompt else ()
        keys += ("dimensions",) if self.dimensions else ()
        keys += ("do_lower_case",) if self.do_lower_case else ()
        d = self.as_dict()
        return {k: d[k] for k in keys}

    def max_document_tokens(self) -> int:
        """The most token ids of one document the tokenizer keeps: ``max_length`` when truncating,
        ``max_windows`` windows' worth with windows."""
        if self.long_documents != "windows":
            return self.max_length
        return max_document_tokens(self.max_length, self.window_overlap, self.max_windows, self.head_tokens,
                                   self.tail_tokens)

    @property
    def pooling_modes(self) -> tuple[str, ...]:
        return tuple(self.pooling.split("+"))

    @property
    def skip_tokens(self) -> int:
        """Leading tokens of every window left out of pooling (the prompt's, with include_prompt false)."""
        return self.head_tokens if self.prompt and not self.include_prompt else 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSettings":
        """From a recorded ``manifest["encoder"]`` (other keys, such as ``actors``, are ignored)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None})


def resolve_encoder_settings(cfg: "EncodeConfig", device: str = "cpu") -> EncoderSettings:
    """The encoder settings as the config and the model folder's sentence-transformers pipeline say
    (pooling, heads, normalisation, max length, prompt, dimensions). Raises :class:`ModelError`
    naming the setting or the module for what cannot be encoded exactly."""
    path = resolve_model_path(cfg.model)
    trust = bool(cfg.trust_remote_code)
    pipe = read_pipeline(path, trust_remote_code=trust)
    model_dir = os.path.join(path, pipe.transformer_path)
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    hf_text = hf.get("text_config") or hf
    hidden = int(hf_text.get("hidden_size") or hf_text.get("d_model") or 0)
    pooling = pipe.pooling if cfg.pooling == "auto" else (cfg.pooling,)
    normalize = pipe.normalize if cfg.normalize is None else cfg.normalize
    prompt, prompt_name = _resolve_prompt(cfg, pipe)
    tok = _tokenizer(model_dir, pipe, prompt, trust)
    max_length = int(cfg.max_length or pipe.max_seq_length or _model_max_length(tok, hf_text) or 512)
    dim = output_dim(hidden, pooling, pipe.heads)
    dimensions = cfg.dimensions or pipe.truncate_dim
    if dimensions is not None and not 0 < int(dimensions) <= dim:
        raise ModelError(f"encode.dimensions={dimensions}: between 1 and the model's {dim} dimensions")
    head, tail = tok.head, tok.tail
    long_documents = cfg.long_documents
    if long_documents == "windows" and max_length - head - tail < 8:
        raise ModelError(f"encode.max_length={max_length} leaves {max_length - head - tail} tokens per window "
                         f"after {head + tail} special and prompt tokens; raise it or shorten the prompt")
    return EncoderSettings(recipe=ENCODER_RECIPE, dim=int(dimensions or dim), model=cfg.model, model_path=model_dir,
                           pooling="+".join(pooling), normalize=bool(normalize), max_length=max_length,
                           dtype=resolve_dtype(cfg.dtype, device), device=device,
                           backend=cfg.backend, long_documents=long_documents,
                           window_overlap=min(int(cfg.window_overlap), (max_length - head - tail) // 2),
                           max_windows=int(cfg.max_windows),
                           window_pooling=cfg.window_pooling,
                           write_chunks=bool(cfg.write_chunks),
                           snap_to_sentences=bool(cfg.snap_to_sentences),
                           include_prompt=pipe.include_prompt, heads=pipe.heads, prompt=prompt, prompt_name=prompt_name,
                           dimensions=int(dimensions) if dimensions else None, do_lower_case=pipe.do_lower_case,
                           tokenizer_kwargs=pipe.tokenizer_kwargs, model_kwargs=pipe.model_kwargs,
                           transformer_path=pipe.transformer_path, trust_remote_code=trust, head_tokens=head,
                           tail_tokens=tail, architecture=str(hf.get("model_type", "")),
                           batching=_batching_guess(cfg, hf, device))


def _resolve_prompt(cfg: "EncodeConfig", pipe) -> tuple[str, Optional[str]]:
    """``encode.prompt`` (a literal) over ``encode.prompt_name`` over the model's default prompt."""
    literal = cfg.prompt
    if literal is not None:
        return literal, None
    name = cfg.prompt_name or pipe.default_prompt_name
    if name is None:
        return "", None
    if name not in pipe.prompts:
        raise ModelError(f"encode.prompt_name={name!r} is not among the model's prompts "
                         f"({', '.join(sorted(pipe.prompts)) or 'none'}, in config_sentence_transformers.json)")
    return pipe.prompts[name], name


def _tokenizer(model_dir: str, pipe, prompt: str, trust: bool):
    try:
        return Tokenizer(model_dir, 512, prompt=prompt, do_lower_case=pipe.do_lower_case,
                         tokenizer_kwargs=pipe.tokenizer_kwargs, trust_remote_code=trust)
    except ValueError as e:
        raise ModelError(f"encode.model (folder {model_dir}): {e}") from None


def _model_max_length(tok, hf: dict) -> Optional[int]:
    """sentence-transformers' default: the tokenizer's model_max_length, capped at the model's
    max_position_embeddings."""
    limits = [int(x) for x in (getattr(tok.tok, "model_max_length", None), hf.get("max_position_embeddings"))
              if x is not None and 0 < int(x) < 1 << 30]
    return min(limits) if limits else None


def _batching_guess(cfg, hf: dict, device: str) -> str:
    """Which batches the encoder will run: packed for absolute-position BERT encoders where asked
    (``encode.batching``: packed, or auto on CUDA), padded otherwise."""
    batching = cfg.batching
    want = batching == "packed" or (batching == "auto" and device.startswith("cuda"))
    bert = hf.get("model_type") == "bert" and hf.get("position_embedding_type", "absolute") == "absolute"
    return "packed" if want and bert and cfg.backend == "torch" else "padded"
