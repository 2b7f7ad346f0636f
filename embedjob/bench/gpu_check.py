"""`.ci/gpu-check`: embedjob's encoder on a GPU, measured and checked in a few minutes on a bare host.

It needs torch (CUDA), transformers, sentence-transformers and numpy — no Ray, gensim, faiss or
pydantic, no model weights, no network. For each model shape (random weights: they do not change
speed) it builds a model folder with a synthetic WordPiece vocabulary, samples documents whose token
lengths follow the shared corpus's histogram (``data/token_lengths_mixed_en.json``), and measures,
in interleaved rounds:

* embedjob's :class:`~embedjob.stages.encode.encoder.TextEncoder`, packed (padding-free) and padded
  batches, in the chosen dtype: tokens/s on pre-tokenised ids (as the actors get them), achieved
  FLOP/s and the fraction of the device's dense peak (MFU, real tokens only), padding fraction,
  peak GPU memory; and tokens/s from texts, tokenisation included, as sentence-transformers counts;
* sentence-transformers ``encode()`` on the same folder and texts, in the same dtype, at its default
  batch size (32) and at 256;
* correctness: cosine of each device output against CPU float32 on the same weights (raw, and after
  removing the mean vector, which random weights make dominant), on a sample that includes the
  longest documents.

It writes ``gpu-check.json`` and ``gpu-check.md`` (a table) under ``--out`` and exits 1 on any
correctness failure (cosine under ``--min-cosine``, token counts that differ, a failed embedjob
run). Usage on a GPU host, from the repository root::

    .ci/gpu-check --out /tmp/gpu-check            # MiniLM-L6 and BERT-base shapes, ~20k documents
    .ci/gpu-check --device cpu --models tiny --docs 64 --rounds 1   # the plumbing, on any machine
    .ci/gpu-check --feed --out /tmp/gpu-feed     # end to end from Parquet (embedjob.bench.gpu_feed)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np

from embedjob.bench.gpu_models import SHAPES, build_model_dir, make_texts, sample_lengths
from embedjob.bench.measure import device_peak, row_cosines, useful_flops

logger = logging.getLogger("embedjob.gpu_check")

# --feed: the share of the synthetic texts' words that are new strings, so that the job's chunk cache
# misses about as often as on a real corpus (3.3% of mixed-en's chunks were new over its first 4 shards
# from an empty cache, `embedjob bench feed`) instead of never.
FEED_FRESH_WORDS = 0.05


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Cosine per document (min, mean), raw and with the reference's mean vector removed from both."""
    mu = ref.mean(0, keepdims=True)
    raw, centred = row_cosines(ref, got), row_cosines(ref - mu, got - mu)
    return {"min_cosine": float(raw.min()), "mean_cosine": float(raw.mean()),
            "min_centred_cosine": float(centred.min()), "mean_centred_cosine": float(centred.mean())}


class Timer:
    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def check_model(name: str, root: str, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    """Every measurement of one model shape; errors are recorded, not raised."""
    import torch

    from embedjob.stages.encode.settings import EncoderSettings

    res: dict[str, Any] = {"model": name, "failures": []}
    t0 = time.perf_counter()
    path = build_model_dir(root, name)
    max_length = SHAPES[name][1]
    lengths = sample_lengths(args.docs, max_length, rng)
    texts = make_texts(lengths, rng)
    res.update(documents=len(texts), tokens=int(lengths.sum()), mean_tokens=float(lengths.mean()),
               max_tokens=int(lengths.max()), max_length=max_length, setup_s=round(time.perf_counter() - t0, 1))

    def settings(device: str, dtype: str) -> EncoderSettings:
        return EncoderSettings(model=name, model_path=path, pooling="mean", normalize=False, max_length=max_length,
                               dtype=dtype, device=device, model_fingerprint=f"random-{name}")

    variants = _load_variants(settings, args, res)
    if not variants:
        return res
    first = next(iter(variants.values()))
    ids = first.tokenizer(texts)
    got_lengths = np.array([len(x) for x in ids])
    if not np.array_equal(got_lengths, lengths):
        res["failures"].append(f"tokenised lengths differ from the sampled ones in "
                               f"{int((got_lengths != lengths).sum())} documents")
    res["attention"] = {k: getattr(v.packed, "attention", None) for k, v in variants.items()}
    res["batching"] = {k: v.batching for k, v in variants.items()}
    st_models = _load_st(path, max_length, args, res)
    _check_agreement(variants, st_models, ids, texts, settings, args, rng, res)
    _check_windows(settings, max_length, args, rng, res)
    timed = _time_rounds(variants, st_models, ids, texts, args, res)
    res["rows"] = _rows(variants, st_models, timed, useful_flops(first.model.config, got_lengths),
                        float(got_lengths.sum()), device_peak(args.device), res)
    del variants, st_models, first
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def _load_variants(settings: Any, args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """embedjob's encoder in each batching to measure (packed at two budgets, padded, compiled)."""
    from embedjob.stages.encode.encoder import TextEncoder

    variants: dict[str, Any] = {}
    plan = [("packed", args.batch_tokens, False), ("packed", args.batch_tokens * 4, False),
            ("padded", args.batch_tokens, False)]
    if args.compile:
        plan.append(("packed", args.batch_tokens * 4, True))
    for batching, bt, compiled in plan:
        key = f"embedjob {batching} {bt // 1024}k" + (" compiled" if compiled else "")
        try:
            enc = TextEncoder(settings(args.device, args.dtype), batch_tokens=bt,
                              max_batch_docs=max(256, bt // 16), batching=batching, compile=compiled)
            if compiled and getattr(enc.packed, "compiled", None) is None:
                res.setdefault("notes", []).append(f"{key}: torch.compile does not apply here")
                continue
            variants[key] = enc
        except Exception as e:  # noqa: BLE001 - reported in the table
            res["failures"].append(f"{key}: could not load: {type(e).__name__}: {e}")
    return variants


def _load_st(path: str, max_length: int, args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """sentence-transformers on the same folder, in the same dtype, at batch sizes 32 and 256."""
    import torch

    st_models: dict[str, Any] = {}
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device=args.device)
        st.max_seq_length = max_length
        st.to(getattr(torch, args.dtype))
        for bs in (32, 256):
            st_models[f"sentence-transformers bs{bs}"] = (st, bs)
    except Exception as e:  # noqa: BLE001
        res["st_error"] = f"{type(e).__name__}: {e}"
    return st_models


def _check_agreement(variants: dict[str, Any], st_models: dict[str, Any], ids: list, texts: list[str],
                     settings: Any, args: argparse.Namespace, rng: np.random.Generator, res: dict[str, Any]) -> None:
    """Correctness on a sample with the longest documents, against CPU float32 (the model's own
    forward); a compiled variant that fails is noted and dropped from ``variants``."""
    from embedjob.stages.encode.encoder import TextEncoder

    got_lengths = np.array([len(x) for x in ids])
    order = np.argsort(-got_lengths)
    sample = np.unique(np.concatenate([order[:32], rng.choice(len(ids), size=min(len(ids), args.check_docs),
                                                               replace=False)]))
    ref_enc = TextEncoder(settings("cpu", "float32"), batch_tokens=8192, batching="padded")
    ref = ref_enc.encode_ids([ids[j] for j in sample]).vectors
    del ref_enc
    res["agreement"] = {}
    for key, enc in list(variants.items()):
        try:
            got = enc.encode_ids([ids[j] for j in sample]).vectors
            agr = agreement(ref, got)
            res["agreement"][key] = agr
            if not np.isfinite(got).all() or agr["min_cosine"] < args.min_cosine:
                res["failures"].append(f"{key}: min cosine vs CPU float32 {agr['min_cosine']:.5f} "
                                       f"< {args.min_cosine}")
        except Exception as e:  # noqa: BLE001
            if key.endswith("compiled"):  # an optional speed-up that this torch cannot build: noted, dropped
                res.setdefault("notes", []).append(f"{key}: {type(e).__name__}: {str(e)[:300]}")
                del variants[key]
            else:
                res["failures"].append(f"{key}: {type(e).__name__}: {e}")
    for key, (st, bs) in st_models.items():
        try:
            got = st.encode([texts[j] for j in sample], batch_size=bs, convert_to_tensor=True,
                            show_progress_bar=False).float().cpu().numpy()
            res["agreement"][key] = agreement(ref, got)
        except Exception as e:  # noqa: BLE001
            res["st_error"] = f"{type(e).__name__}: {e}"


def _check_windows(settings: Any, max_length: int, args: argparse.Namespace, rng: np.random.Generator,
                   res: dict[str, Any]) -> None:
    """Long documents cut into windows (encode.long_documents=windows), packed on the device vs CPU float32."""
    from embedjob.stages.encode.encoder import TextEncoder

    try:
        long_texts = make_texts(np.full(24, 3 * max_length + 50), rng, sentence=15)
        windows = {"long_documents": "windows", "snap_to_sentences": True}  # as a job runs by default
        w_ref = TextEncoder(dataclasses.replace(settings("cpu", "float32"), **windows),
                            batch_tokens=8192, batching="padded").encode_texts(long_texts)
        w_got = TextEncoder(dataclasses.replace(settings(args.device, args.dtype), **windows),
                            batch_tokens=args.batch_tokens, batching="packed").encode_texts(long_texts)
        agr = agreement(w_ref.vectors, w_got.vectors)
        res["agreement"]["embedjob packed, windows"] = agr
        res["windows"] = {"documents": len(long_texts), "windows": int(w_got.windows.sum())}
        if agr["min_cosine"] < args.min_cosine or not np.array_equal(w_ref.windows, w_got.windows):
            res["failures"].append(f"windows: min cosine vs CPU float32 {agr['min_cosine']:.5f}")
    except Exception as e:  # noqa: BLE001
        res["failures"].append(f"windows: {type(e).__name__}: {e}")


def _time_rounds(variants: dict[str, Any], st_models: dict[str, Any], ids: list, texts: list[str],
                 args: argparse.Namespace, res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Speed: warm-up, then interleaved rounds (seconds per round from ids and from texts, peak
    memory, padding fraction of each variant)."""
    runs: dict[str, list[float]] = {}
    text_runs: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    padding: dict[str, float] = {}
    for key, enc in variants.items():
        enc.encode_ids(ids[: min(len(ids), 512)])
    for key, (st, bs) in st_models.items():
        st.encode(texts[: min(len(texts), 512)], batch_size=bs, show_progress_bar=False)
    for _ in range(args.rounds):
        for key, enc in variants.items():
            if any(f.startswith(key) for f in res["failures"]):
                continue
            before = dict(enc.counters)
            _peak_reset(args.device)
            with Timer(args.device) as t:
                enc.encode_ids(ids)
            runs.setdefault(key, []).append(t.seconds)
            memory[key] = _peak_gib(args.device) or 0.0
            computed = enc.counters["computed_tokens"] - before["computed_tokens"]
            padding[key] = 1 - (enc.counters["tokens"] - before["tokens"]) / max(computed, 1)
            with Timer(args.device) as t:
                enc.encode_texts(texts)
            text_runs.setdefault(key, []).append(t.seconds)
        for key, (st, bs) in st_models.items():
            try:
                _peak_reset(args.device)
                with Timer(args.device) as t:
                    st.encode(texts, batch_size=bs, convert_to_tensor=True, show_progress_bar=False)
                text_runs.setdefault(key, []).append(t.seconds)
                memory[key] = _peak_gib(args.device) or 0.0
            except Exception as e:  # noqa: BLE001
                res["st_error"] = f"{type(e).__name__}: {e}"
    return {"runs": runs, "text_runs": text_runs, "memory": memory, "padding": padding}


def _rows(variants: dict[str, Any], st_models: dict[str, Any], timed: dict[str, dict[str, Any]], flops: float,
          tokens: float, peak: Optional[float], res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One table row per variant: the best round's tokens/s, TFLOP/s, MFU, padding, memory,
    agreement, and the ratio to sentence-transformers."""
    runs, text_runs, memory, padding = timed["runs"], timed["text_runs"], timed["memory"], timed["padding"]
    rows = {}
    for key in list(variants) + list(st_models) + ["embedjob packed, windows"]:
        row: dict[str, Any] = {}
        if key in runs:
            best = min(runs[key])
            row.update(tokens_per_s=tokens / best, tflops=flops / best / 1e12, padding_fraction=padding.get(key))
            if peak:
                row["mfu"] = flops / best / peak
        if key in text_runs:
            row["text_tokens_per_s"] = tokens / min(text_runs[key])
        row["peak_gib"] = memory.get(key)
        row.update(res["agreement"].get(key, {}))
        rows[key] = row
    st_best = max((rows[k].get("text_tokens_per_s", 0) for k in st_models), default=0)
    st_default = rows.get("sentence-transformers bs32", {}).get("text_tokens_per_s")
    for key in variants:
        if "text_tokens_per_s" in rows[key] and st_default:
            rows[key]["vs_st_default"] = rows[key]["text_tokens_per_s"] / st_default
            rows[key]["vs_st_best"] = rows[key]["text_tokens_per_s"] / st_best
    return rows


def table(report: dict[str, Any]) -> str:
    cols = ["tokens/s (ids)", "TFLOP/s", "MFU", "padding", "tokens/s (texts)", "vs ST bs32", "vs ST best",
            "min cos", "min centred cos", "peak GiB"]
    lines = [f"# embedjob gpu-check — {report['device_name']} ({report['device']}, {report['dtype']})", "",
             f"torch {report['torch']}, transformers {report['transformers']}, "
             f"sentence-transformers {report.get('sentence_transformers')}, peak {report.get('peak_tflops')} TFLOP/s",
             ""]

    def fmt(v: Any, kind: str) -> str:
        if v is None:
            return ""
        return {"int": f"{v:,.0f}", "f1": f"{v:.1f}", "pct": f"{v:.1%}", "x": f"{v:.2f}x",
                "cos": f"{v:.5f}", "gib": f"{v:.2f}"}[kind]

    for m in report["models"]:
        lines += [f"## {m['model']}: {m.get('documents')} documents, {m.get('tokens')} tokens "
                  f"(mean {m.get('mean_tokens', 0):.0f}, max {m.get('max_tokens')}, max_length {m.get('max_length')}); "
                  f"attention {m.get('attention')}", "",
                  "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for key, r in m.get("rows", {}).items():
            vals = [fmt(r.get("tokens_per_s"), "int"), fmt(r.get("tflops"), "f1"), fmt(r.get("mfu"), "pct"),
                    fmt(r.get("padding_fraction"), "pct"), fmt(r.get("text_tokens_per_s"), "int"),
                    fmt(r.get("vs_st_default"), "x"), fmt(r.get("vs_st_best"), "x"), fmt(r.get("min_cosine"), "cos"),
                    fmt(r.get("min_centred_cosine"), "cos"), fmt(r.get("peak_gib"), "gib")]
            lines.append(f"| {key} | " + " | ".join(vals) + " |")
        for f in m.get("notes", []):
            lines.append(f"\nnote: {f}")
        for f in m.get("failures", []):
            lines.append(f"\nFAILED: {f}")
        if m.get("st_error"):
            lines.append(f"\nsentence-transformers: {m['st_error']}")
        lines.append("")
    lines.append("RESULT: " + ("FAILED" if report["failed"] else "ok"))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=".ci/gpu-check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32/float16")
    p.add_argument("--models", default="minilm-l6,bert-base", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--docs", type=int, default=20000, help="documents per model")
    p.add_argument("--check-docs", type=int, default=480, help="documents compared with CPU float32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (the best is reported)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token budget of one batch (also x4 packed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure torch.compile'd packed layers (encode.compile)")
    p.add_argument("--min-cosine", type=float, default=0.999, help="fail below this cosine vs CPU float32")
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--feed", action="store_true", help="end to end from Parquet instead: the job's read, preprocess "
                   "and tokenizer in a process pool over the host's cores feeding the encoder (gpu-check-feed.json/.md)")
    p.add_argument("--feed-workers", type=int, default=None, help="--feed: pool processes (default: cores - 1)")
    p.add_argument("--feed-ids-only", action=argparse.BooleanOptionalAction, default=True,
                   help="--feed: also time the encoder alone on the same ids (the ids-only rate)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import sentence_transformers
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # no load report per model folder

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    peak = device_peak(args.device)
    report: dict[str, Any] = {
        "device": args.device, "dtype": args.dtype, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__, "peak_tflops": peak / 1e12 if peak else None,
        "models": [],
    }
    rng = np.random.default_rng(0)
    if args.feed:
        return _main_feed(args, report, rng)
    with tempfile.TemporaryDirectory(prefix="embedjob-gpu-check-") as root:
        for name in args.models.split(","):
            logger.info("gpu-check: %s", name)
            t = time.perf_counter()
            try:
                m = check_model(name.strip(), root, args, rng)
            except Exception as e:  # noqa: BLE001 - one model's crash is reported, the next still runs
                m = {"model": name, "failures": [f"crashed: {type(e).__name__}: {e}"]}
            m["seconds"] = round(time.perf_counter() - t, 1)
            report["models"].append(m)
            logger.info("gpu-check: %s done in %.0f s", name, m["seconds"])
    return _write_report(args.out, "gpu-check", report, table)


def _main_feed(args: argparse.Namespace, report: dict[str, Any], rng: np.random.Generator) -> int:
    """``--feed``: every model shape end to end from Parquet (:mod:`embedjob.bench.gpu_feed`)."""
    from embedjob.bench.gpu_feed import feed_table, run_feed

    report["host_cores"] = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="embedjob-gpu-feed-") as root:
        for name in args.models.split(","):
            name = name.strip()
            m: dict[str, Any] = {"model": name, "failures": []}
            try:
                path = build_model_dir(root, name)
                max_length = SHAPES[name][1]
                lengths = sample_lengths(args.docs, 4 * max_length, rng)  # whole documents: longer than a window
                m["feed"] = feed = run_feed(name, path, make_texts(lengths, rng, sentence=20, fresh=FEED_FRESH_WORDS),
                                             max_length, args, root)
                if feed.get("target_met") is False:
                    m["failures"].append(f"target {feed['target']} not met")
                logger.info("gpu-check --feed: %s %s", name, feed)
            except Exception as e:  # noqa: BLE001 - one model's crash is reported, the next still runs
                m["failures"].append(f"crashed: {type(e).__name__}: {e}")
            report["models"].append(m)
    return _write_report(args.out, "gpu-check-feed", report, feed_table)


def _write_report(out: str, stem: str, report: dict[str, Any], to_text: Any) -> int:
    """``<out>/<stem>.json`` and ``<stem>.md`` (``to_text(report)``, also printed); exit 1 on any failure."""
    report["failed"] = any(m.get("failures") for m in report["models"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = to_text(report)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
