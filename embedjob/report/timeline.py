"""Throughput and memory over time: the driver samples what it knows every few seconds in a daemon
thread while a run goes on, and writes ``stats/timeline.json`` beside the other stats.

A sample is cheap (a few counters the run already keeps, ``/proc`` reads): the current stage, the
documents and tokens encoded so far, the driver's RSS, the memory in use on the driver's node and
the encoder actors' peak RSS (as the write stage reports it). Long runs keep at most
``max_samples`` samples: past that every other one is dropped and the interval doubles::

    tl = Timeline(every=2.0).start()
    tl.stage("encode"); tl.watch(docs=lambda: stats["documents"])
    ...
    out.write_json(TIMELINE, tl.stop())
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Optional

TIMELINE_VERSION = "embedjob-timeline-v1"


def _rss_mb() -> Optional[float]:
    """This process's resident memory (MiB), from ``/proc/self/statm``; None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _node_used_mb() -> Optional[float]:
    """Memory in use on this node (MiB): MemTotal - MemAvailable from ``/proc/meminfo``."""
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0])
        return round((info["MemTotal"] - info["MemAvailable"]) / 1024, 1)
    except (OSError, ValueError, KeyError):
        return None


class Timeline:
    """Samples the run's counters and memory every ``every`` seconds until :meth:`stop`."""

    def __init__(self, every: float = 2.0, max_samples: int = 2000):
        self.every, self.max_samples = float(every), max_samples
        self.t0 = time.time()
        self.samples: list[dict[str, Any]] = []
        self.stages: list[list[Any]] = []  # [name, start s, end s or None] relative to t0
        self._probes: dict[str, Callable[[], Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Timeline":
        self._thread = threading.Thread(target=self._loop, name="embedjob-timeline", daemon=True)
        self._thread.start()
        return self

    def stage(self, name: str) -> None:
        """``name`` starts now (the stage before it ends)."""
        now = round(time.time() - self.t0, 3)
        with self._lock:
            if self.stages and self.stages[-1][2] is None:
                self.stages[-1][2] = now
            self.stages.append([name, now, None])
        self.sample()

    def watch(self, **probes: Callable[[], Any]) -> None:
        """Counters read at every sample (e.g. ``docs=lambda: stats["documents"]``)."""
        with self._lock:
            self._probes.update(probes)

    def sample(self) -> None:
        s: dict[str, Any] = {"t": round(time.time() - self.t0, 3), "driver_rss_mb": _rss_mb(),
                             "node_used_mb": _node_used_mb()}
        with self._lock:
            s["stage"] = self.stages[-1][0] if self.stages and self.stages[-1][2] is None else None
            for name, fn in self._probes.items():
                try:
                    s[name] = fn()
                except Exception:  # noqa: BLE001 - a counter being replaced; the next sample reads it
                    s[name] = None
            self.samples.append(s)
            if len(self.samples) > self.max_samples:
                self.samples = self.samples[::2]
                self.every *= 2

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> dict[str, Any]:
        """Stop sampling (a second call changes nothing); the timeline as written to ``stats/timeline.json``."""
        if self._stop.is_set() and self._thread is not None:
            return self._result()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()
        with self._lock:
            if self.stages and self.stages[-1][2] is None:
                self.stages[-1][2] = self.samples[-1]["t"]
        return self._result()

    def _result(self) -> dict[str, Any]:
        with self._lock:
            return {"format": TIMELINE_VERSION, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
                    "every_s": self.every, "stages": [list(x) for x in self.stages], "samples": list(self.samples)}
