"""report.html's timeline counts the encoder actors' model batches (issue 30, part 2, defect 6): while a
block (here: a whole shard) is still being encoded, stats/timeline.json already shows documents and
tokens encoded, as the progress line does, instead of 0 until the first block is written."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.pipeline import run_job
from tests.conftest import SAMPLE_TEXTS
from tests.helpers import ray_with_batch_delay, small_job


@pytest.fixture()
def ray_batch_slower():
    """Local Ray whose encoder sleeps 0.25 s after each model batch (a block lasts seconds)."""
    yield from ray_with_batch_delay(0.25)


def test_timeline_counts_documents_while_the_first_block_is_encoded(ray_batch_slower, tmp_path, tiny_model):
    texts = [f"{t} Item {i}." for i in range(4) for t in SAMPLE_TEXTS]  # 48 documents
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"id": [f"d{i:03d}" for i in range(len(texts))], "text": texts}),
                   inp / "part-00000.parquet")
    out = tmp_path / "out"
    # one shard, one block, one encoder call of 24 model batches (2 documents each, ~6 s): the written
    # rows go from 0 to 48 at once; the progress line is shown only at the end (progress_seconds)
    cfg = small_job(inp, out, tiny_model, input={"rows_per_block": 1000},
                    encode={"rows_per_call": 1000, "batch_tokens": 64, "max_batch_docs": 2, "progress_seconds": 60})
    assert run_job(cfg).ok
    timeline = json.loads((out / "stats" / "timeline.json").read_text())
    during = [s for s in timeline["samples"] if s.get("stage") == "encode" and s.get("docs") is not None]
    partial = [s for s in during if 0 < s["docs"] < 48]
    assert partial, f"no timeline sample while the block was encoded: {[(s['t'], s['docs']) for s in during]}"
    assert all(s["tokens"] > 0 for s in partial)
    assert max(s["docs"] for s in timeline["samples"] if s.get("docs") is not None) == 48
