"""Progress of long stages: plain log lines, which read well in `ray job logs` (no carriage
returns), or a tqdm bar when stderr is a terminal, every ``every`` seconds while the work is in
flight, and a final summary line::

    encode: 32000/174000 docs (18.4%), 2563000 tokens; 410.2 docs/s, 32850 tokens/s; ETA 0:05:46; 3/16 shards committed
    encode: done, 174000 docs, 14012000 tokens in 0:07:05 (409.1 docs/s, 32940 tokens/s)

The driver cannot see inside a block until it is written, and one block can hold a whole small
shard, so the encoder actors report what they encode after every model batch to a small Ray actor
(:class:`ProgressCounter`, through :class:`BatchReporter`); a thread of the driver
(:class:`ProgressTicker`) reads it and logs. Documents done = the larger of the documents encoded
and the documents written (a retried block is encoded twice but written once), at most the total.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

logger = logging.getLogger("embedjob.progress")

REPORT_EVERY_S = 0.5  # an encoder actor sends its counts to the counter at most this often
POLL_EVERY_S = 1.0  # the driver reads the counter this often (and shows a line every `every` seconds)


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts of one stage: what is written (``update``) and what is in flight (``in_flight``);
    :meth:`line` says how far the stage is, :meth:`close` logs its summary."""

    def __init__(self, stage: str, total: Optional[int], unit: str = "docs", every: float = 10.0):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.done = 0
        self.tokens = 0
        self.flight_done = 0  # counted where the work happens (encoder actors), before it is written
        self.flight_tokens = 0
        self.t0 = time.time()
        self._logged: Optional[str] = None
        self.extra = ""

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    def update(self, n: int, extra: str = "", *, tokens: int = 0) -> None:
        """Add ``n`` units (and ``tokens`` model tokens) written; ``extra`` ends the line."""
        self.done += n
        self.tokens += tokens
        if extra:
            self.extra = extra

    def in_flight(self, done: int, tokens: int) -> None:
        """The units and tokens processed so far, written or not (the encoder actors' counts)."""
        self.flight_done, self.flight_tokens = max(self.flight_done, done), max(self.flight_tokens, tokens)

    def counts(self) -> tuple[int, int]:
        done = max(self.done, self.flight_done)
        if self.total:
            done = min(done, self.total)
        return done, max(self.tokens, self.flight_tokens)

    def line(self) -> str:
        done, tokens = self.counts()
        elapsed = max(self.elapsed, 1e-9)
        rate = done / elapsed
        parts = [f"{done}/{self.total} {self.unit} ({100.0 * done / self.total:.1f}%)" if self.total
                 else f"{done} {self.unit}"]
        if tokens:
            parts[0] += f", {tokens} tokens"
        parts.append(f"{rate:.1f} {self.unit}/s" + (f", {tokens / elapsed:.0f} tokens/s" if tokens else ""))
        if self.total:
            parts.append("ETA " + format_duration((self.total - done) / rate if rate > 0 else float("inf")))
        if self.extra:
            parts.append(self.extra)
        return f"{self.stage}: " + "; ".join(parts)

    def log(self) -> None:
        """Log the progress line (unless the counts have not moved since the last one)."""
        key = repr(self.counts()) + self.extra
        if key != self._logged:
            self._logged = key
            logger.info("%s", self.line())

    def close(self) -> None:
        """Log the last progress line (unless already logged) and the stage's summary."""
        self.log()
        elapsed = max(self.elapsed, 1e-9)
        done, tokens = self.counts()
        tok = f", {tokens} tokens" if tokens else ""
        tok_rate = f", {tokens / elapsed:.0f} tokens/s" if tokens else ""
        logger.info("%s: done, %d %s%s in %s (%.1f %s/s%s)", self.stage, done, self.unit, tok,
                    format_duration(elapsed), done / elapsed, self.unit, tok_rate)


class ProgressCounter:
    """Counts what the workers of one stage have processed (run as a Ray actor, ``num_cpus=0``), and
    the faults they met: encoder calls started more than once (a block retried after its actor or
    node died) and out-of-memory figures (``stages/encode/oom.py``)."""

    def __init__(self) -> None:
        self.done = 0
        self.tokens = 0
        self.wait_s = 0.0  # the encoder actors' seconds waiting for input, and computing (busy.py)
        self.busy_s = 0.0
        self.model_cpu_s = 0.0  # their CPU seconds inside the model's forward passes (encoder.py)
        self.calls: dict[str, int] = {}  # encoder call (shard:first row) -> times started
        self.oom: dict[str, dict] = {}  # encoder actor -> its OomBudget figures

    def begin(self, key: str) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1

    def oom_report(self, actor: str, figures: dict) -> None:
        self.oom[actor] = figures

    def faults(self) -> dict:
        """Retried encoder calls and the actors' out-of-memory figures."""
        return {"retried_blocks": sum(n - 1 for n in self.calls.values() if n > 1), "oom": dict(self.oom)}

    def add(self, done: int, tokens: int) -> None:
        self.done += done
        self.tokens += tokens

    def add_time(self, wait_s: float, busy_s: float, model_cpu_s: float = 0.0) -> None:
        self.wait_s += wait_s
        self.busy_s += busy_s
        self.model_cpu_s += model_cpu_s

    def times(self) -> tuple[float, float, float]:
        """(seconds waiting, seconds computing, CPU seconds in the model) of all encoder actors so far."""
        return self.wait_s, self.busy_s, self.model_cpu_s

    def read(self) -> tuple[int, int]:
        return self.done, self.tokens


def start_counter() -> Any:
    """A :class:`ProgressCounter` actor of this job (the driver holds it; it ends with the job)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node, strictly: a lost worker node does not take the job's counts with it. A soft
    # affinity is not enough: Ray's actor scheduler placed it on another node in 1 of 3 tries on a
    # two-node cluster, and the node-loss test then read no counts. Nothing is lost by being strict:
    # it takes no CPU, and when the driver's node goes the job goes with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(ProgressCounter).options(scheduling_strategy=here).remote()


class BatchReporter:
    """Worker side: adds each model batch's counts to the counter, sent at most every
    ``REPORT_EVERY_S`` seconds (and on :meth:`flush`), fire-and-forget."""

    def __init__(self, counter: Any):
        self.counter = counter
        self.done = self.tokens = 0
        self.wait_s = self.busy_s = self.model_cpu_s = 0.0
        self._sent = time.time()

    def add_time(self, wait_s: float, busy_s: float, model_cpu_s: float = 0.0) -> None:
        """One call's seconds waiting for its block and computing it, and its CPU seconds in the
        model (sent with the next flush)."""
        self.wait_s += wait_s
        self.busy_s += busy_s
        self.model_cpu_s += model_cpu_s

    def add(self, done: int, tokens: int) -> None:
        self.done += done
        self.tokens += tokens
        if time.time() - self._sent >= REPORT_EVERY_S:
            self.flush()

    def begin(self, key: str) -> None:
        """An encoder call on the rows ``key`` starts (a second start is a retried block)."""
        self._send("begin", key)

    def oom(self, actor: str, figures: dict) -> None:
        self._send("oom_report", actor, figures)

    def _send(self, method: str, *args: Any) -> None:
        if self.counter is None:
            return
        try:
            getattr(self.counter, method).remote(*args)
        except Exception:  # noqa: BLE001 - bookkeeping: never fail a batch for it
            pass

    def flush(self) -> None:
        if self.counter is None:
            return
        try:
            if self.done or self.tokens:
                self.counter.add.remote(self.done, self.tokens)
            if self.wait_s or self.busy_s:
                self.counter.add_time.remote(self.wait_s, self.busy_s, self.model_cpu_s)
        except Exception:  # noqa: BLE001 - progress is bookkeeping: never fail a batch for it
            pass
        self.done = self.tokens = 0
        self.wait_s = self.busy_s = self.model_cpu_s = 0.0
        self._sent = time.time()


class ProgressTicker:
    """A driver thread that shows ``progress`` every ``every`` seconds while a stage runs: a log
    line, or a tqdm bar when ``stream`` is a terminal (redrawn every second). ``poll`` refreshes the
    counts (e.g. reads the :class:`ProgressCounter`) every second, so whoever reads
    ``progress.counts()`` in between (the run's timeline) sees them move too."""

    def __init__(self, progress: Progress, poll: Callable[[], None], *, every: float = 10.0,
                 stream: Optional[TextIO] = None):
        self.progress, self.poll, self.every = progress, poll, every
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        if _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=progress.total, unit=progress.unit[:-1] if progress.unit.endswith("s")
                            else progress.unit, desc=progress.stage, file=self.stream, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"embedjob-progress-{progress.stage}", daemon=True)

    def start(self) -> "ProgressTicker":
        self._thread.start()
        return self

    def _run(self) -> None:
        shown = time.time()
        while not self._stop.wait(min(self.every, POLL_EVERY_S)):
            if self.bar is not None or time.time() - shown >= self.every - 1e-3:
                self.tick()
                shown = time.time()
            else:
                self._poll()

    def _poll(self) -> None:
        try:
            self.poll()
        except Exception as e:  # noqa: BLE001 - a slow or gone counter: show what is known
            logger.debug("progress: poll failed: %s", e)

    def tick(self) -> None:
        self._poll()
        if self.bar is not None:
            done, tokens = self.progress.counts()
            self.bar.n = done
            self.bar.set_postfix_str(f"{tokens} tokens; {self.progress.extra}", refresh=False)
            self.bar.refresh()
        else:
            self.progress.log()

    def stop(self) -> None:
        """Stop the thread (one last poll) and close the bar; the caller logs the summary."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every + 5)
        try:
            self.poll()
        except Exception:  # noqa: BLE001
            pass
        if self.bar is not None:
            self.bar.n = self.progress.counts()[0]
            self.bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
