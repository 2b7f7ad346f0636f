"""CPU seconds of this process and every process under it (Ray's daemons and workers), from
``/proc``, and the role of each process (driver, encoder actors, task workers, Ray Data's actors,
Ray's daemons): what `embedjob bench feed` and `bench reuse` measure, so that other load on a shared
machine does not count. Linux only. Example::

    with TreeCpu() as cpu:
        run_something_on_ray()
    cpu.seconds, cpu.by_role()
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process readable in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
    return out


def descendants(root: int, table: Optional[dict[int, tuple[int, float]]] = None) -> list[int]:
    """The pids of every live process below ``root`` (``table``: a :func:`_proc_table`, read now if None)."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: Optional[int] = None) -> float:
    """CPU seconds used so far by process ``root`` (this one) and its live descendants."""
    root = root or os.getpid()
    table = _proc_table()
    return sum(table.get(pid, (0, 0.0))[1] for pid in [root, *descendants(root, table)])


# Roles of the processes under the driver, from their command lines (Ray names a worker's process after
# the task or actor it runs: ``ray::MapWorker(...)``, ``ray::_StatsActor``; an idle one ``ray::IDLE``).
ROLES = ("driver", "encoder actors", "task workers", "progress actor", "Ray Data's actors", "Ray's daemons", "other")
RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py")
RAY_DATA_ACTORS = ("_StatsActor", "ActorLocationTracker", "AutoscalingCoordinator", "SplitCoordinator")


def process_role(cmdline: str) -> str:
    """The role of a process under the driver, from its command line (the driver is told apart by pid)."""
    if "EncodeActor" in cmdline or "MapWorker" in cmdline:
        return "encoder actors"
    if "ProgressCounter" in cmdline:
        return "progress actor"
    if any(a in cmdline for a in RAY_DATA_ACTORS):
        return "Ray Data's actors"
    if any(d in cmdline.lower() for d in RAY_DAEMONS):
        return "Ray's daemons"
    if cmdline.startswith("ray::"):
        return "task workers"
    return "other"


def process_cmdline(pid: int) -> str:
    """The command line of ``pid`` as one string ("" when it is gone, or a zombie's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


class TreeCpu:
    """Samples :func:`tree_cpu_seconds` every ``every`` seconds, so that processes that end before
    the measurement does (Ray Data's task workers) still count up to their last sample; and the
    role of each process (:func:`process_role`: the last one it showed other than idle)."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every = every
        self.seen: dict[int, float] = {}
        self.roles: dict[int, str] = {os.getpid(): "driver"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-feed-cpu")

    def _sample(self) -> None:
        table = _proc_table()
        me = os.getpid()
        for pid in [me, *descendants(me, table)]:
            cpu = table.get(pid, (0, 0.0))[1]
            # new, or working since the last sample: its role from its title now
            if pid != me and (pid not in self.roles or cpu > self.seen.get(pid, 0.0)):
                title = process_cmdline(pid)
                # an idle worker keeps its last role, and so does one ending (a zombie's command line is empty)
                if title and (pid not in self.roles or "IDLE" not in title):
                    self.roles[pid] = process_role(title)
            self.seen[pid] = max(self.seen.get(pid, 0.0), cpu)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "TreeCpu":
        self._sample()
        self.start = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(v - self.start.get(pid, 0.0) for pid, v in self.seen.items())

    def by_role(self) -> dict[str, float]:
        """CPU seconds of each role (:data:`ROLES`) over the measurement."""
        out = dict.fromkeys(ROLES, 0.0)
        for pid, v in self.seen.items():
            out[self.roles.get(pid, "other")] += v - self.start.get(pid, 0.0)
        return {k: round(v, 2) for k, v in out.items()}


# -- waiting for the previous run to settle --------------------------------------------------------
QUIET_CORES = 0.15  # the process tree counts as settled below this CPU rate (Ray's idle daemons use ~0.05)
QUIET_MAX_S = 20.0


def wait_quiet(every: float = 0.5, max_s: float = QUIET_MAX_S) -> float:
    """Wait until this process tree (Ray's daemons and workers) uses under ``QUIET_CORES`` cores over
    ``every`` seconds, at most ``max_s``: the previous run's actors shut down (an encoder actor's exit
    costs about a CPU-second) before the next run is measured, so that no run pays for another's
    teardown. Returns the seconds waited."""
    t0 = time.time()
    last = tree_cpu_seconds()
    while time.time() - t0 < max_s:
        time.sleep(every)
        now = tree_cpu_seconds()
        if now - last < QUIET_CORES * every:
            break
        last = now
    return time.time() - t0
