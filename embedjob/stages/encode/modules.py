"""A sentence-transformers model's module pipeline (``modules.json``), read and run as
sentence-transformers runs it: the Transformer's settings, the Pooling (every mode, combinations,
``include_prompt``, both config formats), then any Dense, LayerNorm, Dropout and Normalize modules.

Any other module type is refused with one line naming its path and type (never skipped: a skipped
module is a silently wrong vector), and so is code the model folder would have run (``auto_map``
in ``config.json``, or a module class outside ``sentence_transformers``) unless
``encode.trust_remote_code`` is set. Head weights are read from safetensors, or from a
``pytorch_model.bin`` with ``torch.load(weights_only=True)`` (no pickled code runs).

:func:`read_pipeline` reads JSON only (no torch); :func:`pool` and :class:`Heads` are the torch
side. Example::

    p = read_pipeline("/models/bge-small")
    p.pooling, p.heads, p.normalize          # ('cls',), [], True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from embedjob.errors import ModelError

logger = logging.getLogger(__name__)

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' old boolean keys, in the order it concatenates the modes
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
# Module class names this pipeline runs (the last part of the modules.json "type").
IMPLEMENTED = ("Transformer", "Pooling", "Dense", "LayerNorm", "Normalize", "Dropout")
HEAD_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HUB_KEYS = ("revision", "token", "cache_dir", "cache_folder", "local_files_only", "trust_remote_code")
_DTYPE_KEYS = ("torch_dtype", "dtype", "attn_implementation", "device_map")


@dataclass
class ModulePipeline:
    """What a model folder's sentence-transformers files say about how it turns text into a vector."""

    transformer_path: str = ""  # folder of the Hugging Face model, relative to the model folder
    max_seq_length: Optional[int] = None
    do_lower_case: bool = False
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    heads: list[dict[str, Any]] = field(default_factory=list)  # Dense / LayerNorm / Normalize after pooling
    normalize: bool = False  # the pipeline ends with Normalize
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: Optional[str] = None
    truncate_dim: Optional[int] = None
    remote_code: Optional[str] = None  # why loading would run the folder's own code, None if it would not


def _read_json(path: str, where: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{where}: {os.path.basename(path)} is not valid JSON: {e}") from None


def pooling_modes(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The pooling modes of a Pooling ``config.json``: the new ``pooling_mode`` (a name or a list),
    else the old booleans (mean when none is set), as sentence-transformers reads them."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for k, m in LEGACY_POOLING_KEYS.items() if cfg.get(k))
        return modes or ("mean",)
    return (mode,) if isinstance(mode, str) else tuple(mode)


def read_pipeline(path: str, *, trust_remote_code: bool = False) -> ModulePipeline:
    """The module pipeline of the model folder ``path``; a folder without ``modules.json`` is a plain
    Hugging Face model, mean-pooled (as sentence-transformers builds it). Raises :class:`ModelError`
    (one line, naming the module's path and type) for what it cannot run exactly."""
    where = f"encode.model (folder {path})"
    p = ModulePipeline()
    cfg_file = os.path.join(path, "config.json")
    modules_file = os.path.join(path, "modules.json")
    modules = _read_json(modules_file, where) if os.path.exists(modules_file) else []
    if not isinstance(modules, list):
        raise ModelError(f"{where}: modules.json holds a {type(modules).__name__}, not a list of modules")
    st_cfg_file = os.path.join(path, "config_sentence_transformers.json")
    if os.path.exists(st_cfg_file):
        st = _read_json(st_cfg_file, where)
        p.prompts = {k: v or "" for k, v in (st.get("prompts") or {}).items()}
        p.default_prompt_name = st.get("default_prompt_name") or None
        p.truncate_dim = st.get("truncate_dim")
    seen_pooling = False
    for i, m in enumerate(modules):
        mtype, mpath = str(m.get("type", "")), str(m.get("path", ""))
        name = mtype.rpartition(".")[2]
        label = f"{where}: module {i} (path {mpath!r}, type {mtype!r})"
        if not mtype.startswith("sentence_transformers.") and not trust_remote_code:
            raise ModelError(f"{where}: the model needs its own code to load (module {i}, path {mpath!r}, is custom "
                             f"code: type {mtype!r}); embedjob does not run it unless encode.trust_remote_code: true "
                             "(only for a folder whose code you trust)")
        if name not in IMPLEMENTED or (name == "Transformer") != (i == 0) or (name == "Pooling") != (i == 1):
            where_ok = "first" if name == "Transformer" else "second, after the Transformer" if name == "Pooling" \
                else "after the Pooling"
            why = ("is a module type embedjob does not run" if name not in IMPLEMENTED
                   else f"is out of place (embedjob runs it {where_ok})")
            raise ModelError(f"{label} {why}; embedjob runs Transformer, Pooling, then Dense, LayerNorm, "
                             "Dropout and Normalize modules, and refuses the rest rather than skip them")
        folder = os.path.join(path, mpath)
        if name == "Transformer":
            _read_transformer(p, folder, mpath, label)
        elif name == "Pooling":
            seen_pooling = True
            _read_pooling(p, folder, label)
        elif name == "Dropout":
            continue  # identity at inference
        else:
            p.heads.append(_read_head(name, folder, mpath, label))
    if modules and not seen_pooling:
        raise ModelError(f"{where}: modules.json has no Pooling module, so the model gives token vectors, not one "
                         "vector per text; embedjob encodes only models with a Pooling module")
    if p.heads and p.heads[-1]["type"] == "normalize":
        p.heads.pop()
        p.normalize = True
    _read_remote_code(p, os.path.join(path, p.transformer_path, "config.json") if modules else cfg_file, where)
    if p.remote_code and not trust_remote_code:
        raise ModelError(f"{where}: the model needs its own code to load ({p.remote_code}); embedjob does not run "
                         "it unless encode.trust_remote_code: true (only for a folder whose code you trust)")
    return p


def _read_remote_code(p: ModulePipeline, cfg_file: str, where: str) -> None:
    if not os.path.exists(cfg_file):
        return
    auto_map = _read_json(cfg_file, where).get("auto_map")
    if auto_map:
        p.remote_code = p.remote_code or f"config.json has auto_map {sorted(auto_map)}"


def _read_transformer(p: ModulePipeline, folder: str, rel: str, label: str) -> None:
    p.transformer_path = rel
    sb = None
    for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
        if os.path.exists(os.path.join(folder, name)):
            sb = _read_json(os.path.join(folder, name), label)
            break
    if not sb:
        return
    task = sb.get("transformer_task", "feature-extraction")
    out = ((sb.get("modality_config") or {}).get("text") or {}).get("method_output_name", "last_hidden_state")
    if task != "feature-extraction" or out != "last_hidden_state":
        raise ModelError(f"{label}: transformer_task {task!r} with output {out!r}; embedjob encodes "
                         "'feature-extraction' models pooled from 'last_hidden_state' only")
    p.max_seq_length = sb.get("max_seq_length")
    p.do_lower_case = bool(sb.get("do_lower_case", False))
    tk = dict(sb.get("processor_kwargs") or sb.get("tokenizer_args") or {})
    p.tokenizer_kwargs = {k: v for k, v in tk.items() if k not in _HUB_KEYS}
    mk = dict(sb.get("model_kwargs") or sb.get("model_args") or {})
    mk.update(sb.get("config_kwargs") or sb.get("config_args") or {})
    p.model_kwargs = {k: v for k, v in mk.items() if k not in _HUB_KEYS + _DTYPE_KEYS}


def _read_pooling(p: ModulePipeline, folder: str, label: str) -> None:
    cfg = _read_json(os.path.join(folder, "config.json"), label)
    modes = pooling_modes(cfg)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ModelError(f"{label}: pooling mode {bad or modes} unknown; valid: {', '.join(POOLING_MODES)}")
    p.pooling = modes
    p.include_prompt = bool(cfg.get("include_prompt", True))


def _files_hash(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if os.path.isfile(full):
            h.update(name.encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def _read_head(name: str, folder: str, rel: str, label: str) -> dict[str, Any]:
    if name == "Normalize":
        cfg = _read_json(os.path.join(folder, "config.json"), label) if os.path.exists(
            os.path.join(folder, "config.json")) else {}
        _check_io(cfg, label)
        return {"type": "normalize"}
    cfg = _read_json(os.path.join(folder, "config.json"), label)
    head: dict[str, Any] = {"type": name.lower(), "path": rel, "files": _files_hash(folder)}
    if not any(os.path.exists(os.path.join(folder, w)) for w in HEAD_WEIGHTS):
        raise ModelError(f"{label}: no weights ({' or '.join(HEAD_WEIGHTS)})")
    if name == "LayerNorm":
        head["dim"] = int(cfg["dimension"])
        return head
    _check_io(cfg, label)
    act = cfg.get("activation_function") or "torch.nn.modules.activation.Tanh"
    if not act.startswith("torch."):
        logger.warning("%s: activation %r is not a torch class; Tanh, as sentence-transformers does", label, act)
        act = "torch.nn.modules.activation.Tanh"
    head.update(in_features=int(cfg["in_features"]), out_features=int(cfg["out_features"]),
                bias=bool(cfg.get("bias", True)), activation=act, residual=bool(cfg.get("use_residual", False)))
    return head


def _check_io(cfg: dict[str, Any], label: str) -> None:
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") not in (None, "sentence_embedding"):
            raise ModelError(f"{label}: {key}={cfg[key]!r}; embedjob runs heads on the sentence embedding only")


def output_dim(hidden: int, pipeline_pooling: tuple[str, ...], heads: list[dict[str, Any]]) -> int:
    """The vector size the pipeline gives for a model of ``hidden`` size (before ``dimensions``)."""
    dim = hidden * len(pipeline_pooling)
    for h in heads:
        if h["type"] == "dense":
            dim = h["out_features"]
        elif h["type"] == "layernorm":
            dim = h["dim"]
    return dim


# -- torch side ---------------------------------------------------------------------------------

def pool(hidden: Any, mask: Any, modes: tuple[str, ...], skip: int = 0) -> Any:
    """Sentence vectors ``(N, len(modes) * hidden)`` (float32) from right-padded token vectors
    ``(N, W, hidden)`` and their mask ``(N, W)``, as sentence-transformers' Pooling computes them;
    ``skip``: leading tokens left out of pooling (the prompt, with ``include_prompt: false``)."""
    import torch

    h = hidden.float()
    m = mask.to(torch.int64)
    if skip:
        m = m.clone()
        m[:, :skip] = 0
    mf = m.unsqueeze(-1).to(h.dtype)
    out = []
    for mode in modes:
        if mode == "cls":
            idx = m.to(torch.int32).argmax(dim=1) if skip else torch.zeros(len(h), dtype=torch.long, device=h.device)
            out.append(h[torch.arange(len(h), device=h.device), idx.long()])
        elif mode == "max":
            out.append(h.masked_fill(mf == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            n = torch.clamp(mf.sum(1), min=1e-9)
            out.append((h * mf).sum(1) / (n if mode == "mean" else torch.sqrt(n)))
        elif mode == "weightedmean":
            w = mf * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
            out.append((h * w).sum(1) / torch.clamp(w.sum(1), min=1e-9))
        elif mode == "lasttoken":
            values, idx = m.flip(1).max(1)
            idx = torch.where(values == 0, h.shape[1] - 1, idx)
            last = h.shape[1] - idx - 1
            out.append((h * mf)[torch.arange(len(h), device=h.device), last])
        else:
            raise ValueError(f"pooling mode {mode!r}; valid: {', '.join(POOLING_MODES)}")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


class Heads:
    """The modules after pooling (Dense with its activation and residual, LayerNorm, Normalize), with
    their weights, applied in float32 in the pipeline's order."""

    def __init__(self, model_path: str, heads: list[dict[str, Any]], device: Any):
        import torch

        self.steps: list[Any] = []
        for h in heads:
            if h["type"] == "normalize":
                self.steps.append(("normalize", None))
                continue
            weights = _load_weights(os.path.join(model_path, h["path"]))
            if h["type"] == "layernorm":
                mod = torch.nn.LayerNorm(h["dim"])
                _load_into(mod, weights, "norm.", h["path"])
                self.steps.append(("layernorm", mod.to(device).eval()))
                continue
            lin = torch.nn.Linear(h["in_features"], h["out_features"], bias=h["bias"])
            _load_into(lin, weights, "linear.", h["path"])
            res = None
            if h["residual"] and h["in_features"] != h["out_features"]:
                res = torch.nn.Linear(h["in_features"], h["out_features"], bias=False)
                _load_into(res, weights, "residual.", h["path"])
                res = res.to(device).eval()
            self.steps.append(("dense", (lin.to(device).eval(), _activation(h["activation"]), h["residual"], res)))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, x: Any) -> Any:
        import torch.nn.functional as F

        x = x.float()
        for kind, mod in self.steps:
            if kind == "normalize":
                x = F.normalize(x, p=2, dim=-1)
            elif kind == "layernorm":
                x = mod(x)
            else:
                lin, act, residual, res = mod
                y = act(lin(x))
                x = y + (x if res is None else res(x)) if residual else y
        return x


def _activation(path: str) -> Any:
    """An activation ``torch.nn`` class by its dotted path (what sentence-transformers accepts
    without remote code: a ``torch.`` path to an ``nn.Module`` class), instantiated."""
    import importlib
    import inspect

    import torch

    mod_name, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(mod_name), cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise ModelError(f"encode.model: Dense activation {path!r} is not a torch.nn.Module class")
    return cls()


def _load_weights(folder: str) -> dict[str, Any]:
    import torch

    st = os.path.join(folder, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)


def _load_into(mod: Any, weights: dict[str, Any], prefix: str, rel: str) -> None:
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    missing, _ = mod.load_state_dict(state, strict=False)
    if missing:
        raise ModelError(f"encode.model: module {rel!r} has no weights for {', '.join(prefix + k for k in missing)}")
