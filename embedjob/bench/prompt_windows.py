"""How a prompt meets windows, measured: ``python -m embedjob.bench.prompt_windows [--corpus URL]``.

On MiniLM (real weights) with E5-style literal prompts: documents of the corpus that fit one
256-token window are the reference (prompt + text in one pass, as sentence-transformers encodes
them). The same documents are then cut into 64-token windows and encoded with the prompt starting
every window (what embedjob does) and with no prompt at all, each combined by the job's
token-weighted mean. Printed: the mean cosine of each to the reference, and the tokens each feeds
the model.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from embedjob.bench.corpus import DEFAULT_CORPUS
from embedjob.bench.encode import load_texts
from embedjob.bench.measure import row_cosines
from embedjob.stages.encode import EncodeConfig, TextEncoder

PROMPTS = ("passage: ", "Represent this document for retrieval: ")


def prompt_window_agreement(corpus: str, limit: int = 600, docs: int = 150, model: str = "all-MiniLM-L6-v2",
                            prompts: tuple[str, ...] = PROMPTS) -> list[dict[str, Any]]:
    texts = [t for t in load_texts(corpus, limit) if 600 < len(t) < 1000][:docs]

    def enc(**kw: Any) -> TextEncoder:
        return TextEncoder.from_config(EncodeConfig(model=model, dtype="float32", snap_to_sentences=False, **kw))

    out = []
    for prompt in prompts:
        ref = enc(prompt=prompt, max_length=256).encode_texts(texts)
        one = ref.windows == 1
        every = enc(prompt=prompt, max_length=64, window_overlap=8).encode_texts(texts)
        none = enc(prompt="", max_length=64, window_overlap=8).encode_texts(texts)
        out.append({"prompt": prompt, "documents": int(one.sum()), "mean_windows": float(every.windows[one].mean()),
                    "cosine_prompt_every_window": float(row_cosines(ref.vectors[one], every.vectors[one]).mean()),
                    "cosine_no_prompt": float(row_cosines(ref.vectors[one], none.vectors[one]).mean()),
                    "tokens_prompt_every_window": int(every.encoded_tokens[one].sum()),
                    "tokens_no_prompt": int(none.encoded_tokens[one].sum())})
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--docs", type=int, default=150)
    a = ap.parse_args()
    print(json.dumps(prompt_window_agreement(a.corpus, docs=a.docs), indent=1))  # noqa: T201 - a command's output
