"""The encoder settings as they are actually used (config + model folder + device), with no
dependency beyond numpy: importable on a bare GPU host (see ``.ci/gpu-check``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from embedjob.models import model_defaults, resolve_model_path

if TYPE_CHECKING:
    from embedjob.stages.encode.config import EncodeConfig

POOLING_MODES = ("mean", "cls", "max")
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

    def recipe_dict(self) -> dict[str, Any]:
        """The settings document vectors depend on (:data:`RECIPE_KEYS`, plus the window settings
        when documents are cut into windows)."""
        keys = RECIPE_KEYS + (WINDOW_RECIPE_KEYS if self.long_documents == "windows" else ())
        keys += ("write_chunks",) if self.write_chunks else ()
        keys += ("snap_to_sentences",) if self.snap_to_sentences and self.long_documents == "windows" else ()
        d = self.as_dict()
        return {k: d[k] for k in keys}

    def max_document_tokens(self) -> int:
        """The most token ids of one document the tokenizer keeps: ``max_length`` when truncating,
        ``max_windows`` windows' worth with windows."""
        if self.long_documents != "windows":
            return self.max_length
        from embedjob.stages.encode.windows import max_document_tokens

        return max_document_tokens(self.max_length, self.window_overlap, self.max_windows)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSettings":
        """From a recorded ``manifest["encoder"]`` (other keys, such as ``actors``, are ignored)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None})


def resolve_encoder_settings(cfg: "EncodeConfig", device: str = "cpu") -> EncoderSettings:
    """Model path, pooling, normalisation and max length as the config and model folder say."""
    path = resolve_model_path(cfg.model)
    d = model_defaults(path)
    pooling = d.pooling if cfg.pooling == "auto" else cfg.pooling
    normalize = d.normalize if cfg.normalize is None else cfg.normalize
    max_length = cfg.max_length or d.max_seq_length or 512
    with open(os.path.join(path, "config.json")) as f:
        dim = json.load(f).get("hidden_size")
    return EncoderSettings(recipe=ENCODER_RECIPE, dim=dim, model=cfg.model, model_path=path, pooling=pooling,
                           normalize=bool(normalize), max_length=int(max_length),
                           dtype=resolve_dtype(cfg.dtype, device), device=device,
                           backend=getattr(cfg, "backend", "torch"),
                           long_documents=getattr(cfg, "long_documents", "truncate"),
                           window_overlap=min(int(getattr(cfg, "window_overlap", 32)), (int(max_length) - 2) // 2),
                           max_windows=int(getattr(cfg, "max_windows", 64)),
                           window_pooling=getattr(cfg, "window_pooling", "mean"),
                           write_chunks=bool(getattr(cfg, "write_chunks", False)),
                           snap_to_sentences=bool(getattr(cfg, "snap_to_sentences", False)))
