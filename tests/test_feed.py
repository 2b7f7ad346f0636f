"""Feeding the encoder: the vectorised static word alignment equals its per-token original, and
"encoder busy" (the encoder actors' computing / (computing + waiting)) moves when the preprocess
is made slow on purpose (EMBEDJOB_DEBUG_PREPROCESS_DELAY) against an encoder made slow
(EMBEDJOB_DEBUG_ENCODE_DELAY)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.debug import ENCODE_DELAY_ENV, ENCODER_READY_FILE_ENV, PREPROCESS_DELAY_ENV
from embedjob.pipeline import run_job
from embedjob.stages.encode.busy import BusyClock, busy_fraction, feed_bound_line, feed_plan
from embedjob.stages.preprocess import PreprocessConfig, build_filters, preprocess_texts
from embedjob.stages.static.align import _align_doc, align_doc_reference
from tests.conftest import SAMPLE_TEXTS
from tests.helpers import small_job

HARD_TEXTS = SAMPLE_TEXTS + [
    "Übermäßig große Käfer krabbelten über die Straße; naïve café-goers didn't mind.",
    "Numbers 12,345.67 and e-mail a.b@example.com, <b>tags</b> & URLs https://x.org/a?b=c",
    "unbelievably antidisestablishmentarianism tokenisation WordPiece pieces ##ing",
    "中文字符 mixed with English words and emoji 🙂 in one line.",
    "   leading   and   trailing   spaces   ",
    "x",
]


@pytest.mark.parametrize("truncated", [False, True])
def test_vectorised_alignment_equals_the_per_token_original(minilm_path, truncated):
    from embedjob.stages.encode import Tokenizer

    texts = HARD_TEXTS * 2 + [" ".join(HARD_TEXTS) * 3]
    tok = Tokenizer(minilm_path, 32, 64)  # cuts the long text: a word may be cut at the cap
    enc = tok.encode(texts, words=True)
    cfg = PreprocessConfig()
    filters = build_filters(cfg)
    tokens = preprocess_texts(texts, cfg, filters)
    for k, text in enumerate(texts):
        for allowed in (set(tokens[k]), None):
            got_ids, got_words = _align_doc(text, enc.word_ids[k], enc.offsets[k], truncated, allowed, filters)
            want_ids, want_words = align_doc_reference(text, enc.word_ids[k], enc.offsets[k], truncated, allowed,
                                                       filters)
            assert got_ids.tolist() == want_ids and got_words == want_words
    # word ids out of order (not BERT's, but the reference allows it): same answer
    wid, offs = [None, 1, 0, 1, None], [(0, 0), (4, 7), (0, 3), (8, 9), (0, 0)]
    got = _align_doc("the cat sat", wid, offs, False, None, filters)
    assert (got[0].tolist(), got[1]) == align_doc_reference("the cat sat", wid, offs, False, None, filters)


def test_busy_clock_and_the_feed_bound_line():
    clock = BusyClock()
    clock.arrive()
    wait, busy = clock.leave()
    assert wait >= 0 and busy >= 0 and clock.wait_s == wait and clock.busy_s == busy
    assert busy_fraction(3.0, 7.0) == pytest.approx(0.7)
    assert busy_fraction(0.0, 0.0) is None
    line = feed_bound_line(0.42, {"device": "cuda", "preprocess_concurrency": 6})
    assert "encoder busy 42%" in line and "more CPUs per GPU" in line and "encode.preprocess_concurrency" in line
    assert feed_bound_line(0.9, {}) is None
    plan = feed_plan(gpus=1, cpus=16, hidden_size=768, static=False, cpu_s_per_mtok=4.0)
    assert plan["cpus_per_gpu_needed"] == pytest.approx(8.8) and plan["preprocess_concurrency"] == 9
    assert plan["expected_busy"] == 1.0
    assert feed_plan(gpus=1, cpus=4, hidden_size=384, static=True, cpu_s_per_mtok=4.0)["expected_busy"] < 0.1


def _run_with(env: dict[str, str], tmp_path, tiny_model, name: str, caplog) -> dict:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        texts = [f"{t} Item {i}." for i in range(3) for t in SAMPLE_TEXTS]
        inp = tmp_path / f"in-{name}"
        inp.mkdir()
        pq.write_table(pa.table({"id": [f"d{i:03d}" for i in range(len(texts))], "text": texts}),
                       inp / "part-00000.parquet")
        cfg = small_job(inp, tmp_path / f"out-{name}", tiny_model, input={"rows_per_block": 6},
                        encode={"rows_per_call": 6, "progress_seconds": 0.5})
        caplog.clear()
        with caplog.at_level(logging.INFO):
            res = run_job(cfg)
        assert res.ok
        stats = json.loads((tmp_path / f"out-{name}" / "stats" / "encode.json").read_text())
        return {"busy": stats["encoder_busy"], "log": [r.getMessage() for r in caplog.records],
                "report": (tmp_path / f"out-{name}" / "report.html").read_text()}
    finally:
        ray.shutdown()


def test_encoder_busy_drops_when_the_preprocess_is_slow(tmp_path, tiny_model, caplog):
    # 6 blocks, each preprocessed in 1 s once the encoder actor is ready (so they cannot all be done
    # while it starts): the encoder waits for them; against an encoder that sleeps 0.5 s in every call.
    fed = _run_with({ENCODE_DELAY_ENV: "0.5"}, tmp_path, tiny_model, "encode-bound", caplog)
    starved = _run_with({PREPROCESS_DELAY_ENV: "1.0", ENCODER_READY_FILE_ENV: str(tmp_path / "encoder-ready")},
                        tmp_path, tiny_model, "feed-bound", caplog)
    assert starved["busy"] < 0.5 and fed["busy"] > starved["busy"] + 0.25, (fed["busy"], starved["busy"])
    assert any("the encoder is feed-bound" in m and "encode.preprocess_concurrency" in m for m in starved["log"])
    assert any(m.startswith("encode: ") and "encoder busy " in m for m in starved["log"])  # the progress line
    assert f"encoder busy {100 * starved['busy']:.0f}%" in starved["report"]  # report.html, the stage table


def test_gpu_check_feed_smoke_on_a_bare_host(tmp_path):
    """`.ci/gpu-check --feed` on CPU, with ray, gensim, faiss and pydantic unimportable (as on a bare
    GPU host, in the pool's processes too): the job's read and tokenizer feed the encoder from Parquet."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    blocked = tmp_path / "blocked"
    for name in ("ray", "gensim", "faiss", "pydantic"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on this host')\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocked), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(root / ".ci" / "gpu-check"), "--feed", "--device", "cpu", "--models", "tiny",
                        "--docs", "24", "--feed-workers", "1", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "out" / "gpu-check-feed.json").read_text())
    feed = report["models"][0]["feed"]
    assert feed["tokens"] > 24 and feed["tokens_per_s"] > 0 and 0 < feed["busy"] <= 1
    assert feed["gensim"] is False and feed["ids_only_tokens_per_s"] > 0 and feed["host_cores_used"] > 0
    assert "RESULT: ok" in (tmp_path / "out" / "gpu-check-feed.md").read_text()


def test_static_bookkeeping_helpers_equal_their_per_row_originals():
    """hook_for reads the word columns as flat Arrow buffers and finds each occurrence's first
    piece from runs: the same as the per-row lists and np.unique it replaced."""
    import numpy as np

    from embedjob.stages.static.accumulate import _first_positions, _list_parts

    rows = [[-1, 0, 0, 1, -1, 2, 2, 2, -1], [], [-1, -1], [-1, 1, 0, 0, 1, -1]]  # the last: out of order
    col = pa.chunked_array([pa.array(rows[:2], pa.list_(pa.int32())), pa.array(rows[2:], pa.list_(pa.int32()))])
    off, flat = _list_parts(col.slice(1))  # a sliced column: offsets rebased
    assert [flat[off[r]:off[r + 1]].tolist() for r in range(3)] == rows[1:]
    for t in rows:
        t = np.asarray(t, dtype=np.int64)
        n = int(t.max()) + 1 if len(t) and t.max() >= 0 else 0
        want = np.zeros(n, dtype=np.int64)
        at = np.flatnonzero(t >= 0)
        seen, first_at = np.unique(t[at], return_index=True)
        want[seen] = at[first_at]
        assert _first_positions(t, n).tolist() == want.tolist()


def test_gpu_plan_sizes_preprocessing_per_gpu_and_logs_it(tmp_path, tiny_model, caplog):
    """On a cluster with GPUs the plan sizes the preprocess tasks from the measured rates and logs
    the CPUs per GPU it takes; encode.preprocess_concurrency overrides the count."""
    from embedjob.cluster import plan_encoder

    cfg = small_job(tmp_path, tmp_path / "out", tiny_model, encode={"device": "cuda"})
    with caplog.at_level(logging.INFO, logger="embedjob.cluster"):
        plan = plan_encoder(cfg.encode, {"CPU": 16.0, "GPU": 2.0}, static=cfg.static.enabled)
    feed = plan["feed"]
    assert plan["actors"] == 2 and plan["preprocess_concurrency"] == feed["preprocess_concurrency"] >= 1
    assert feed["cpus_per_gpu"] == 7.0 and feed["cpus_per_gpu_needed"] > 0
    assert any("CPUs per GPU" in r.getMessage() and "preprocess tasks at once" in r.getMessage() for r in caplog.records)
    cfg = small_job(tmp_path, tmp_path / "out", tiny_model, encode={"device": "cuda", "preprocess_concurrency": 3})
    assert plan_encoder(cfg.encode, {"CPU": 16.0, "GPU": 2.0}, static=cfg.static.enabled)["preprocess_concurrency"] == 3
    cpu_only = small_job(tmp_path, tmp_path / "o", tiny_model)
    assert plan_encoder(cpu_only.encode, {"CPU": 2.0}, static=cpu_only.static.enabled)["preprocess_concurrency"] is None
