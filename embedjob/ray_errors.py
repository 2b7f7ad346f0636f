"""One line when Ray itself fails, not a traceback.

Ray's runtime can fail under a job: the local node does not come up in time, the cluster cannot be
reached, a node is marked dead (missed heartbeats), the raylet is gone, a worker cannot register
with its raylet. ``embedjob run`` then exits 2 with one line naming what failed and where Ray's
logs are; ``embedjob -v run`` prints Ray's traceback as well::

    embedjob: error: Ray's runtime failed: a Ray node was marked dead (The node with node id 1f0... has
    been marked dead because the detector has missed too many heartbeats from it); Ray's logs: /tmp/ray/
    session_latest/logs (on each node)

:func:`ray_failure` recognises these in an error or anywhere in its chain (Ray's wrappers, a
``JobError`` raised from one) by Ray's exception types and by the messages of the failures Ray
raises as plain exceptions (a startup timeout is an ``Exception``).
"""

from __future__ import annotations

import os
from typing import Optional

from embedjob.debug import ray_failure as injected_ray_failure
from embedjob.errors import one_line

# (what failed, exception class names, message fragments): the first that matches names the failure
RAY_FAILURES = (
    ("Ray's local node timed out during startup", (), ("timed out during startup",)),
    ("a Ray node was marked dead", ("NodeDiedError",), ("has been marked dead", "node is either dead or unreachable")),
    ("a Ray worker could not register with its raylet", (), ("Failed to register worker",)),
    ("the raylet is gone", ("LocalRayletDiedError",), ("raylet died", "Raylet is terminated", "raylet has died",
                                                       "lost its connection to the raylet",
                                                       "connection to the plasma store is failed")),
    ("the Ray cluster cannot be reached", (), ("Could not find any running Ray instance", "Failed to connect to GCS",
                                               "Failed to get cluster ID from GCS", "GCS has been unreachable")),
    ("Ray lost an object or its owner", ("ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError"), ()),
    ("the disk under Ray's object store is full", ("OutOfDiskError",), ()),
    ("a Ray system error", ("RaySystemError",), ()),
)


def _chain(e: BaseException):
    seen: set[int] = set()
    todo = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
        todo = [x for x in todo if isinstance(x, BaseException)]


def ray_failure_in_text(text: str) -> Optional[str]:
    """What failed, for a line of Ray's own log that names one of :data:`RAY_FAILURES` (None: none)."""
    return next((what for what, _, fragments in RAY_FAILURES if any(f in text for f in fragments)), None)


def _from_ray_init(e: BaseException) -> bool:
    """ConnectionError raised by ray.init (a bogus or dead address)."""
    return isinstance(e, ConnectionError) and any("ray" in (f.filename or "") for f in _frames(e))


def _frames(e: BaseException):
    import traceback

    return traceback.extract_tb(e.__traceback__) if e.__traceback__ is not None else []


def ray_failure(e: BaseException) -> Optional[str]:
    """``"<what failed> (<Ray's message>)"`` when ``e`` is (or wraps) a failure of Ray's runtime, else None."""
    # embedjob's own errors are never Ray's failure themselves (a wrapper repeats Ray's message after a
    # prefix; an input error may quote anything): only the errors they were raised from count
    for cur in (x for x in _chain(e) if type(x).__module__.split(".")[0] != "embedjob"):
        names = {c.__name__ for c in type(cur).__mro__}
        text = str(cur)
        for what, types, fragments in RAY_FAILURES:
            if names & set(types) or any(f in text for f in fragments):
                return f"{what} ({_ray_message(text)})"
        if _from_ray_init(cur):
            return f"the Ray cluster cannot be reached ({_ray_message(text)})"
    return None


def _ray_message(text: str, limit: int = 300) -> str:
    """Ray's own message, one line, without its retry advice or the embedjob prefix it came in."""
    line = one_line(text)
    for marker in ("RemoteError: ", "encode stage failed"):
        if marker in line and line.index(marker) < 80:
            line = line.split(": ", 1)[-1] if marker == "encode stage failed" else line.split(marker, 1)[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def ray_logs_dir() -> str:
    """Where Ray's logs of this session are (the driver's node; each node keeps its own)."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - the one place Ray keeps the session's folder
        if node is not None:
            return node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - fall back to Ray's default folder
        pass
    tmp = os.environ.get("RAY_TMPDIR") or "/tmp/ray"
    return os.path.join(tmp, "session_latest", "logs")


def ray_failure_line(e: BaseException) -> Optional[str]:
    """The one line ``embedjob`` prints for a failure of Ray's runtime (None: not one)."""
    what = ray_failure(e)
    if what is None:
        return None
    return f"Ray's runtime failed: {what}; Ray's logs: {ray_logs_dir()} (on each node; -v shows Ray's traceback)"


def raise_injected(where: str) -> None:
    """Test-only (``EMBEDJOB_DEBUG_RAY_FAILURE``, debug.py): raise Ray's own exception for a failure
    of its runtime that a test cannot provoke on one machine, where Ray raises it (``init``: the
    ``ray.init`` call; ``stream``: the encode stream)."""
    kind = injected_ray_failure(where)
    if kind is None:
        return
    if kind.startswith("driver-exit"):  # Ray's core worker ending the driver: no exception, no cleanup
        os._exit(1)
    import ray.exceptions

    node = "9f3c0e5b7a1d2c4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f809"
    if kind == "startup-timeout":  # ray/_private/node.py raises exactly this
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")
    if kind == "register-worker":
        raise ray.exceptions.RaySystemError("Failed to register worker to Raylet: IOError: [RayletClient] Unable to "
                                            "register worker with raylet. Failed to read data from the socket: End of file")
    raise ray.exceptions.NodeDiedError(f"The node with node id: {node} and address: 10.0.3.7 and node name: 10.0.3.7 "
                                       "has been marked dead because the detector has missed too many heartbeats "
                                       "from it.")
