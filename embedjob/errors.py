"""The error taxonomy, and what a user is shown when something fails: one line.

Every user-facing error is one of these classes; the CLI prints it as ``embedjob: error: <one
line>`` and exits 2. This module is on the ground floor: it imports nothing of embedjob, so every
module may raise these.

* :class:`ConfigError` — the job spec (key named), before any work;
* :class:`InputError` — shards, columns, rows and ids (file, row, id named), before any work where
  it can be known then;
* :class:`StorageError` — a URL that cannot be read or written (:class:`WordVectorsError`: word
  vectors that cannot be read, or are refused because they are a pickle);
* :class:`ModelError` — the model setting (folder, config, tokenizer, weights);
* :class:`LeaseError` — another run holds the output;
* :class:`JobError` — a stage that failed (what was committed is kept; :class:`Interrupted`: the run
  stopped on SIGTERM), with the stages' own
  :class:`StaticVectorsError`, :class:`TopicsError`, :class:`Word2VecTrainingError`.

An error raised in a Ray task or actor reaches the driver wrapped, often more than once:

* ``RayTaskError(InputError)`` — Ray core's wrapper, an instance of both classes whose ``str()`` is
  the worker's whole traceback with terminal colour codes; ``.cause`` holds the original;
* Ray Data's ``UserCodeException`` ("UDF failed to process a data block"), raised ``from`` the
  original in the worker, where the chain is lost on the way to the driver: the original is then
  only in the enclosing ``RayTaskError``'s traceback text;
* Ray Train's ``WorkerGroupError`` (``.worker_failures``: rank -> error), ``ControllerError``
  (``.controller_failure``) and ``UserExceptionWithTraceback`` (``._base_exc``).

Ray Data also appends its retry advice to the original's message ("Failed to apply UDF transform
after 1/1 attempts ... To change retry attempts ..."). :func:`root_cause` finds embedjob's own error
(the outermost one: it carries the most context) and :func:`one_line` cleans any message that is
shown::

    try:
        ds.take_all()
    except Exception as e:
        raise JobError(f"encode stage failed: {root_cause(e)}") from e
"""

from __future__ import annotations

import re
from typing import Any, Optional


class ConfigError(Exception):
    """The job spec is invalid; the message names the key, file or column at fault."""


class InputError(Exception):
    """Input shards are missing, unreadable or lack the configured columns (names file/column).

    An error about one row, raised where only the shard's key is known (a Ray task after the read),
    is made by :func:`row_error`; the driver swaps the key for the file's URL with :meth:`naming`."""

    def __init__(self, message: str, *, shard: Optional[str] = None, detail: Optional[str] = None):
        super().__init__(message)
        self.shard = shard  # the shard's key (output name), when the message names only that
        self.detail = detail  # the message after "shard <key>, "

    def naming(self, url: str) -> "InputError":
        """The same error naming the shard by its file ``url`` instead of its key."""
        if self.detail is None:
            return self
        return InputError(f"shard {url}, {self.detail}", shard=self.shard, detail=self.detail)


def row_error(shard: str, row: Any, doc_id: Any, problem: str) -> InputError:
    """``InputError('shard <shard>, row <row> (id <doc_id>): <problem>')`` for one input row."""
    detail = f"row {row} (id {doc_id!r}): {problem}"
    return InputError(f"shard {shard}, {detail}", shard=shard, detail=detail)


class StorageError(Exception):
    """A URL cannot be read or written (names the URL and the reason)."""


class NothingToDo(StorageError):
    """A corpus-wide stage's input holds nothing to work on (every text empty or null): the
    pipeline records the stage as skipped, with this message as the reason, and goes on."""


class WordVectorsError(StorageError):
    """Word vectors cannot be read, or are refused (a pickle without the trust setting)."""


class ModelError(Exception):
    """The configured model cannot be found or loaded."""


class LeaseError(Exception):
    """Another run holds the output's lease (named), or took it over from this run."""


class JobError(Exception):
    """The job failed; the message says where and why."""


class Interrupted(JobError):
    """The run stopped on SIGTERM (``preempt.py``): committed shards are kept, a rerun continues."""


class StaticVectorsError(Exception):
    """The static word vectors stage cannot go on (names the shard or setting)."""


class TopicsError(Exception):
    """The topic model stage cannot go on (names the setting)."""


class Word2VecTrainingError(RuntimeError):
    """A Ray Train worker failed (after the configured restarts)."""


class IncompleteShardError(Exception):
    """A shard's staged parts do not hold all of its rows (it is not committed, and is redone)."""


class ReportError(Exception):
    """The HTML report cannot be drawn (no manifest at that output); names the URL."""


USER_ERRORS = (ConfigError, InputError, StorageError, ModelError, JobError, LeaseError, ReportError)



_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Ray Data's retry advice (ray.data._internal.util._annotate_exception_with_retry_context)
_BOILERPLATE = (
    re.compile(r"^Failed to .* after \d+/\d+ attempts"),
    re.compile(r"^To change retry attempts"),
    re.compile(r"^This looks like an AWS S3 permissions error"),
)
# the "Type: message" line of an exception in a traceback text (``pkg.mod.Type: message``)
_EXC_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\w*)(?:\(\w+\))?: (.*)$")
_TB_END = ("The above exception", "During handling of the above exception", "Traceback (most recent", "  File ")


class RemoteError(Exception):
    """A cause that is not embedjob's own (a library's error in a Ray worker), as ``Type: message``."""


def one_line(text: str) -> str:
    """``text`` as one line: terminal colour codes, control characters and Ray's retry advice
    removed, lines joined with ``; `` (with a space after a line that ends in ``:``)::

        one_line("invalid job spec j.yaml:\n  encode.modle: unknown\n  input.url: missing")
        # 'invalid job spec j.yaml: encode.modle: unknown; input.url: missing'
    """
    out = ""
    for ln in _ANSI.sub("", str(text)).splitlines():
        ln = " ".join("".join(ch if ch.isprintable() else " " for ch in ln).split())
        if not ln or any(p.match(ln) for p in _BOILERPLATE):
            continue
        out = ln if not out else out + (" " if out.endswith((":", ";", ",")) else "; ") + ln
    return out


def _is_ray_wrapper(e: BaseException) -> bool:
    """Ray's own errors and its ``RayTaskError(Original)`` classes (a subclass of both)."""
    return any(c.__module__.split(".")[0] == "ray" for c in type(e).__mro__)


def _is_own(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] == "embedjob" and not _is_ray_wrapper(e)


def _inner(e: BaseException) -> Optional[BaseException]:
    """The error ``e`` wraps: Ray's and Ray Train's attributes first, then Python's chain."""
    for attr in ("cause", "_base_exc", "controller_failure"):
        inner = getattr(e, attr, None)
        if isinstance(inner, BaseException):
            return inner
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return failures[sorted(failures)[0]]
    return e.__cause__ or e.__context__


def _from_traceback(text: str) -> Optional[str]:
    """The first (innermost) ``Type: message`` of a worker's traceback text, message lines joined."""
    lines = _ANSI.sub("", text).splitlines()
    for i, ln in enumerate(lines):
        m = _EXC_LINE.match(ln)
        if not m or m.group(1).split(".")[0] == "ray":
            continue
        msg = [m.group(2)]
        for more in lines[i + 1:]:
            if not more.strip() or more.startswith(_TB_END) or _EXC_LINE.match(more):
                break
            msg.append(more)
        name = m.group(1).rsplit(".", 1)[-1]
        return f"{name}: {one_line(' '.join(msg))}"
    return None


def root_cause(e: BaseException) -> BaseException:
    """The error to show for ``e``: the outermost embedjob error inside Ray's wrappers (its message
    made one line, in place); else the innermost error, as a :class:`RemoteError` ``Type: message``
    when it came through Ray (recovered from the worker's traceback text when Ray lost it)."""
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    last = e
    via_ray = False
    tracebacks: list[str] = []
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if _is_own(cur):
            return _cleaned(cur)
        if _is_ray_wrapper(cur):
            via_ray = True
            tb = getattr(cur, "traceback_str", None)
            if isinstance(tb, str):
                tracebacks.append(tb)
            tracebacks.append(str(cur))  # an ActorDiedError carries its creation task's traceback as text
        last = cur
        cur = _inner(cur)
    if _is_ray_wrapper(last):
        for tb in tracebacks:
            found = _from_traceback(tb)
            if found:
                return RemoteError(found)
    text = one_line(str(last))
    if via_ray:
        return RemoteError(f"{type(last).__name__}: {text}")
    return last if text == str(last) else RemoteError(text)


def _cleaned(e: BaseException) -> BaseException:
    """``e`` with a one-line message (Ray Data appends its retry advice to the original's args)."""
    if e.args and isinstance(e.args[0], str):
        clean = one_line(e.args[0])
        if clean != e.args[0]:
            try:
                e.args = (clean,) + tuple(e.args[1:])
            except (AttributeError, TypeError):
                pass
    return e

