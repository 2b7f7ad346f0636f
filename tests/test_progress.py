"""Encode progress that moves: the encoder actors count every model batch, so the driver's lines
show documents done while a block (here: a whole shard) is still in flight, before any shard
commits; a tqdm bar instead of lines when stderr is a terminal."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import termios
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.layout import shard_marker
from embedjob.pipeline import run_job
from embedjob.progress import Progress, ProgressTicker
from tests.conftest import SAMPLE_TEXTS
from tests.helpers import ray_with_batch_delay, small_job


@pytest.fixture()
def ray_batch_slow():
    """Local Ray whose encoder sleeps 0.1 s after each model batch (a block lasts seconds)."""
    yield from ray_with_batch_delay(0.1)


def test_progress_line_moves_before_the_first_shard_commits(ray_batch_slow, tmp_path, tiny_model, caplog):
    texts = [f"{t} Item {i}." for i in range(4) for t in SAMPLE_TEXTS]  # 48 documents
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"id": [f"d{i:03d}" for i in range(len(texts))], "text": texts}),
                   inp / "part-00000.parquet")
    out = tmp_path / "out"
    # one shard, one block, one encoder call: the written rows say nothing until the whole shard is
    # encoded; the model batches (2-4 documents each) are what the line counts
    cfg = small_job(inp, out, tiny_model, input={"rows_per_block": 1000},
                    encode={"rows_per_call": 1000, "batch_tokens": 64, "max_batch_docs": 4, "progress_seconds": 0.3})
    with caplog.at_level(logging.INFO, logger="embedjob.progress"):
        res = run_job(cfg)
    assert res.ok
    committed_at = os.path.getmtime(out / shard_marker("part-00000"))
    lines = [(r.created, r.getMessage()) for r in caplog.records if r.name == "embedjob.progress"]
    early = []
    for t, msg in lines:
        m = re.match(r"encode: (\d+)/48 docs \([\d.]+%\), (\d+) tokens; [\d.]+ docs/s, \d+ tokens/s; ETA \S+; "
                     r"(\d)/1 shards committed(; encoder busy \d+%)?$", msg)
        if m and 0 < int(m[1]) < 48:
            early.append((t, int(m[2]), m[3]))
    assert early, "no progress line while the shard was in flight:\n" + "\n".join(m for _, m in lines)
    assert all(tokens > 0 and committed == "0" for _, tokens, committed in early)
    assert min(t for t, _, _ in early) < committed_at
    assert any(msg.startswith("encode: 48/48 docs (100.0%)") and "1/1 shards committed" in msg
               for _, msg in lines)
    assert lines[-1][1].startswith("encode: done, 48 docs")


def test_bar_on_a_terminal_plain_lines_elsewhere(caplog):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    with os.fdopen(slave, "w") as tty:
        p = Progress("encode", total=10, every=0.05)
        ticker = ProgressTicker(p, lambda: p.in_flight(4, 40), every=0.05, stream=tty)
        assert ticker.bar is not None
        with caplog.at_level(logging.INFO, logger="embedjob.progress"):
            ticker.start()
            time.sleep(1.5)
            ticker.stop()
        drawn = b""
        while select.select([master], [], [], 0.2)[0]:
            drawn += os.read(master, 65536)
    os.close(master)
    assert b"4/10" in drawn and b"40 tokens" in drawn
    assert not [r for r in caplog.records if r.name == "embedjob.progress"]  # the bar, not lines

    p = Progress("encode", total=10, every=0.05)
    plain = ProgressTicker(p, lambda: p.in_flight(4, 40), every=0.05, stream=io.StringIO())
    assert plain.bar is None
    with caplog.at_level(logging.INFO, logger="embedjob.progress"):
        plain.tick()
        plain.tick()  # counts unchanged: not logged twice
    logged = [r.getMessage() for r in caplog.records if r.name == "embedjob.progress"]
    assert len(logged) == 1 and re.match(r"encode: 4/10 docs \(40\.0%\), 40 tokens; [\d.]+ docs/s", logged[0])
