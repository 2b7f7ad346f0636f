"""Driver-side bookkeeping of the per-shard stream: which rows of each shard have been written,
a commit task for each shard as soon as all its rows are (``write.commit_shard``), the encode
counters and the progress line (every ``encode.progress_seconds``, from the encoder actors' counts
while blocks are in flight: ``progress.ProgressCounter``).

The write stage reports one row per staged part (shard, row range, counts); a block that Ray ran
twice reports the same rows twice and counts once, since rows are tracked per shard.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pyarrow as pa

from embedjob.errors import InputError, Interrupted, JobError, root_cause
from embedjob.faults import alive_nodes, fault_stats
from embedjob.layout import TMP, failed_marker
from embedjob.progress import Progress, ProgressTicker, start_counter
from embedjob.ray_errors import raise_injected
from embedjob.stages.encode.busy import PoolPlan, busy_fraction, busy_text, feed_bound_line
from embedjob.stages.read import ShardInfo
from embedjob.stages.write import commit_shard
from embedjob.storage import Storage

if TYPE_CHECKING:
    from embedjob.config import JobConfig
    from embedjob.stages.encode import EncoderSettings
    from embedjob.stages.reuse.stage import ReusePlan

logger = logging.getLogger(__name__)

MARKER_ENCODER_KEYS = ("model", "model_fingerprint", "pooling", "normalize", "max_length", "dtype", "long_documents",
                       "window_overlap", "max_windows", "window_pooling", "snap_to_sentences")
CAPPED_IDS_LISTED = 1000  # stats list at most this many ids of capped documents (all are counted)


class ShardCommits:
    """Tracks the rows written per shard and commits each shard once all its rows are written."""

    def __init__(self, cfg: "JobConfig", out: Storage, todo: list[ShardInfo], encoder: "EncoderSettings",
                 plan: PoolPlan, stage_hash: str, reuse: Optional["ReusePlan"] = None):
        self.cfg, self.out, self.todo, self.encoder, self.stage_hash = cfg, out, todo, encoder, stage_hash
        self.reuse = reuse
        self.by_key = {s.key: s for s in todo}
        self.plan = plan
        self.times = (0.0, 0.0, 0.0)  # the encoder actors' (seconds waiting, computing, CPU in the model): busy.py
        self.covered = {s.key: np.zeros(s.num_rows, dtype=bool) for s in todo}
        for key, rows in (reuse.reused if reuse is not None else {}).items():  # copied at commit, not encoded
            self.covered[key][rows] = True
        self.pending: dict[str, Any] = {}  # shard -> commit task
        self.markers: dict[str, Any] = {}
        self.failures: dict[str, str] = {}
        self.stats: dict[str, Any] = {"documents": 0, "bert_tokens": 0, "windows": 0, "encoded_tokens": 0,
                                      "capped_documents": 0, "capped_ids": [], "actors": plan.actors,
                                      "device": plan.device, "dtype": encoder.dtype, "actor_nodes": {}}
        self.first_output: Optional[float] = None  # steady-state rate: from the first written block to the last
        self.last_output = 0.0
        self.tokens_after_first = 0
        self.progress: Optional[Progress] = None
        self.counter: Any = None  # the encoder actors' progress counter (a Ray actor)
        self._ticker: Optional[ProgressTicker] = None
        self._commit = None
        self.nodes_at_start: dict[str, str] = {}  # Ray nodes alive when encoding started (faults.py)

    def start(self) -> None:
        """Start the progress counter and line; commit the empty shards at once (no row will report them)."""
        import ray

        self._commit = ray.remote(num_cpus=0.25, max_retries=3)(commit_shard)
        every = self.cfg.encode.progress_seconds
        self.progress = Progress("encode", total=sum(int((~c).sum()) for c in self.covered.values()), unit="docs",
                                 every=every)
        self.progress.extra = f"0/{len(self.todo)} shards committed"
        self.counter = start_counter()
        self.nodes_at_start = alive_nodes()
        self._ticker = ProgressTicker(self.progress, self._poll, every=every).start()
        for s in self.todo:
            if s.num_rows == 0 or self.covered[s.key].all():  # no row will report them (empty, or all reused)
                self.submit(s.key)

    def _poll(self) -> None:
        """(ticker thread) The encoder actors' counts and the shards committed so far."""
        import ray

        timeout = max(self.progress.every, 5.0)
        self.progress.in_flight(*ray.get(self.counter.read.remote(), timeout=timeout))
        self.times = ray.get(self.counter.times.remote(), timeout=timeout)
        pending = list(self.pending.values())
        ready = len(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) if pending else 0
        busy = busy_text(busy_fraction(*self.times[:2]))
        self.progress.extra = f"{len(self.markers) + ready}/{len(self.todo)} shards committed" + (
            f"; {busy}" if busy else "")

    def to_encode(self) -> int:
        """Rows the encoder must see (not reused)."""
        return int(sum((~c).sum() for c in self.covered.values()))

    def encoded(self) -> tuple[int, int]:
        """Documents and tokens encoded so far, as the progress line counts them: the encoder actors'
        per-batch counts (while blocks are in flight) or the rows written, whichever is further."""
        if self.progress is None:
            return self.stats["documents"], self.stats["bert_tokens"]
        return self.progress.counts()

    def _last_fault_stats(self) -> dict[str, Any]:
        """The stage's fault counts (:func:`fault_stats`), read once the stream is over; then the
        progress actor ends: it would otherwise idle, at a few percent of a core (Ray's worker loop),
        through the corpus stages until the job ends."""
        found = fault_stats(self.counter, self.nodes_at_start)
        if self.counter is not None:
            import ray

            try:
                ray.kill(self.counter)
            except Exception:  # noqa: BLE001 - already gone with its node: nothing to end
                pass
            self.counter = None
        return found

    def _stop_progress(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None

    def submit(self, key: str) -> None:
        s = self.by_key[key]
        marker = {"input": s.fingerprint(), "stage_hash": self.stage_hash,
                  "encoder": {k: v for k, v in self.encoder.as_dict().items() if k in MARKER_ENCODER_KEYS}}
        o = self.cfg.output
        sink = {"vector_dtype": o.vector_dtype, "lance": o.lance, "carry_columns": list(o.carry_columns),
                "input_url": s.url, "input_options": self.cfg.input.storage_options}
        if o.vector_dtype == "int8":  # one scale for every shard
            sink["int8_max"] = o.int8_max_for(self.encoder.normalize, self.encoder.dim)
        elif o.vector_dtype == "binary" and o.binary_rescore and (self.encoder.normalize or o.int8_max):
            sink.update(rescore=True, int8_max=o.int8_max_for(self.encoder.normalize, self.encoder.dim))
        if self.reuse is not None and self.reuse.plan_rel:
            sink["reuse_plan"] = self.reuse.plan_rel
        if self.cfg.static.enabled:  # static homes (stages/reuse/static.py)
            carry = self.reuse.static if self.reuse is not None else None
            sink["static"] = {"docs": carry.docs if carry else {}, "drop": sorted(carry.broken) if carry else []}
        self.pending[key] = self._commit.remote(self.out.url(), self.out.storage_options, key, s.num_rows,
                                                self.cfg.input.on_empty_text, marker, self.encoder.dim, sink)

    def add_report(self, rep: pa.Table) -> None:
        """One batch of the write stage's reports."""
        now = time.time()
        raise_injected("stream")  # test-only: a node marked dead under the stream (EMBEDJOB_DEBUG_RAY_FAILURE)
        if self.first_output is None:
            self.first_output = now
        else:
            self.tokens_after_first += int(sum(rep.column("tokens").to_pylist()))
        self.last_output = now
        for r in rep.to_pylist():
            self._add_part(r)

    def _add_part(self, r: dict[str, Any]) -> None:
        stats = self.stats
        cov = self.covered[r["shard"]]
        new = int((~cov[r["row_start"]: r["row_end"] + 1]).sum())
        cov[r["row_start"]: r["row_end"] + 1] = True
        stats["documents"] += new
        stats["bert_tokens"] += r["tokens"] if new else 0
        if new and r.get("windows") is not None:  # the encoder's windows (encode.long_documents)
            stats["windows"] += r["windows"]
            stats["encoded_tokens"] += r["encoded_tokens"]
            capped = r.get("capped_ids") or []
            stats["capped_documents"] += len(capped)
            if capped:
                logger.warning("encode: %d document(s) of shard %s longer than encode.max_windows=%d windows: "
                               "their tails were not encoded (e.g. id %s; all listed in stats/encode.json)",
                               len(capped), r["shard"], self.encoder.max_windows, capped[0])
            stats["capped_ids"].extend(capped[:max(0, CAPPED_IDS_LISTED - len(stats["capped_ids"]))])
        if r.get("rss_mb") and r["rss_mb"] > stats.get("encoder_peak_rss_mb", 0.0):
            # peak RSS of the encoder actors and when it grew: [documents done, MiB]
            stats["encoder_peak_rss_mb"] = r["rss_mb"]
            stats.setdefault("encoder_rss_growth", []).append([stats["documents"], r["rss_mb"]])
        if new and r.get("node"):  # documents encoded per Ray node (where the actors ran)
            stats["actor_nodes"][r["node"]] = stats["actor_nodes"].get(r["node"], 0) + new
        self.progress.update(new, tokens=r["tokens"] if new else 0)
        if new and cov.all() and r["shard"] not in self.pending:
            self.submit(r["shard"])

    def settle(self) -> None:
        """Wait for the commit tasks submitted so far."""
        import ray

        for key, ref in list(self.pending.items()):
            try:
                self.markers[key] = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                self.failures[key] = f"commit failed: {root_cause(e)}"
            del self.pending[key]

    def failed(self, e: BaseException) -> Exception:
        """The error to raise for a failure of the stream: the user's own error (an InputError
        under on_bad_shard=fail) or a JobError; either carries the shards committed before it."""
        self._stop_progress()
        self.settle()
        self.stats.update(self._last_fault_stats())
        cause = root_cause(e)
        if isinstance(cause, InputError) and cause.shard in self.by_key:  # a Ray task knew only the shard's key
            cause = cause.naming(self.by_key[cause.shard].url)
        if isinstance(cause, InputError) and self.cfg.input.on_bad_shard == "fail":
            err: Exception = cause
        else:
            err = JobError(f"encode stage failed ({len(self.markers)} shard(s) committed before the failure): {cause}")
        err.committed = dict(self.markers)  # type: ignore[attr-defined] - run_job records and keeps them
        return err

    def interrupted(self) -> Interrupted:
        """SIGTERM stopped the stream: settle the commits submitted so far; the error to raise carries them."""
        self._stop_progress()
        self.settle()
        self.stats.update(self._last_fault_stats())
        left = len(self.todo) - len(self.markers)
        err = Interrupted(f"interrupted by SIGTERM: {len(self.markers)} shard(s) committed in this run, {left} left "
                          "for the next run")
        err.committed = dict(self.markers)  # type: ignore[attr-defined] - run_job records and keeps them
        return err

    def finish(self) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
        """After the stream: settle the commits, record the shards that never completed, clean up.
        Returns (markers of committed shards, {shard: failure reason}, encode stats)."""
        self.settle()
        self._stop_progress()
        self.progress.close()
        out = self.out
        for s in self.todo:  # shards whose reads failed under on_bad_shard=skip
            if s.key not in self.markers and s.key not in self.failures:
                reason = _failure_reason(out, s.key) or "not all rows were encoded"
                self.failures[s.key] = reason
                logger.error("shard %s failed: %s", s.url, reason)
        for key in self.failures:  # the reason is in the manifest; a rerun starts the shard afresh anyway
            out.delete(f"{TMP}/{key}", recursive=True)
        if out.protocol == "file" and out.exists(TMP) and not out.fs.ls(out.path(TMP)):
            out.fs.rmdir(out.path(TMP))
        stats = self.stats
        stats.update(self._last_fault_stats())
        if self.first_output is not None and self.last_output > self.first_output:
            stats["steady_tokens_per_second"] = round(
                self.tokens_after_first / (self.last_output - self.first_output), 1)
        stats["docs_per_second"] = round(stats["documents"] / max(self.progress.elapsed, 1e-9), 1)
        stats["tokens_per_second"] = round(stats["bert_tokens"] / max(self.progress.elapsed, 1e-9), 1)
        busy = busy_fraction(*self.times[:2])
        if busy is not None:
            stats.update(encoder_busy=round(busy, 3), encoder_wait_s=round(self.times[0], 2),
                         encoder_compute_s=round(self.times[1], 2), encoder_model_cpu_s=round(self.times[2], 3))
            line = feed_bound_line(busy, self.plan)
            if line:
                logger.warning("%s", line)
        return self.markers, self.failures, stats


def _failure_reason(out: Storage, key: str) -> Optional[str]:
    try:
        return out.read_json(failed_marker(key)).get("reason")
    except (FileNotFoundError, OSError, ValueError):
        return None
