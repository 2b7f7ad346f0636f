"""Progress of long stages as plain log lines, which read well in `ray job logs` (no progress bars,
no carriage returns): done / total, tokens, rates and ETA, at most every ``every`` seconds, and a
final summary line::

    encode: 32000/174000 docs (18.4%), 2563000 tokens; 410.2 docs/s, 32850 tokens/s; ETA 0:05:46; 3/16 shards written
    encode: done, 174000 docs, 14012000 tokens in 0:07:05 (409.1 docs/s, 32940 tokens/s)
"""

from __future__ import annotations

import logging
import time
from typing import Optional

logger = logging.getLogger("embedjob.progress")


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts work done in one stage and logs it (``update``) at most every ``every`` seconds."""

    def __init__(self, stage: str, total: Optional[int], unit: str = "docs", every: float = 10.0):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.done = 0
        self.tokens = 0
        self.t0 = time.time()
        self._last = 0.0
        self._logged: Optional[tuple[int, int]] = None
        self.extra = ""

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    def update(self, n: int, extra: str = "", *, tokens: int = 0) -> None:
        """Add ``n`` units (and ``tokens`` model tokens) done; ``extra`` ends the line."""
        self.done += n
        self.tokens += tokens
        self.extra = extra
        now = time.time()
        if now - self._last >= self.every:
            self._last = now
            self._log()

    def line(self) -> str:
        elapsed = max(self.elapsed, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.1f}%)" if self.total
                 else f"{self.done} {self.unit}"]
        if self.tokens:
            parts[0] += f", {self.tokens} tokens"
        rates = f"{rate:.1f} {self.unit}/s" + (f", {self.tokens / elapsed:.0f} tokens/s" if self.tokens else "")
        parts.append(rates)
        if self.total:
            parts.append("ETA " + format_duration((self.total - self.done) / rate if rate > 0 else float("inf")))
        if self.extra:
            parts.append(self.extra)
        return f"{self.stage}: " + "; ".join(parts)

    def _log(self) -> None:
        self._logged = (self.done, self.tokens)
        logger.info("%s", self.line())

    def close(self) -> None:
        """Log the last progress line (unless already logged) and the stage's summary."""
        if self._logged != (self.done, self.tokens):
            self._log()
        elapsed = max(self.elapsed, 1e-9)
        tokens = f", {self.tokens} tokens" if self.tokens else ""
        tok_rate = f", {self.tokens / elapsed:.0f} tokens/s" if self.tokens else ""
        logger.info("%s: done, %d %s%s in %s (%.1f %s/s%s)", self.stage, self.done, self.unit, tokens,
                    format_duration(elapsed), self.done / elapsed, self.unit, tok_rate)
