"""What a user is shown when something fails: the cause inside Ray's wrappers, as one line.

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

This module imports nothing of embedjob (any module may use it) and nothing of Ray (errors are
recognised by their attributes).
"""

from __future__ import annotations

import re
from typing import Optional

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

