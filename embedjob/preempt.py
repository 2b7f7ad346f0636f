"""Preemption: what the driver does on SIGTERM (a spot node reclaimed, `ray job stop`, Kubernetes).

Once Ray is up, the first SIGTERM asks the run to stop (:func:`requested`):

* the encode stream takes no new block: the wait for the next block is cut short, the shards whose
  rows are all written are committed, the rest stay for the next run (their staged parts are
  dropped then);
* no corpus-wide stage starts (one already running finishes first);
* ``manifest.json`` is written with ``status: interrupted``, the lease is released, and
  ``embedjob run`` exits with :data:`EXIT_INTERRUPTED` and one line saying how to resume.

A second SIGTERM ends the driver at once (exit 130): committed shards are still kept. A rerun of
the same job continues where the first stopped (committed shards are skipped).

Example::

    arm()                       # after ray.init, which installs its own handler
    for batch in stream(ds.iter_batches(...)):
        ...                     # ends early once SIGTERM arrived
    disarm()
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterable, Iterator, Optional

from embedjob.errors import Interrupted

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a temporary failure; run the same command again to continue

_state: dict[str, Any] = {"requested": False, "previous": None, "armed": False, "waiting": False}


class _Preempted(BaseException):
    """Raised by the handler only while the driver waits for the next block (nothing half done)."""


def during_ray_start(exc: SystemExit) -> Optional[Interrupted]:
    """The :class:`Interrupted` to raise for ``exc`` when it is SIGTERM arriving while ``ray.init``
    ran: Ray's own handler, installed first thing in ``ray.init``, turns it into ``sys.exit(15)``."""
    if exc.code != signal.SIGTERM:
        return None
    _state["requested"] = True
    return Interrupted("interrupted by SIGTERM while Ray started: 0 shard(s) committed in this run, nothing written")


def requested() -> bool:
    """Whether SIGTERM asked this run to stop."""
    return bool(_state["requested"])


def _handler(signum: int, frame: Any) -> None:
    if _state["requested"]:  # a second SIGTERM: stop now
        raise KeyboardInterrupt
    _state["requested"] = True
    logger.warning("SIGTERM: stopping; shards already written are committed, the rest are left for the next run "
                   "(a second SIGTERM stops at once)")
    if _state["waiting"]:
        raise _Preempted


def arm() -> None:
    """Install the SIGTERM handler (main thread only; a no-op elsewhere, e.g. a test's thread).
    Called again once armed, it puts the handler back where another replaced it (``ray.init`` installs
    its own first thing), keeping the handler :func:`disarm` restores."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _state["armed"]:
        if signal.getsignal(signal.SIGTERM) is not _handler:
            signal.signal(signal.SIGTERM, _handler)
        return
    _state.update(requested=False, previous=signal.getsignal(signal.SIGTERM), armed=True)
    signal.signal(signal.SIGTERM, _handler)


def disarm() -> None:
    """Put back the handler :func:`arm` replaced."""
    if _state["armed"] and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _state["previous"] or signal.SIG_DFL)
    _state.update(armed=False, previous=None, waiting=False)


def stream(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches`` until they end or SIGTERM arrives (the wait for the next one is cut short)."""
    it = iter(batches)
    try:
        while not requested():
            try:
                _state["waiting"] = True
                if requested():
                    break
                batch = next(it)
            except StopIteration:
                return
            except _Preempted:
                break
            finally:
                _state["waiting"] = False
            yield batch
    finally:
        with contextlib.suppress(Exception):
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stops Ray Data's executor: the blocks in flight are dropped


def check(stage: str) -> None:
    """Raise :class:`Interrupted` before ``stage`` starts when SIGTERM arrived."""
    if requested():
        raise Interrupted(f"interrupted by SIGTERM before the {stage} stage")


def resume_hint(argv: Optional[list[str]] = None) -> str:
    """The one line the CLI prints: what was kept and how to continue."""
    import shlex
    import sys

    cmd = "embedjob " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return f"rerun the same command to continue where it stopped: {cmd}"
