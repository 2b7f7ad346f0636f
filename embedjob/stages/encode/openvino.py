"""The OpenVINO CPU backend of the encoder (``encode.backend: openvino``, the ``openvino`` extra).

The loaded torch model is exported once to OpenVINO IR (locally, from the model folder's weights:
no hub), cached in a folder keyed by the model fingerprint and the hidden layers asked for, and
compiled for the CPU in the job's precision (bf16 where the CPU has it). Batches stay padded (the
IR has dynamic batch and sequence dimensions).

Example::

    ov = OpenVinoEncoder(model, cache_dir, "sha256:...", dtype="bfloat16", layers=(), threads=2)
    last, extra = ov(input_ids, attention_mask)     # numpy in, numpy out
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "embedjob", "openvino")


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoEncoder:
    """An OpenVINO-compiled BERT forward: (input_ids, attention_mask) -> last hidden state, plus
    the hidden states of ``layers`` (Hugging Face ``hidden_states`` indices) when asked for."""

    def __init__(self, model: Any, cache_dir: str, fingerprint: str, *, dtype: str, layers: Sequence[int] = (),
                 threads: int = 0):
        import openvino as ov

        self.layers = tuple(layers)
        key = fingerprint.replace(":", "-")[:40] + ("-L" + "_".join(str(i) for i in self.layers) if self.layers else "")
        os.makedirs(cache_dir, exist_ok=True)
        xml = os.path.join(cache_dir, f"{key}.xml")
        if not os.path.exists(xml):
            self._export(model, xml)
        else:
            logger.info("encode: OpenVINO model from the cache %s", xml)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == "bfloat16" else "f32",
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(xml, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _export(self, model: Any, xml: str) -> None:
        """Trace the float32 model to IR and save it atomically (a half-written cache is never read)."""
        import openvino as ov
        import torch

        layers = self.layers

        class _Forward(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                res = self.m(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(layers))
                return (res.last_hidden_state,) + tuple(res.hidden_states[i] for i in layers)

        src = model.float().eval()
        example = (torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings of the one-time export
            ir = ov.convert_model(_Forward(src), example_input=example,
                                  input=[ov.PartialShape([-1, -1]), ov.PartialShape([-1, -1])])
        folder = os.path.dirname(xml)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=folder)
        try:
            tmp_xml = os.path.join(tmp, os.path.basename(xml))
            ov.save_model(ir, tmp_xml, compress_to_fp16=False)
            os.replace(tmp_xml[:-4] + ".bin", xml[:-4] + ".bin")
            os.replace(tmp_xml, xml)
        finally:
            for f in os.listdir(tmp):
                os.remove(os.path.join(tmp, f))
            os.rmdir(tmp)
        logger.info("encode: exported the model to OpenVINO IR at %s", xml)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        res = self.request.infer([input_ids, attention_mask])
        outs = [np.asarray(res[o]) for o in self.compiled.outputs]
        return outs[0], outs[1:]
