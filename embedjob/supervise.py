"""``embedjob run`` as a thin supervising parent over the driver process.

Ray's C++ core worker ends a driver with ``_exit(1)`` when Ray's runtime fails under it in ways
Python never sees (its raylet gone, "Failed to register worker to Raylet" on a loaded machine):
no exception, no ``finally``, Ray's message only in its log file. So the ``embedjob`` command runs
the job in a child process (same interpreter, same arguments) and stays beside it:

* SIGTERM and SIGINT sent to the command (alone or to its process group) reach the driver once:
  the driver runs in a process group of its own, and the parent forwards each signal it gets.
  The driver's preemption handling (``preempt.py``) then ends it with 75 and its one line;
* the driver tells the parent the exit status it means to end with (through a pipe, as
  ``embedjob.cli.main`` returns). The parent ends with that status, its output untouched;
* a driver that ends with no status told (exit 1 from Ray's core worker, or any ``_exit``): the
  parent prints one line naming what happened, Ray's last warning in the driver's log
  (``python-core-driver-*_<pid>.log``) and where Ray's logs are, and exits 2; ``-v`` prints the
  log's last lines first;
* a driver killed by a signal: SIGTERM or SIGINT that the parent forwarded is an interrupted run
  (75 with the resume line, or 130); SIGSEGV, SIGABRT, SIGBUS, SIGILL or SIGFPE is a crash in
  native code (one line, exit 2); any other signal (SIGKILL: the kernel's out-of-memory killer) is
  reported in one line and the parent ends by the same signal, so its caller sees it killed;
* a parent that dies takes the driver with it (``PR_SET_PDEATHSIG`` on Linux, and the driver
  checks its parent at start).

Only the console command supervises: ``embedjob.cli.main(argv)`` called with an argument list
runs in-process, and ``EMBEDJOB_NO_SUPERVISOR=1`` runs the command without the parent. Stdout and
stderr are the command's own (inherited, not piped): progress lines and colours stay as they are.

Example::

    $ embedjob run job.yaml          # a raylet lost under the driver:
    embedjob: error: the driver ended abruptly (exit 1, no Python error: ...): the raylet is gone
    (The connection to the plasma store is failed. ...); committed shards are kept, rerun the same
    command to continue; Ray's logs: /tmp/ray/session_.../logs (-v shows the driver's last log lines)
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
from typing import Callable, Optional

from embedjob.preempt import EXIT_INTERRUPTED, resume_hint
from embedjob.ray_errors import ray_failure_in_text

CHILD_ENV = "EMBEDJOB_SUPERVISED"  # "<status fd>:<parent pid>", set by the parent for the driver
OFF_ENV = "EMBEDJOB_NO_SUPERVISOR"
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)
_LOG_LINE = re.compile(r"^\[[^\]]* ([WEF]) \d+ \d+\] (?:\([^)]*\) )?(?:[\w.]+:\d+: )?(.*)$")
_PR_SET_PDEATHSIG = 1


def console(run: Callable[[list[str]], int], argv: list[str]) -> int:
    """The ``embedjob`` command: ``run`` in this process, as the supervised driver, or under a
    supervising parent (``embedjob run``)."""
    marker = os.environ.pop(CHILD_ENV, None)
    if marker:
        return _as_driver(run, argv, marker)
    if _command(argv) == "run" and os.environ.get(OFF_ENV, "") in ("", "0"):
        return supervise(argv)
    return run(argv)


def _command(argv: list[str]) -> Optional[str]:
    """The subcommand: the first argument after the top-level options (``-v``)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _as_driver(run: Callable[[list[str]], int], argv: list[str], marker: str) -> int:
    """Run the job and tell the parent the exit status (any way Python ends: returned, ``sys.exit``,
    an error raised). Saying nothing means Python never got to end: the parent reports it."""
    fd_text, _, ppid = marker.partition(":")
    fd = int(fd_text)
    try:
        os.set_inheritable(fd, False)  # the driver's own subprocesses (Ray's) do not hold the parent's pipe
    except OSError:  # no pipe: a marker inherited by mistake; run as a plain command
        return run(argv)
    _follow_parent(int(ppid or 0))
    code: object = 1
    try:
        code = run(argv)
        return int(code)
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        raise
    finally:
        try:
            os.write(fd, f"exit {int(code) if isinstance(code, int) else 1}\n".encode())
            os.close(fd)
        except OSError:
            pass


def _follow_parent(ppid: int) -> None:
    """Die with the supervising parent: Linux sends SIGKILL when it ends (the kernel's
    ``PR_SET_PDEATHSIG``); one already gone before this ran ends the driver now."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if ppid and os.getppid() != ppid:
        os._exit(128 + int(signal.SIGKILL))


def supervise(argv: list[str]) -> int:
    """Run ``embedjob <argv>`` as a child driver and end as the module's doc says."""
    r, w = os.pipe()
    env = {**os.environ, CHILD_ENV: f"{w}:{os.getpid()}"}
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen([sys.executable, "-m", "embedjob", *argv], env=env, pass_fds=(w,), **group)
    os.close(w)
    forwarded: set[int] = set()

    def forward(signum: int, frame: object) -> None:
        forwarded.add(signum)
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    told = _told_status(r)
    verbose = any(a in ("-v", "--verbose") for a in argv[: argv.index("run")])  # embedjob's -v, not the job's
    if rc < 0:
        return _killed(-rc, forwarded, argv, proc.pid, verbose)
    if told is None and rc != 0:
        _say(_abrupt_line(rc, argv, proc.pid, verbose))
        return 2
    if told is not None and rc != told:  # Ray's core worker ended the driver after the job had ended
        _say(f"embedjob: note: the driver ended with exit {rc} after the run ended {told} (Ray's runtime as it "
             f"shut down); {_logs_where(proc.pid)}")
    return rc if told is None else told


def _told_status(r: int) -> Optional[int]:
    """The last ``exit N`` the driver wrote on the status pipe, if any."""
    os.set_blocking(r, False)
    data = b""
    try:
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:  # a process of the driver's (none should) still holds the pipe open
        pass
    finally:
        os.close(r)
    codes = [int(m) for m in re.findall(rb"^exit (-?\d+)$", data, re.M)]
    return codes[-1] if codes else None


def _killed(sig: int, forwarded: set[int], argv: list[str], pid: int, verbose: bool) -> int:
    """Exit status for a driver ended by signal ``sig``."""
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    if sig == signal.SIGTERM and sig in forwarded:  # before the driver's own handling was in place
        _say(f"embedjob: interrupted by SIGTERM before the job started: 0 shard(s) committed in this run; "
             f"{resume_hint(argv)}")
        return EXIT_INTERRUPTED
    if sig == signal.SIGINT and sig in forwarded:
        _say("embedjob: interrupted; committed shards are kept, rerun to continue")
        return 130
    if sig in CRASH_SIGNALS:
        if verbose:
            _print_log_tail(pid)
        _say(f"embedjob: error: the driver crashed ({name}) in native code (Ray's core worker, torch or another "
             f"library); committed shards are kept, {resume_hint(argv)}; {_logs_where(pid)}")
        return 2
    _say(f"embedjob: the driver was killed ({name}{', e.g. by the out-of-memory killer' if sig == 9 else ''}); "
         f"committed shards are kept, {resume_hint(argv)}")
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)  # end as the driver did: the caller sees a killed run
    return 128 + sig


def _abrupt_line(rc: int, argv: list[str], pid: int, verbose: bool) -> str:
    log = _driver_log(pid)
    last = _last_warning(log) if log else None
    if verbose and log:
        _print_log_tail(pid)
    what = ray_failure_in_text(last) if last else None
    said = f"{what or 'Ray said'} ({last})" if last else "Ray's log of the driver says nothing of it"
    return (f"embedjob: error: the driver ended abruptly (exit {rc}, no Python error: Ray's core worker ends a "
            f"driver so when Ray's runtime fails under it): {said}; committed shards are kept, {resume_hint(argv)}; "
            f"{_logs_where(pid)}")


def _ray_tmp() -> str:
    return os.environ.get("RAY_TMPDIR") or "/tmp/ray"


def _driver_log(pid: int) -> Optional[str]:
    """Ray's core-worker log of the driver process ``pid`` (the newest session's), if any."""
    found = glob.glob(os.path.join(_ray_tmp(), "session_*", "logs", f"python-core-driver-*_{pid}.log"))
    return max(found, key=os.path.getmtime) if found else None


def _logs_where(pid: int) -> str:
    log = _driver_log(pid)
    where = os.path.dirname(log) if log else os.path.join(_ray_tmp(), "session_latest", "logs")
    return f"Ray's logs: {where} (on each node; -v shows the driver's last log lines)"


def _tail(path: str, n: int = 20) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64 * 1024))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _last_warning(log: str) -> Optional[str]:
    """The text of the last warning, error or fatal line of a Ray log (its final words)."""
    for line in reversed(_tail(log, 200)):
        m = _LOG_LINE.match(line)
        if m:
            text = m.group(2).strip()
            return text if len(text) <= 300 else text[:297] + "..."
    return None


def _print_log_tail(pid: int) -> None:
    log = _driver_log(pid)
    if log:
        _say(f"--- the last lines of {log}:\n" + "\n".join(_tail(log)))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
