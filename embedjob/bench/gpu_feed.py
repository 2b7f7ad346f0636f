"""`.ci/gpu-check --feed`: a GPU host end to end from Parquet, on a bare host (torch, transformers,
numpy, pyarrow, pyyaml, fsspec; no Ray, gensim, faiss or pydantic).

For each model shape it writes Parquet shards of synthetic texts (lengths from the shared corpus's
histogram), then runs the job's own code: a process pool over the host's cores reads blocks
(:func:`embedjob.stages.blocks.read_shard_blocks`), preprocesses them (gensim's chain when gensim
is installed; a bare host has none, and the report says so) and tokenises them
(:meth:`~embedjob.stages.encode.tokenizer.Tokenizer.encode_flat`, the job's own call with its
chunk cache, whole documents as the job's default windows), while the main process feeds the encoder (:class:`TextEncoder`, packed on CUDA) block
by block as they arrive. It reports tokens/s from Parquet, the encoder's busy fraction (seconds in
``encode_ids`` / wall), the host cores used (CPU seconds of all processes / wall), the encoder
process's own CPU seconds per million tokens (the most one encoder actor can hand its GPU) and the ids-only
rate of the same encoder on the same ids, with the targets: BERT-base busy >= 90%, MiniLM end to
end >= 50% of ids-only (on a GPU; on CPU the run is a smoke test of the plumbing).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from typing import Any, Optional

import numpy as np

logger = logging.getLogger("embedjob.gpu_check")

TARGETS = {"bert-base": ("busy", 0.9), "minilm-l6": ("vs_ids_only", 0.5)}
_TOKENIZER: Any = None


def _ready(_: int) -> bool:
    """(pool worker) Started: its initializer has loaded the tokenizer."""
    time.sleep(0.05)
    return _TOKENIZER is not None


def _init_worker(model_path: str, max_length: int, max_tokens: int) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from embedjob.stages.encode.tokenizer import Tokenizer

    _TOKENIZER = Tokenizer(model_path, max_length, max_tokens)


def _gensim_filters() -> Optional[Any]:
    try:
        from embedjob.stages.preprocess import PreprocessConfig, build_filters
    except ImportError:  # a bare GPU host: no gensim, no pydantic
        return None
    return build_filters(PreprocessConfig())


def feed_shard(task: tuple[str, str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(pool worker) One shard, block by block: read -> preprocess -> tokenise. Returns the flat
    ids, each document's id count and whole token count, and the worker's CPU seconds for it."""
    from embedjob.stages.blocks import read_shard_blocks

    url, key, rows_per_block = task
    c = time.process_time()
    shard = type("Shard", (), {"url": url, "key": key})()
    filters = _gensim_filters()
    ids, lengths, doc_tokens = [], [], []
    for b in read_shard_blocks(shard, {}, "id", "text", rows_per_block):
        texts = [t for t in b.column("text").to_pylist() if t and t.strip()]
        if filters is not None:
            from gensim import parsing

            [parsing.preprocess_string(t, filters) for t in texts]
        enc = _TOKENIZER.encode_flat(texts)  # the job's tokenisation (the chunk cache where it applies)
        ids.append(enc.ids)
        lengths.append(enc.counts)
        doc_tokens.append(enc.doc_tokens)

    def cat(parts: list, dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    return cat(ids, np.int32), cat(lengths, np.int64), cat(doc_tokens, np.int64), time.process_time() - c


def write_shards(root: str, texts: list[str], shards: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    urls = []
    for k in range(shards):
        part = texts[k::shards]
        url = os.path.join(root, f"part-{k:05d}.parquet")
        pq.write_table(pa.table({"id": [f"d{k}-{i}" for i in range(len(part))], "text": part}), url)
        urls.append(url)
    return urls


def run_feed(name: str, path: str, texts: list[str], max_length: int, args: Any, root: str) -> dict[str, Any]:
    """One model shape end to end from Parquet; the ids-only rate of the same encoder beside it."""
    from embedjob.stages.encode.encoder import TextEncoder
    from embedjob.stages.encode.settings import EncoderSettings
    from embedjob.stages.encode.windows import max_document_tokens

    settings = EncoderSettings(model=name, model_path=path, pooling="mean", normalize=False, max_length=max_length,
                               dtype=args.dtype, device=args.device, model_fingerprint=f"random-{name}",
                               long_documents="windows", window_overlap=32, max_windows=64)
    enc = TextEncoder(settings, batch_tokens=args.batch_tokens, max_batch_docs=max(256, args.batch_tokens // 16))
    workers = args.feed_workers or max(1, (os.cpu_count() or 2) - 1)
    rows = 1024  # the encoder's call, as encode.rows_per_call cuts the job's blocks
    urls = write_shards(os.path.join(root, f"feed-{name}"), texts, 4 * workers)  # a shard per task
    tasks = [(u, os.path.basename(u)[:-8], rows) for u in urls]
    enc.encode_ids([np.arange(8, dtype=np.int32) + 100])  # warm the encoder (kernels, allocator)
    res: dict[str, Any] = {"workers": workers, "shards": len(tasks),
                           "gensim": _gensim_filters() is not None}
    all_ids: list[np.ndarray] = []
    busy = tokens = worker_cpu = 0.0
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")  # no CUDA state forked into the workers
    with ctx.Pool(workers, initializer=_init_worker, initargs=(path, max_length, settings.max_document_tokens())) as pool:
        pool.map(_ready, range(2 * workers), chunksize=1)  # the workers' start (imports, tokenizer) is not timed
        c0, t_ready = time.process_time(), time.perf_counter()
        for flat, lengths, doc_tokens, cpu in pool.imap_unordered(feed_shard, tasks):
            ids = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
            t = time.perf_counter()
            out = enc.encode_ids(ids, doc_tokens=doc_tokens)
            busy += time.perf_counter() - t
            tokens += float(out.encoded_tokens.sum())
            worker_cpu += cpu
            if args.feed_ids_only:
                all_ids.extend(ids)
        wall = time.perf_counter() - t_ready
        feeder_cpu = time.process_time() - c0  # the encoder's process: what one encoder actor's thread does
        host_cpu = feeder_cpu + worker_cpu  # the feeding process and the pool's work
    res.update(tokens=int(tokens), wall_s=round(wall, 2), tokens_per_s=round(tokens / wall),
               busy=round(busy / wall, 3), host_cores_used=round(host_cpu / wall, 2),
               worker_cpu_s_per_mtok=round(worker_cpu / max(tokens, 1) * 1e6, 2),
               # the encoder's own process per token (kernel launches, window plan, packing, copies): one
               # process can hand its GPU at most 1e6 / this tokens/s (encode.actors_per_gpu in the job)
               encoder_process_cpu_s_per_mtok=round(feeder_cpu / max(tokens, 1) * 1e6, 3),
               pool_start_s=round(t_ready - t0, 2), max_document_tokens=max_document_tokens(max_length, 32, 64))
    if args.feed_ids_only:
        t = time.perf_counter()
        for i in range(0, len(all_ids), rows):
            enc.encode_ids(all_ids[i:i + rows])
        ids_rate = tokens / (time.perf_counter() - t)
        res.update(ids_only_tokens_per_s=round(ids_rate), vs_ids_only=round(res["tokens_per_s"] / ids_rate, 3))
    kind, floor = TARGETS.get(name, (None, None))
    if kind is not None and args.device.startswith("cuda"):
        res["target"] = f"{kind} >= {floor}"
        res["target_met"] = bool(res.get(kind, 0) >= floor)
    return res


def feed_table(report: dict[str, Any]) -> str:
    lines = [f"# embedjob gpu-check --feed — {report['device_name']} ({report['device']}, {report['dtype']}), "
             f"{report['host_cores']} host cores", "",
             "| model | tokens/s from Parquet | ids-only tokens/s | e2e / ids-only | encoder busy | host cores used "
             "| worker CPU-s per M tokens | encoder process CPU-s per M tokens | gensim | target |", "|---" * 10 + "|"]
    for m in report["models"]:
        f = m.get("feed") or {}
        target = f"{f['target']}: {'met' if f['target_met'] else 'NOT met'}" if "target" in f else ""
        lines.append(f"| {m['model']} | {f.get('tokens_per_s', 0):,} | {f.get('ids_only_tokens_per_s', 0):,} | "
                     f"{f.get('vs_ids_only', '')} | {100 * f.get('busy', 0):.0f}% | {f.get('host_cores_used')} | "
                     f"{f.get('worker_cpu_s_per_mtok')} | {f.get('encoder_process_cpu_s_per_mtok')} | "
                     f"{'yes' if f.get('gensim') else 'not installed'} | {target} |")
        for err in m.get("failures", []):
            lines.append(f"\nFAILED: {err}")
    lines.append("")
    lines.append("RESULT: " + ("FAILED" if report["failed"] else "ok"))
    return "\n".join(lines)
