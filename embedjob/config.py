"""The job spec: one typed, validated config, each field with its help text.

Layers are merged as defaults -> YAML file -> ``--set section.key=value`` overrides, then
validated before any Ray work starts. Every error names the key (and the file) at fault::

    cfg = load_job("jobs/local.yaml", overrides=["encode.dtype=float32"])
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from embedjob._config_base import Section
from embedjob.cluster import RayConfig
from embedjob.errors import ConfigError
from embedjob.stages.dedup import DedupConfig
from embedjob.stages.encode import EncodeConfig
from embedjob.stages.index import IndexConfig
from embedjob.stages.preprocess_config import PreprocessConfig
from embedjob.stages.read import InputConfig
from embedjob.stages.static import StaticConfig
from embedjob.stages.topics import TopicsConfig
from embedjob.stages.word2vec import Word2VecConfig
from embedjob.stages.write import OutputConfig


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
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Near-duplicates and clusters (off by default).")
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
