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
from embedjob.stages.encode.busy import BusyClock, PoolPlan, busy_fraction, feed_bound_line, feed_plan
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
    line = feed_bound_line(0.42, PoolPlan("cuda", 1, 1, 1.0, 2, preprocess_concurrency=6))
    assert "encoder busy 42%" in line and "more CPUs per GPU" in line and "encode.preprocess_concurrency" in line
    assert feed_bound_line(0.9, PoolPlan("cpu", 1, 0, 1.0, 1)) is None
    plan = feed_plan(gpus=1, cpus=16, hidden_size=768, static=False, cpu_s_per_mtok=4.0)
    assert plan["cpus_per_gpu_needed"] == pytest.approx(8.8) and plan["preprocess_concurrency"] == 9
    assert plan["expected_busy"] == 1.0
    assert feed_plan(gpus=1, cpus=4, hidden_size=384, static=True, cpu_s_per_mtok=4.0)["expected_busy"] < 0.1


def test_feed_plan_grows_the_static_rates_with_the_model_width():
    """With static vectors the plan's CPU per token grows with the model's width from the bench's
    32 dimensions (the sums, staged parts and commit merge are dim floats per word); without, or with
    a rate given, it does not; an unknown width is taken as BERT-base's, as the GPU rate is."""
    from embedjob.stages.encode.busy import (
        ACTOR_CPU_S_PER_MTOK,
        FEED_CPU_S_PER_MTOK,
        STATIC_CPU_S_PER_MTOK_PER_DIM,
    )

    def plan(hidden, static, **kw):
        return feed_plan(gpus=1, cpus=16, hidden_size=hidden, static=static, **kw)

    assert plan(32, True)["cpu_s_per_mtok"] == FEED_CPU_S_PER_MTOK["static"]
    assert plan(384, True)["cpu_s_per_mtok"] == pytest.approx(
        FEED_CPU_S_PER_MTOK["static"] + 352 * STATIC_CPU_S_PER_MTOK_PER_DIM["feed"])
    assert plan(768, True)["actor_cpu_s_per_mtok"] == pytest.approx(
        ACTOR_CPU_S_PER_MTOK["static"] + 736 * STATIC_CPU_S_PER_MTOK_PER_DIM["actor"])
    assert plan(None, True)["cpu_s_per_mtok"] == plan(768, True)["cpu_s_per_mtok"] > plan(384, True)["cpu_s_per_mtok"]
    assert plan(768, False)["cpu_s_per_mtok"] == plan(32, False)["cpu_s_per_mtok"] == FEED_CPU_S_PER_MTOK["plain"]
    assert plan(768, True, cpu_s_per_mtok=2.0)["cpu_s_per_mtok"] == 2.0
    # BERT-base with static vectors needs more CPUs per GPU than the 32-dimension rate said
    assert plan(768, True)["cpus_per_gpu_needed"] > 2.2 * FEED_CPU_S_PER_MTOK["static"]


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
        # the progress actor ended with the per-shard stages (it does not idle through the corpus stages)
        from ray._private.state import actors
        alive = [a for a in actors().values() if a.get("ActorClassName", "").endswith("ProgressCounter")
                 and a.get("State") not in ("DEAD", 4)]
        assert not alive, alive
        return {"busy": stats["encoder_busy"], "model_cpu_s": stats["encoder_model_cpu_s"],
                "compute_s": stats["encoder_compute_s"], "log": [r.getMessage() for r in caplog.records],
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
    # the actors' CPU inside the model's forward passes reaches the stats (bench feed leaves it out of
    # the feed efficiency); the encode-bound run's 0.5 s sleeps are computing time, not model CPU
    assert 0 < fed["model_cpu_s"] < fed["compute_s"] - 2.5, fed
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
    assert feed["encoder_process_cpu_s_per_mtok"] > 0  # what one encoder actor's thread costs per token
    table = (tmp_path / "out" / "gpu-check-feed.md").read_text()
    assert "RESULT: ok" in table and "encoder process CPU-s per M tokens" in table


def _hook_reference(tok_inst, first_pos, inst_slot, idx, spans, S):
    """The accumulator's per-row original: each window row's pieces, occurrences and slots."""
    import numpy as np

    pos, inst, slots = [], [], []
    offset = 0
    for r, j in enumerate(idx):
        col0, a, b, lo, hi = (int(x) for x in spans[r])
        t = tok_inst[j]
        p = np.arange(a, min(b, len(t)), dtype=np.int64)
        p = p[t[p] >= 0]
        fp = first_pos[j][t[p]]
        p = p[(fp >= lo) & (fp < hi)]
        if not len(p):
            continue
        taken, local = np.unique(t[p], return_inverse=True)
        pos.append(r * S + p - col0)
        inst.append(offset + local)
        slots.append(inst_slot[j][taken])
        offset += len(taken)
    if not offset:
        return None
    return np.concatenate(pos), np.concatenate(inst), np.concatenate(slots), offset


def test_static_window_bookkeeping_equals_the_per_row_original():
    """hook_for's token-to-occurrence arrays, over all kept rows at once, and the hook's pieces of a
    model batch (windows of several documents, overlapping, owned ranges, out-of-order rows,
    dropped rows): the same positions, occurrences and slots, in the same order, as the per-row
    lists and loop they replaced."""
    import numpy as np

    from embedjob.stages.static.accumulate import _CallState, _instances, _list_parts, window_pieces

    rows = [[-1, 0, 0, 1, -1, 2, 2, 2, -1], [], [-1, -1], [-1, 1, 0, 0, 1, -1], [-1] + [0, 1, 1, 2, 3] * 3 + [-1]]
    rows[4] = [-1] + [w for k in range(8) for w in [k, k]] + [-1]  # 8 words of two pieces
    n_words = [3, 0, 0, 2, 8]
    col = pa.chunked_array([pa.array(rows[:2], pa.list_(pa.int32())), pa.array(rows[2:], pa.list_(pa.int32()))])
    off, flat = _list_parts(col.slice(1))  # a sliced column: offsets rebased
    assert [flat[off[r]:off[r + 1]].tolist() for r in range(4)] == rows[1:]
    w_off, wid_flat = _list_parts(col)
    x_off = np.concatenate([[0], np.cumsum(n_words)])
    for keep in (np.ones(5, bool), np.array([True, False, True, True, True])):
        tok_inst, tok_base, first_tok = _instances(wid_flat, w_off, x_off, keep)
        kept = np.flatnonzero(keep)
        ref_t = [np.asarray(rows[i], dtype=np.int64) for i in kept]
        ref_first, ref_slot, at = [], [], 0
        for i, t in zip(kept, ref_t):
            first = np.zeros(n_words[i], dtype=np.int64)
            w = np.flatnonzero(t >= 0)
            seen, first_at = np.unique(t[w], return_index=True)
            first[seen] = w[first_at]
            ref_first.append(first)
            ref_slot.append(np.arange(at, at + n_words[i]) * 7 % 5)  # any slot per occurrence
            at += n_words[i]
        assert tok_inst.tolist() == [x + b if x >= 0 else -1 for t, b in zip(ref_t, np.cumsum([0] + [n_words[i] for i in kept])) for x in t.tolist()]
        st = _CallState([], np.zeros(1, np.int64), np.zeros(0), [], np.zeros(0), tok_inst, tok_base, first_tok,
                        np.concatenate(ref_slot), None)
        last = len(kept) - 1  # the long document, in windows of 6 positions owning 4 each
        spans = np.array([[0, 0, 9, 0, 9], [0, 0, 4, 0, 4], [-1, 1, 7, 1, 5], [3, 3, 9, 5, 9], [7, 7, 13, 9, 13],
                          [11, 11, 18, 13, 18], [0, 0, 2, 0, 2]])
        idx = np.array([0, 0, last, last, last, last, 1 if len(kept) > 4 else 0])
        for order in (np.arange(len(idx)), np.array([3, 0, 5, 2, 6, 1, 4]), np.array([6])):
            got = window_pieces(st, idx[order], spans[order], 20)
            want = _hook_reference(ref_t, ref_first, ref_slot, idx[order], spans[order], 20)
            assert (got is None) == (want is None) and (got is not None or len(order) == 1)
            if got is not None:
                assert all(g.tolist() == w.tolist() for g, w in zip(got[:3], want[:3])) and got[3] == want[3]


def test_gpu_plan_sizes_preprocessing_per_gpu_and_logs_it(tmp_path, tiny_model, caplog):
    """On a cluster with GPUs the plan sizes the preprocess tasks from the measured rates and logs
    the CPUs per GPU it takes; encode.preprocess_concurrency overrides the count."""
    from embedjob.cluster import plan_encoder

    cfg = small_job(tmp_path, tmp_path / "out", tiny_model, encode={"device": "cuda"})
    with caplog.at_level(logging.INFO, logger="embedjob.cluster"):
        plan = plan_encoder(cfg.encode, {"CPU": 16.0, "GPU": 2.0}, static=cfg.static.enabled)
    feed = plan.feed
    assert plan.actors == 2 and plan.preprocess_concurrency == feed["preprocess_concurrency"] >= 1
    assert feed["cpus_per_gpu"] == 7.0 and feed["cpus_per_gpu_needed"] > 0
    assert any("CPUs per GPU" in r.getMessage() and "preprocess tasks at once" in r.getMessage() for r in caplog.records)
    cfg = small_job(tmp_path, tmp_path / "out", tiny_model, encode={"device": "cuda", "preprocess_concurrency": 3})
    assert plan_encoder(cfg.encode, {"CPU": 16.0, "GPU": 2.0}, static=cfg.static.enabled).preprocess_concurrency == 3
    cpu_only = small_job(tmp_path, tmp_path / "o", tiny_model)
    assert plan_encoder(cpu_only.encode, {"CPU": 2.0}, static=cpu_only.static.enabled).preprocess_concurrency is None


def test_feed_plan_counts_what_the_encoder_actors_own_threads_can_hand_a_gpu(tmp_path, tiny_model, caplog):
    """One actor's Python thread does the CPU work around each model call: at a GPU's rate that thread
    can set the pace. The plan says how many actors per GPU keep it busy, and encode.actors_per_gpu
    puts them there (num_gpus=1/N each), the CPUs for the preprocess tasks counted after them."""
    from embedjob.cluster import plan_encoder

    # 2.2M tokens/s (BERT-base) at 0.69 CPU-s per million on one thread: 1.45M tokens/s, 2 actors needed
    one = feed_plan(gpus=1, cpus=32, hidden_size=768, static=True, actor_cpu_s_per_mtok=0.69)
    assert one["actors_per_gpu_needed"] == 2 and one["actors_feed_tokens_per_s"] == round(1e6 / 0.69)
    assert one["expected_busy"] == pytest.approx(round(1e6 / 0.69 / 2.2e6, 2))
    two = feed_plan(gpus=1, cpus=32, hidden_size=768, static=True, actor_cpu_s_per_mtok=0.69, actors_per_gpu=2)
    assert two["expected_busy"] == 1.0 and two["cpus_per_gpu"] == one["cpus_per_gpu"] - 1  # a CPU per actor
    cfg = small_job(tmp_path, tmp_path / "out", tiny_model, encode={"device": "cuda"})
    with caplog.at_level(logging.INFO, logger="embedjob.cluster"):
        plan = plan_encoder(cfg.encode, {"CPU": 64.0, "GPU": 2.0}, static=True)
    assert (plan.actors, plan.num_gpus) == (2, 1)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("encoder actor(s) per GPU hand it at most" in m and "encode.actors_per_gpu=" in m for m in msgs), msgs
    caplog.clear()
    cfg = small_job(tmp_path, tmp_path / "out", tiny_model, encode={"device": "cuda", "actors_per_gpu": 4})
    with caplog.at_level(logging.INFO, logger="embedjob.cluster"):
        plan = plan_encoder(cfg.encode, {"CPU": 64.0, "GPU": 2.0}, static=False)
    assert (plan.actors, plan.num_gpus) == (8, 0.25) and plan.feed["actors_per_gpu"] == 4
    assert plan.feed["cpus_per_gpu"] == (64 - 8) / 2
    msgs = [r.getMessage() for r in caplog.records]
    assert any("8 GPU actor(s), 4 per GPU (num_gpus=0.25 each" in m for m in msgs), msgs
    assert not any("hand it at most" in m for m in msgs)  # BERT-shaped tiny model, 4 actors: fed
    cpu = small_job(tmp_path, tmp_path / "c", tiny_model, encode={"actors_per_gpu": 2})
    assert plan_encoder(cpu.encode, {"CPU": 8.0}, static=False).num_gpus == 0  # CPU actors: ignored


class _TransformersCallTokenizer:
    """The job's Tokenizer as it was: every call through transformers' ``tok(...)`` (BatchEncoding)."""

    @staticmethod
    def make(path: str, *args, **kwargs):
        from embedjob.stages.encode.tokenizer import Tokenizer, _Encoding

        class Old(Tokenizer):
            def _call(self, texts, special, words):
                trunc = special and not self.whole_documents
                if special and self.prompt:
                    texts = [self.prompt + t for t in texts]
                enc = self.tok(texts, truncation=trunc, max_length=self.max_length if trunc else None,
                               add_special_tokens=special, return_attention_mask=False, return_token_type_ids=False,
                               return_offsets_mapping=words)
                return [_Encoding(enc["input_ids"][j], enc.word_ids(j) if words else None,
                                  enc["offset_mapping"][j] if words else None) for j in range(len(texts))]

        return Old(path, *args, **kwargs)


@pytest.mark.parametrize("kind", ["minilm", "roberta", "xlmr", "qwen"])
def test_tokenizer_on_the_rust_encodings_equals_the_transformers_call(kind, minilm_path, tmp_path):
    """The Tokenizer reads the Rust encodings directly (no BatchEncoding; ids alone through
    ``encode_batch_fast``, which skips the offsets): the same ids, whole counts, word ids and offsets
    as transformers' call, truncated or whole, with a prompt, and for a text tokenised in pieces;
    WordPiece, byte-level BPE (both layouts) and Unigram."""
    from embedjob.stages.encode.tokenizer import Tokenizer
    from tests.models_zoo import _bpe_tokenizer

    path = minilm_path
    if kind != "minilm":
        path = str(tmp_path / kind)
        _bpe_tokenizer(kind).save_pretrained(path)
    texts = HARD_TEXTS + [" ".join(HARD_TEXTS) * 4, ""]
    for args, kw in [((16,), {}), ((16, 64), {}), ((16, 64), {"prompt": "query: "}), ((16,), {"prompt": "query: "}),
                     ((16, 300), {"piece_chars": 64}), ((16,), {"piece_chars": 64, "call_chars": 100})]:
        new, old = Tokenizer(path, *args, **kw), _TransformersCallTokenizer.make(path, *args, **kw)
        for words in (False, True):
            a, b = new.encode(texts, words=words), old.encode(texts, words=words)
            assert a.ids == b.ids and a.doc_tokens.tolist() == b.doc_tokens.tolist(), (kind, args, kw)
            assert a.word_ids == b.word_ids and a.offsets == b.offsets, (kind, args, kw)
        assert [x.tolist() for x in new(texts[:3])] == [x.tolist() for x in old(texts[:3])]


def _word_slots_reference(words_all, x_off, run_of, keep):
    """hook_for's per-occurrence original: slot_of.setdefault((run, word)) row by row, and attach's
    per-run lists sorted by word."""
    import numpy as np

    slot_of: dict = {}
    inst_slot = []
    for row in np.flatnonzero(keep).tolist():
        run = int(run_of[row])
        for word in words_all[x_off[row]:x_off[row + 1]]:
            inst_slot.append(slot_of.setdefault((run, word), len(slot_of)))
    by_run: list = [[] for _ in range(int(run_of.max()) + 1 if len(run_of) else 0)]
    for (run, word), s in slot_of.items():
        by_run[run].append((word, s))
    return inst_slot, slot_of, [[s for _, s in sorted(items)] for items in by_run]


def test_vectorised_word_slots_equal_the_per_occurrence_original():
    """The static accumulator's slots (one per row run and word, in order of first occurrence),
    each run's word order for its part, and the counts: Arrow dictionary encoding and numpy, the
    same as the dict it replaced; with dropped rows, empty rows, repeats across runs and a column
    slice."""
    import numpy as np

    from embedjob.stages.static.accumulate import _list_parts, slots_by_run, word_slots

    rng = np.random.default_rng(0)
    vocab = ["cat", "cats", "Zebra", "über", "dog", "a", "b", "éa", "ea", "z", "𝔘x", "日本", "ｚ", ""]
    rows = [[vocab[i] for i in rng.integers(0, len(vocab), rng.integers(0, 9))] for _ in range(40)] + [[]]
    col = pa.chunked_array([pa.array(rows[:7], pa.list_(pa.string())), pa.array(rows[7:], pa.list_(pa.string()))])
    for sl in (col, col.slice(3)):
        off, flat = _list_parts(sl)
        n = len(off) - 1
        four = np.repeat(np.arange(4), [n // 4, n // 4, n // 4, n - 3 * (n // 4)])
        for run_of, keep in [(r, k) for r in (four, np.zeros(n, np.int64))
                             for k in (np.ones(n, bool), rng.random(n) > 0.3, np.zeros(n, bool))]:
            occ, slot_run, slot_arr = word_slots(flat, off, run_of, keep)
            slot_word = slot_arr.to_pylist()
            want, slot_of, want_order = _word_slots_reference(flat.to_pylist(), off, run_of, keep)
            assert occ.tolist() == want
            assert {(int(r), w): s for s, (r, w) in enumerate(zip(slot_run, slot_word))} == slot_of
            n_runs = int(run_of.max()) + 1
            order, bounds = slots_by_run(slot_run, slot_arr, n_runs)
            assert [order[bounds[k]:bounds[k + 1]].tolist() for k in range(n_runs)] == want_order[:n_runs]
            assert np.bincount(occ, minlength=len(slot_word)).tolist() == np.bincount(want, minlength=len(slot_of)).tolist()


def test_id_arrays_equal_the_python_lists():
    """The encoder actor reads _input_ids as views of the column's flat buffer: equal to to_pylist."""
    import numpy as np

    from embedjob.stages.encode.actor import id_arrays

    rows = [[101, 5, 102], [], None, [101, 102], [7] * 40]
    col = pa.chunked_array([pa.array(rows[:2], pa.list_(pa.int32())), pa.array(rows[2:], pa.list_(pa.int32()))])
    for c in (col, col.slice(1), col.slice(2, 2), col.slice(5)):
        got = id_arrays(c)
        assert [x.tolist() for x in got] == [x or [] for x in c.to_pylist()]
        assert all(x.dtype == np.int32 for x in got)


TRICKY_TEXTS = [
    "a,,b;;c  d\t\te\n\nf 12ab34 x1y2 <p>tag  text</p> <a href='x'>link</a> 3.14 -- ok!!",
    "Ends with punctuation... and (nested [brackets]) {braces} ~tilde~ `code` \"quoted\" 'single'",
    "non\u00a0breaking\u2003em\u2009thin spaces\u200band zero-width; CR\r\nLF \x0bVT \x0cFF",
    "UPPER lower MiXeD 2024-01-01 v2.0.1 #hash @user $100 50% a&b c|d e^f g_h i=j k+l",
    "running runners ran easily fairly happiness generously relational conditional",
    "", "   ", "!!!", "12345", "<<>>", "a", "ab",
]


def test_filter_chain_equals_gensim_preprocess_string():
    """The fused filter chain (regexes called directly, token filters on one split, whitespace collapse
    skipped where it cannot change the tokens, translate for punctuation and digits, cached stems)
    gives gensim's preprocess_string tokens exactly: the default chains and 40 random ones, over
    texts with runs of punctuation, digits, tags and unusual whitespace."""
    import gc
    import random

    from gensim.parsing import preprocess_string

    from embedjob.stages.preprocess import FilterChain, gc_paused
    from embedjob.stages.preprocess_config import DEFAULT_FILTERS, GENSIM_DEFAULT_FILTERS, GENSIM_FILTERS
    from embedjob.stages.static.align import normalize_word, normalize_words

    texts = HARD_TEXTS + TRICKY_TEXTS + [t.upper() + " " + t for t in SAMPLE_TEXTS]
    words = sorted({w for t in texts for w in t.split()})
    # words the joined run must not mix up: tag brackets (strip_tags matches across words), the
    # sentinel itself, words the chain splits or drops
    odd = [["<b", "y>", "zqx1jkv", "don't", "the", "", "x1y2", "<i>", "C3PO"], ["<b", "x>", "zqx<b>jkv"],
           ["zqxjkv", "ZQXJKV", "a-zqxjkv", "the"]]
    rng = random.Random(0)
    chains = [DEFAULT_FILTERS, GENSIM_DEFAULT_FILTERS, ["strip_punctuation", "strip_multiple_whitespaces"],
              ["strip_multiple_whitespaces", "strip_tags"], ["remove_stopwords", "lower", "strip_short"]]
    chains += [rng.sample(GENSIM_FILTERS, rng.randint(1, len(GENSIM_FILTERS))) for _ in range(40)]
    for filters in chains:
        cfg = PreprocessConfig(filters=filters, min_token_length=rng.randint(1, 4), extra_stopwords=["Cats"])
        chain, ref = FilterChain(cfg), build_filters(cfg)
        assert [chain(t) for t in texts] == [preprocess_string(t, ref) for t in texts], filters
        assert preprocess_texts(texts + [None], cfg, chain) == preprocess_texts(texts + [None], cfg, ref)
        assert [normalize_word(w, chain) for w in words] == [normalize_word(w, ref) for w in words], filters
        # new words normalised by one run of the chain over them joined (a fresh chain: an empty cache)
        for some in odd + [odd[0] + words]:
            assert normalize_words(some, FilterChain(cfg)) == [normalize_word(w, ref) for w in some], filters
        assert normalize_words(words[:40], ref) == [normalize_word(w, ref) for w in words[:40]], filters
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.parametrize("kind", ["minilm", "roberta", "xlmr"])
def test_batch_alignment_equals_the_per_token_original(kind, minilm_path, tmp_path):
    """align_words aligns a whole batch at once (numpy over tokens and words, Arrow for the surface
    strings and the membership in each row's gensim tokens): the same _word_ids and _words as the
    per-token original row by row, with empty rows, truncated and windowed, with and without the
    tokens column; WordPiece, byte-level BPE and Unigram (NFKC) offsets, non-ASCII text."""
    import numpy as np

    from embedjob.schema import TOKENS, WORD_IDS, WORDS
    from embedjob.stages.encode import Tokenizer
    from embedjob.stages.preprocess import FilterChain, is_empty
    from embedjob.stages.static.align import align_batch, align_words
    from tests.models_zoo import _bpe_tokenizer

    path = minilm_path
    if kind != "minilm":
        path = str(tmp_path / kind)
        _bpe_tokenizer(kind).save_pretrained(path)
    texts = HARD_TEXTS + TRICKY_TEXTS + [" ".join(HARD_TEXTS) * 3, "naïve café 🙂 Übermäßig " * 30]
    cfg = PreprocessConfig()
    chain, ref = FilterChain(cfg), build_filters(cfg)
    empty = is_empty(texts)
    tokens = preprocess_texts(texts, cfg, chain)
    table = pa.table({"text": texts, TOKENS: pa.array(tokens, pa.list_(pa.string()))})
    for tok in (Tokenizer(path, 32), Tokenizer(path, 32, 64), Tokenizer(path, 512)):
        todo = [i for i in range(len(texts)) if not empty[i]]
        enc = tok.encode([texts[i] for i in todo], words=True)
        for t in (table, table.drop_columns([TOKENS]), table.slice(5, 9)):
            rows = range(5, 14) if t.num_rows == 9 else range(len(texts))
            out = align_words(t, [texts[i] for i in rows], empty[list(rows)], tok, chain)
            want_wid, want_words = [], []
            for i in rows:
                if empty[i]:
                    want_wid.append([]), want_words.append([])
                    continue
                k = todo.index(i)
                cut = enc.capped(k) if tok.whole_documents else len(enc.ids[k]) >= tok.max_length
                allowed = set(tokens[i]) if TOKENS in t.column_names else None
                w, words = align_doc_reference(texts[i], enc.word_ids[k], enc.offsets[k], cut, allowed, ref)
                want_wid.append(w), want_words.append(words)
            assert out.column(WORD_IDS).to_pylist() == want_wid, (kind, tok.max_tokens)
            assert out.column(WORDS).to_pylist() == want_words, (kind, tok.max_tokens)
            assert out.schema.field(WORD_IDS).type == pa.list_(pa.int32())
            assert out.schema.field(WORDS).type == pa.list_(pa.string())
    # word ids out of order (no BERT tokenizer's): the per-document path, the same answer
    wid, offs = [None, 1, 0, 1, None], [(0, 0), (4, 7), (0, 3), (8, 9), (0, 0)]
    got = align_batch(["the cat sat"], np.array([-1, 1, 0, 1, -1]), np.array(offs), np.array([5]), np.array([False]),
                      None, ref)
    assert (got[0].to_pylist()[0], got[1].to_pylist()[0]) == align_doc_reference("the cat sat", wid, offs, False,
                                                                                  None, ref)


def test_static_part_merge_equals_the_per_row_original():
    """The commit's merge of staged static parts (Arrow's dictionary encoding, no Python string per
    row, float32 sums added a table at a time) gives the same words in the same order and counts as
    the original (np.unique over Python strings, float64 sums), on words that sort differently by
    case, accents, CJK, astral characters and the empty string; its sums are the original's to the
    bit for a word in one row, and within a float32 rounding per row otherwise."""
    import numpy as np

    from embedjob.stages.static.parts import merge_part_tables, merge_part_tables_reference, part_sums, part_table

    rng = np.random.default_rng(3)
    vocab = np.array([f"w{i}" for i in range(3000)] + ["é", "e", "E", "ü", "a\u00e9", "zz", "Z", "日本", "𝔘x", "",
                                                        "a b", "Ω"], dtype=object)
    tables = []
    for k in range(9):
        n = int(rng.integers(0, 700))
        words = rng.choice(vocab, n, replace=bool(k % 2))
        sums = (rng.standard_normal((n, 5)) * 10.0 ** rng.integers(-3, 4, (n, 1))).astype(np.float32)
        tables.append(part_table(list(words), rng.integers(1, 1 << 40, n), sums, 5))
    # as staged: distinct words, sorted (added a table at a time); one in two chunks; a slice
    staged = tables[1].group_by("word").aggregate([]).sort_by("word")
    tables.append(part_table(staged.column("word").combine_chunks(), np.ones(staged.num_rows),
                             rng.standard_normal((staged.num_rows, 5)).astype(np.float32), 5))
    tables.append(pa.concat_tables([tables[2], tables[4]]))
    tables.append(tables[3].slice(7, 50))
    assert tables[-2].column("sum").num_chunks == 2 and tables[-1].column("sum").chunk(0).offset == 7
    for pick in (tables, tables[:1], tables[-3:], [tables[0].slice(0, 0)], []):
        got, want = merge_part_tables(pick), merge_part_tables_reference(pick)
        assert got[0].type == pa.string() and got[0].to_pylist() == want[0]
        assert got[1].dtype == np.int64 and np.array_equal(got[1], want[1])
        assert got[2].dtype == np.float32 and got[2].shape == want[2].shape
        # each word's rows, and the sum of their absolute values: the rounding's bound
        ones = [part_table(t.column("word").combine_chunks(), np.ones(t.num_rows), np.abs(part_sums(t)), 5)
                for t in pick]
        _, rows, size = merge_part_tables_reference(ones)
        assert np.array_equal(got[2][rows == 1], want[2][rows == 1])
        assert (np.abs(got[2] - want[2]) <= rows[:, None] * 2.0 ** -23 * size).all()
        # summed a few words at a time (as the commit writes them): the same sums to the bit
        small = merge_part_tables(pick, words_per_batch=7)
        assert small[0].equals(got[0]) and np.array_equal(small[1], got[1]) and np.array_equal(small[2], got[2])
