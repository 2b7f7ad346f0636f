"""`embedjob bench encode`: the encoder against sentence-transformers and against itself on Ray.

On the same documents, in one process:
  (a) sentence-transformers ``encode()`` with its defaults (fp32, batches of 32);
  (b) embedjob's :class:`~embedjob.stages.encode.TextEncoder` alone (token-budget batches, configured dtype);
  (c) the full ``embedjob run`` pipeline's encode stage on local Ray (read -> preprocess -> encode
      actors -> write), on the same documents written as Parquet shards.

Throughput is tokens/s (tokens = the model's input tokens after truncation, special tokens included;
with ``--long-documents windows``, the default, (b) and (c) are fed every window, (a) truncates, and
the cosine against (a) is taken over the documents that fit one window). Both ``long_documents``
modes are then timed on the same documents: tokens encoded, time, and time per token. Model loading is excluded from (a) and (b); for (c) the steady-state
rate is measured from the first encoded block to the last (the first block's tokens excluded), so
Ray's per-block overheads count but the actor's one-time model load does not; the end-to-end
stage rate including start-up is printed too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import numpy as np

from embedjob.bench.corpus import DEFAULT_CORPUS
from embedjob.bench.measure import device_peak, flops_per_token, row_cosines
from embedjob.config import build_config
from embedjob.pipeline import run_job
from embedjob.stages.encode import EncodeConfig, TextEncoder, cpu_supports_bf16
from embedjob.storage import Storage, list_shards

logger = logging.getLogger(__name__)


def load_texts(corpus: str, limit: int, text_column: str = "text", storage_options: Optional[dict] = None) -> list[str]:
    texts: list[str] = []
    for url in list_shards(corpus, storage_options or {}):
        col = Storage(url, storage_options or {}).read_parquet("", columns=[text_column]).column(text_column)
        texts.extend(t for t in col.to_pylist() if t and t.strip())
        if len(texts) >= limit:
            break
    return texts[:limit]


def run_bench(corpus: str, limit: int, model: str, dtype: str, batch_tokens: int, skip_pipeline: bool = False,
              device: str = "cpu", long_documents: str = "windows", rounds: int = 2) -> dict[str, Any]:
    texts = load_texts(corpus, limit)
    if not texts:
        raise SystemExit(f"no documents found at {corpus}")
    cfg = EncodeConfig(model=model, dtype=dtype, batch_tokens=batch_tokens, long_documents=long_documents)
    enc = TextEncoder.from_config(cfg, device=device)
    ids = enc.tokenizer(texts)
    lengths = np.array([len(x) for x in ids])
    logger.info("bench encode: %d documents, %d tokens (mean %.0f, max %d) from %s, long_documents=%s", len(texts),
                int(lengths.sum()), lengths.mean(), lengths.max(), corpus, long_documents)
    result = _encoder_rates(enc, texts, ids, lengths, batch_tokens, device)
    result["long_documents"] = long_document_rates(enc, texts, rounds)
    del enc
    if not skip_pipeline:
        result.update(_pipeline_rates(texts, result["tokens"], result["encoder_tokens_per_s"], model, dtype,
                                      batch_tokens, long_documents))
    return result


def long_document_rates(enc, texts: list[str], rounds: int = 2) -> dict[str, Any]:
    """``encode.long_documents`` truncate and windows on the same texts, tokenisation included (the
    encoder ``enc`` for its own mode, a second one with the same settings for the other), interleaved
    ``rounds`` times (the best round of each): tokens fed to the model, windows, seconds, tokens/s,
    and the cost per token of windows against truncation."""
    import dataclasses

    encs = {mode: enc if enc.settings.long_documents == mode else TextEncoder(
        dataclasses.replace(enc.settings, long_documents=mode), batch_tokens=enc.batch_tokens,
        max_batch_docs=enc.max_batch_docs, batching=enc.batching) for mode in ("truncate", "windows")}
    times: dict[str, list[float]] = {m: [] for m in encs}
    res = {}
    for e in encs.values():
        e.encode_texts(texts[:32])  # warm-up
    for _ in range(max(1, rounds)):
        for mode, e in encs.items():
            t = time.perf_counter()
            res[mode] = e.encode_texts(texts)
            times[mode].append(time.perf_counter() - t)
    out: dict[str, Any] = {"rounds": max(1, rounds)}
    for mode, r in res.items():
        tokens, dt = int(r.encoded_tokens.sum()), min(times[mode])
        out[mode] = {"tokens_encoded": tokens, "windows": int(r.windows.sum()), "capped": int(r.capped.sum()),
                     "seconds": round(dt, 3), "tokens_per_s": tokens / dt}
    r = res["windows"]
    out["document_tokens"] = int(r.n_tokens.sum())
    out["documents_over_max_length"] = int((r.n_tokens > enc.settings.max_length).sum())
    w, t = out["windows"], out["truncate"]
    out["windows_vs_truncate_tokens"] = w["tokens_encoded"] / max(t["tokens_encoded"], 1)
    out["windows_vs_truncate_seconds"] = w["seconds"] / max(t["seconds"], 1e-9)
    out["windows_vs_truncate_seconds_per_token"] = out["windows_vs_truncate_seconds"] / out["windows_vs_truncate_tokens"]
    return out


def _encoder_rates(enc, texts: list[str], ids: list, lengths: np.ndarray, batch_tokens: int,
                   device: str) -> dict[str, Any]:
    """(a) sentence-transformers with its defaults and (b) embedjob's encoder alone, on the same texts."""
    import torch
    from sentence_transformers import SentenceTransformer

    st_tokens = int(np.minimum(lengths, enc.settings.max_length).sum())  # (a) truncates at max_length
    st = SentenceTransformer(enc.settings.model_path, device=device)
    st.max_seq_length = enc.settings.max_length
    st.encode(texts[:32])  # warm-up
    t = time.perf_counter()
    ref = st.encode(texts, convert_to_numpy=True)
    ta = time.perf_counter() - t
    del st

    # (b) embedjob's encoder alone (tokenisation included, as in (a))
    enc.encode_ids(ids[:32])  # warm-up
    t = time.perf_counter()
    r = enc.encode_texts(texts)
    tb = time.perf_counter() - t
    got = r.vectors
    n_tokens = int(r.encoded_tokens.sum())
    # sentence-transformers truncates: compare the documents that fit in one window (all, when truncating)
    one = r.windows == 1
    ref, got = ref[one], got[one]
    cos = row_cosines(ref, got)
    result: dict[str, Any] = {
        "documents": len(texts), "tokens": n_tokens, "dtype": enc.settings.dtype, "device": device,
        "batch_tokens": batch_tokens, "torch_threads": torch.get_num_threads(),
        "sentence_transformers_tokens_per_s": st_tokens / ta,
        "encoder_tokens_per_s": n_tokens / tb,
        "ratio_vs_sentence_transformers": (n_tokens / tb) / (st_tokens / ta),  # tokens/s, each its own tokens
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }
    fpt = flops_per_token(enc.model.config, float((lengths ** 2).sum() / lengths.sum()))
    result["flops_per_token"] = fpt
    peak = device_peak(device)
    if peak:
        result["encoder_fraction_of_peak"] = n_tokens / tb * fpt / peak
    return result


def _pipeline_rates(texts: list[str], n_tokens: int, encoder_tokens_per_s: float, model: str, dtype: str,
                    batch_tokens: int, long_documents: str = "windows") -> dict[str, Any]:
    """(c) the pipeline's encode stage on local Ray, on ``texts`` written as 4 Parquet shards."""
    import pyarrow as pa
    import ray

    result: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="embedjob-bench-")
    try:
        store = Storage(os.path.join(tmp, "in"))
        shards = 4
        for s in range(shards):
            part = list(range(s, len(texts), shards))
            store.write_parquet(f"part-{s:05d}.parquet", pa.table({
                "id": [f"d{i}" for i in part], "text": [texts[i] for i in part]}), row_group_size=256)
        job = build_config({
            "input": {"url": os.path.join(tmp, "in"), "rows_per_block": 256},
            "output": {"url": os.path.join(tmp, "out")},
            "encode": {"model": model, "dtype": dtype, "batch_tokens": batch_tokens, "rows_per_call": 256,
                       "long_documents": long_documents},
        })
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        res = run_job(job)
        tc_total = time.perf_counter() - t
        st_enc = res.manifest["stages"]["encode"]
        # the steady-state rate needs two written blocks; a tiny run has one: fall back to the whole run's
        # the stage's own rates count whole documents' tokens: scale them to the tokens fed to the model
        fed = st_enc.get("encoded_tokens") or st_enc["bert_tokens"]
        rate = st_enc.get("steady_tokens_per_second") or st_enc["tokens_per_second"]
        result["pipeline_tokens_per_s"] = rate * fed / max(st_enc["bert_tokens"], 1)
        result["pipeline_end_to_end_tokens_per_s"] = n_tokens / tc_total
        result["pipeline_vs_encoder"] = result["pipeline_tokens_per_s"] / encoder_tokens_per_s
        result["pipeline_rows"] = res.manifest["totals"]["rows_out"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def batching_rates(corpus: str, limit: int, model: str, dtype: str, batch_tokens: int, device: str,
                   rounds: int) -> dict[str, Any]:
    """The encoder with packed and with padded batches on the same token ids, interleaved
    ``rounds`` times (the best round of each): tokens/s, their ratio, and the cosine between them."""
    texts = load_texts(corpus, limit)
    cfg = EncodeConfig(model=model, dtype=dtype, batch_tokens=batch_tokens)
    encs = {b: TextEncoder.from_config(cfg, device=device, batching=b) for b in ("padded", "packed")}
    ids = encs["padded"].tokenizer(texts)
    times: dict[str, list[float]] = {b: [] for b in encs}
    got = {}
    for b, enc in encs.items():
        enc.encode_ids(ids[:64])  # warm-up
    for _ in range(rounds):
        for b, enc in encs.items():
            t = time.perf_counter()
            got[b] = enc.encode_ids(ids)
            times[b].append(time.perf_counter() - t)
    tokens = int(got["padded"].encoded_tokens.sum())  # fed to the model (overlapping windows count twice)
    cos = row_cosines(got["padded"].vectors, got["packed"].vectors)
    padded = encs["padded"].counters
    return {"documents": len(texts), "tokens": tokens, "device": device, "dtype": encs["packed"].settings.dtype,
            "batch_tokens": batch_tokens, "rounds": rounds,
            "padded_tokens_per_s": tokens / min(times["padded"]), "packed_tokens_per_s": tokens / min(times["packed"]),
            "packed_vs_padded": min(times["padded"]) / min(times["packed"]),
            "padding_fraction": 1 - padded["tokens"] / max(padded["computed_tokens"], 1),
            "min_cosine_packed_vs_padded": float(cos.min())}


def backend_rates(corpus: str, limit: int, model: str, batch_tokens: int, rounds: int) -> dict[str, Any]:
    """On CPU, interleaved ``rounds`` times (the best round of each), tokenisation included everywhere:
    sentence-transformers' default (float32, batches of 32), its best configuration here (bfloat16 where
    the CPU has it, batches of 128; its OpenVINO backend where ``optimum-intel`` is installed), and
    embedjob's encoder with the torch and the OpenVINO backends; cosines against ST's default."""
    import importlib.util

    import torch
    from sentence_transformers import SentenceTransformer

    texts = load_texts(corpus, limit)
    half = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    # the same work as sentence-transformers: documents cut at max_length
    cfg = EncodeConfig(model=model, batch_tokens=batch_tokens, long_documents="truncate")
    encs = {b: TextEncoder.from_config(cfg.model_copy(update={"backend": b})) for b in ("torch", "openvino")}
    path = encs["torch"].settings.model_path
    st = SentenceTransformer(path, device="cpu")
    st_best = SentenceTransformer(path, device="cpu").to(half)
    runs: dict[str, Any] = {
        "st_default": lambda x: st.encode(x, batch_size=32),
        "st_best": lambda x: st_best.encode(x, batch_size=128, convert_to_tensor=True).float().numpy(),
    }
    if importlib.util.find_spec("optimum") is not None:
        st_ov = SentenceTransformer(path, device="cpu", backend="openvino")
        runs["st_openvino"] = lambda x: st_ov.encode(x, batch_size=128)
    for backend, enc in encs.items():
        runs[f"embedjob_{backend}"] = lambda x, enc=enc: enc.encode_texts(x).vectors
    for fn in runs.values():
        fn(texts[:32])  # warm-up
    tokens = sum(len(x) for x in encs["torch"].tokenizer(texts))
    times: dict[str, list[float]] = {k: [] for k in runs}
    out: dict[str, Any] = {}
    for _ in range(rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            out[k] = np.asarray(fn(texts), dtype=np.float32)
            times[k].append(time.perf_counter() - t)
    ref = out["st_default"]
    result: dict[str, Any] = {"documents": len(texts), "tokens": tokens, "rounds": rounds,
                              "dtype_best": str(half).replace("torch.", ""), "torch_threads": torch.get_num_threads()}
    for k in runs:
        cos = row_cosines(ref, out[k])
        result[f"{k}_tokens_per_s"] = tokens / min(times[k])
        result[f"{k}_min_cosine"] = float(cos.min())
    best_st = max(result[f"{k}_tokens_per_s"] for k in runs if k.startswith("st_"))
    for k in runs:
        if k.startswith("embedjob_"):
            result[f"{k}_vs_st_default"] = result[f"{k}_tokens_per_s"] / result["st_default_tokens_per_s"]
            result[f"{k}_vs_st_best"] = result[f"{k}_tokens_per_s"] / best_st
    return result


def run(args: argparse.Namespace) -> int:
    """``embedjob bench encode`` (flags in :mod:`embedjob.cli`)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bt = args.batch_tokens or EncodeConfig().batch_tokens_for(device)
    corpus = args.corpus or (os.path.abspath(DEFAULT_CORPUS) if os.path.isdir(DEFAULT_CORPUS)
                             else "data/gensim-corpus")
    if args.backends:
        r = backend_rates(corpus, args.limit, args.model, bt, args.rounds)
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"documents {r['documents']}, tokens {r['tokens']}, cpu, {r['torch_threads']} torch threads, "
              f"best of {r['rounds']} interleaved rounds, tokenisation included")
        for k in [k[: -len("_tokens_per_s")] for k in r if k.endswith("_tokens_per_s")]:
            extra = (f"   vs ST default {r[k + '_vs_st_default']:.2f}x, vs ST best {r[k + '_vs_st_best']:.2f}x"
                     if k.startswith("embedjob_") else "")
            print(f"{k:18s} {r[k + '_tokens_per_s']:10.0f} tokens/s   min cosine vs ST default "
                  f"{r[k + '_min_cosine']:.5f}{extra}")
        return 0
    if args.batching:
        r = batching_rates(corpus, args.limit, args.model, args.dtype, bt, device, args.rounds)
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"documents {r['documents']}, tokens {r['tokens']}, device {r['device']}, dtype {r['dtype']}, "
              f"batch_tokens {r['batch_tokens']}, best of {r['rounds']} interleaved rounds")
        print(f"padded batches: {r['padded_tokens_per_s']:10.0f} tokens/s   (padding {r['padding_fraction']:.1%})")
        print(f"packed batches: {r['packed_tokens_per_s']:10.0f} tokens/s   packed/padded = "
              f"{r['packed_vs_padded']:.2f}   min cosine {r['min_cosine_packed_vs_padded']:.5f}")
        return 0
    r = run_bench(corpus, args.limit, args.model, args.dtype, bt, args.no_pipeline, device,
                  args.long_documents or EncodeConfig().long_documents, args.rounds)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"documents {r['documents']}, tokens {r['tokens']}, device {r['device']}, dtype {r['dtype']}, "
          f"torch threads {r['torch_threads']}, batch_tokens {r['batch_tokens']}")
    print(f"(a) sentence-transformers encode(): {r['sentence_transformers_tokens_per_s']:10.0f} tokens/s")
    print(f"(b) embedjob encoder:               {r['encoder_tokens_per_s']:10.0f} tokens/s   "
          f"b/a = {r['ratio_vs_sentence_transformers']:.2f}   min cosine vs (a) = {r['min_cosine']:.5f}")
    if "pipeline_tokens_per_s" in r:
        print(f"(c) embedjob run, encode stage:     {r['pipeline_tokens_per_s']:10.0f} tokens/s   "
              f"c/b = {r['pipeline_vs_encoder']:.2f}   (end to end incl. Ray and model start-up: "
              f"{r['pipeline_end_to_end_tokens_per_s']:.0f} tokens/s)")
    ld = r["long_documents"]
    print(f"long documents: {ld['documents_over_max_length']} of {r['documents']} over max_length, "
          f"{ld['document_tokens']} document tokens; best of {ld['rounds']} interleaved rounds")
    for mode in ("truncate", "windows"):
        m = ld[mode]
        print(f"  {mode:8s}: {m['tokens_encoded']:10d} tokens encoded in {m['windows']} windows, {m['seconds']:8.2f} s, "
              f"{m['tokens_per_s']:10.0f} tokens/s, {m['capped']} capped")
    print(f"  windows/truncate: {ld['windows_vs_truncate_tokens']:.2f}x tokens, {ld['windows_vs_truncate_seconds']:.2f}x "
          f"time, {ld['windows_vs_truncate_seconds_per_token']:.2f}x time per token")
    if "encoder_fraction_of_peak" in r:
        print(f"encoder: {r['encoder_fraction_of_peak']:.1%} of the device's dense bf16 peak")
    else:
        print(f"achieved {r['encoder_tokens_per_s'] * r['flops_per_token'] / 1e9:.1f} GFLOP/s "
              "(no published peak for this device)")
    return 0
