"""Progress of long stages as plain log lines (they read well in `ray job logs`): done / total,
rate and ETA, at most every ``every`` seconds, plus a final line."""

from __future__ import annotations

import logging
import time
from typing import Optional

logger = logging.getLogger("embedjob.progress")


class Progress:
    def __init__(self, stage: str, total: Optional[int], unit: str = "docs", every: float = 10.0):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.done = 0
        self.t0 = time.time()
        self._last = 0.0
        self.extra = ""

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        self.extra = extra
        now = time.time()
        if now - self._last >= self.every:
            self._last = now
            self._log()

    def _log(self) -> None:
        rate = self.done / max(self.elapsed, 1e-9)
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
            logger.info("%s: %d/%d %s (%.1f%%), %.1f %s/s, ETA %s%s", self.stage, self.done, self.total, self.unit,
                        100.0 * self.done / self.total, rate, self.unit, eta_s, f"; {self.extra}" if self.extra else "")
        else:
            logger.info("%s: %d %s, %.1f %s/s%s", self.stage, self.done, self.unit, rate, self.unit,
                        f"; {self.extra}" if self.extra else "")

    def close(self) -> None:
        self._log()
