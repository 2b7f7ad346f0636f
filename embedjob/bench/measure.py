"""What the encoder benchmarks measure alike: FLOPs of a BERT encoder's forward pass and the dense
peaks of known accelerators (for MFU), and the cosine between two sets of vectors row by row."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

# Dense bf16/fp16 tensor peak (FLOP/s) of known accelerators; CPUs have no reliable published figure.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def flops_per_token(config: Any, seq_len: float) -> float:
    """Forward FLOPs per token of a BERT encoder: 2 x parameters in the layers' matmuls plus
    attention (QK^T and AV, each 2 x seq_len x hidden per token and layer)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    dense = 2 * layers * (4 * h * h + 2 * h * inter)
    attn = 2 * layers * 2 * seq_len * h
    return float(dense + attn)


def useful_flops(config: Any, lengths: np.ndarray) -> float:
    """FLOPs of the real tokens of documents of these lengths (no padding counted)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    mean_ctx = float((lengths ** 2).sum() / max(lengths.sum(), 1))
    return flops_per_token(config, mean_ctx) * float(lengths.sum())


def device_peak(device: str) -> Optional[float]:
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (0 where a row is all zeros)."""
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
