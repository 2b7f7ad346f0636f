"""One writer at a time on an output: a lease stored beside the outputs as ``_lease.json``.

Two runs writing into one output would commit each other's shards, fail each other's stages and
leave a manifest that contradicts the files. So a run first takes the output's lease:

* no lease yet: it is created only if still absent (atomic: a hard link on local disks, a PUT with
  ``If-None-Match: *`` on S3) and read back, so of two runs racing exactly one holds it;
* a live lease (heartbeat within ``lease_timeout_s``): :class:`LeaseError` naming the holder (host,
  pid, run id, start, last heartbeat) and how to take it over (``--force-unlock``);
* a stale lease (its driver was killed): taken over with a warning naming the old holder. Stale
  means no heartbeat for ``lease_timeout_s``, or at once when the holder ran on this host (same
  hostname and PID namespace) and its process is gone. The takeover replaces the version it read
  (``If-Match`` on S3, a folder lock locally), so two runs taking over one lease cannot both win.

While held, a daemon thread refreshes the heartbeat every ``lease_timeout_s / 4``, only while the
file still names this run; if another run has taken the output over, it logs an error and
:meth:`OutputLease.check` raises, so the job stops before it writes its manifest. :meth:`release`
deletes the file only if it still names this run.

Example::

    with OutputLease(Storage("s3://bucket/out"), timeout_s=120) as lease:
        ...  # write the outputs
        lease.check()  # raises LeaseError if another run took the output over
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Optional

from embedjob.errors import LeaseError
from embedjob.layout import LEASE_FILE
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

_ATTEMPTS = 5  # rounds of look-then-write before giving up on an output whose lease keeps changing


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class LeaseHolder:
    """What ``_lease.json`` says: who holds the output and when it last showed it is alive."""

    run_id: str
    host: str
    pid: int
    started_at: str
    started_epoch: float
    heartbeat_at: str
    heartbeat_epoch: float
    timeout_s: float
    pid_namespace: str = ""  # tells containers that share a hostname apart (Linux)

    @classmethod
    def parse(cls, data: bytes) -> Optional["LeaseHolder"]:
        """The holder in a lease file's bytes, or ``None`` when they are not a lease."""
        try:
            obj = json.loads(data.decode("utf-8"))
            return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})
        except (ValueError, TypeError):
            return None

    def process_gone(self) -> bool:
        """True when the holder ran on this host and its process no longer exists (a killed driver
        on this machine need not wait for the timeout). False whenever it cannot be told."""
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive under another user
            return False
        try:  # a killed process not yet reaped by its parent
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def age(self, now: float) -> float:
        return now - self.heartbeat_epoch

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} on host {self.host} pid {self.pid}, started {self.started_at}, "
                f"last heartbeat {self.heartbeat_at} ({self.age(now):.0f}s ago)")


class OutputLease:
    """The lease of one output (see the module docstring); ``acquire`` / ``release`` or ``with``.

    ``timeout_s``: a lease whose heartbeat is older than this (or than its holder's own timeout,
    if longer) belongs to a dead run and is taken over. ``force``: take over a live lease too.
    """

    def __init__(self, store: Storage, *, timeout_s: float = 120.0, force: bool = False,
                 name: str = LEASE_FILE) -> None:
        if timeout_s <= 0:
            raise ValueError(f"lease timeout must be positive, got {timeout_s}")
        self.store = store
        self.timeout_s = float(timeout_s)
        self.force = force
        self.name = name
        # sortable by start time, unique: names this run's _superseded/<run id>/ folder too
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:12]
        self._started = time.time()
        self._version: Optional[str] = None  # version of the file as this run last wrote it
        self._lost: Optional[str] = None
        self._warned: set[str] = set()  # holders whose takeover was logged (acquire may retry)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- public --------------------------------------------------------------------------------
    def acquire(self) -> "OutputLease":
        """Take the lease or raise :class:`LeaseError`; starts the heartbeat thread."""
        if self._version is not None:
            return self
        for _ in range(_ATTEMPTS):
            current = self._read()
            if current is None:
                written = self.store.create_bytes(self.name, self._body())
            else:
                holder, version = current
                self._refuse_or_warn(holder)
                written = self.store.replace_bytes_if(self.name, self._body(), version)
            if written is None:
                continue  # another run wrote the lease meanwhile: look again
            back = self._read()
            if back and back[0] and back[0].run_id == self.run_id:
                self._version = back[1]
                self._start_heartbeat()
                logger.info("output %s: lease taken by run %s (heartbeat every %gs)", self.store.url(),
                            self.run_id, self.timeout_s / 4)
                return self
        raise LeaseError(f"output {self.store.url()}: could not take its lease {self.name}: it changed "
                         f"{_ATTEMPTS} times while this run tried (other runs are starting there); retry later")

    def check(self) -> None:
        """Raise :class:`LeaseError` if this run no longer holds the lease (read from the store now)."""
        with self._lock:
            if self._lost is None and self._version is not None:
                self._reconcile()
        if self._lost:
            raise LeaseError(self._lost)

    @property
    def lost(self) -> Optional[str]:
        """Why this run lost its lease, or ``None`` while it holds it (as the heartbeat last saw)."""
        return self._lost

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it still names this run. Never raises: a lease
        left behind is taken over once its heartbeat is ``timeout_s`` old."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)
        with self._lock:
            if self._version is None or self._lost:
                return
            try:
                if not self.store.delete_if(self.name, self._version):
                    current = self._read()
                    if current and current[0] and current[0].run_id == self.run_id:
                        self.store.delete_if(self.name, current[1])
            except Exception as e:  # noqa: BLE001 - the job's own outcome matters more
                logger.warning("output %s: could not release lease %s (%s); the next run takes it over "
                               "after %.0fs", self.store.url(), self.name, e, self.timeout_s)
            self._version = None

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- internals -----------------------------------------------------------------------------
    def _body(self) -> bytes:
        now = time.time()
        holder = LeaseHolder(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(),
                             started_at=_iso(self._started), started_epoch=self._started,
                             heartbeat_at=_iso(now), heartbeat_epoch=now, timeout_s=self.timeout_s,
                             pid_namespace=_pid_namespace())
        return (json.dumps({"kind": "embedjob output lease", **asdict(holder)}, indent=2) + "\n").encode()

    def _read(self) -> Optional[tuple[Optional[LeaseHolder], str]]:
        """The lease file's holder (``None`` if unreadable after a few tries) and version, or
        ``None`` when there is no lease."""
        for _ in range(3):
            current = self.store.read_versioned(self.name)
            if current is None:
                return None
            holder = LeaseHolder.parse(current[0])
            if holder is not None:
                return holder, current[1]
            time.sleep(0.1)  # an exclusive create being written (filesystems without hard links)
        return None if current is None else (None, current[1])

    def _refuse_or_warn(self, holder: Optional[LeaseHolder]) -> None:
        """Raise for a live lease held by another run (unless forced); log the takeover otherwise
        (once per holder: acquire may look again after a lost race)."""
        now = time.time()
        url = self.store.url()
        if holder is None:
            if not self.force:
                raise LeaseError(f"output {url} holds an unreadable lease file {self.name}; if no other run "
                                 "writes there, rerun with --force-unlock (output.force_unlock=true)")
            logger.warning("output %s: --force-unlock: replacing an unreadable lease file %s", url, self.name)
            return
        timeout = max(self.timeout_s, holder.timeout_s)
        gone = holder.process_gone()
        live = not gone and holder.age(now) <= timeout
        if live and not self.force:
            raise LeaseError(
                f"output {url} is being written by another run ({holder.describe(now)}); wait for it to "
                f"finish, or if that run is gone, rerun with --force-unlock (output.force_unlock=true) to "
                f"take the output over (a lease without heartbeat for {timeout:.0f}s is taken over by itself)")
        if holder.run_id in self._warned:
            return
        self._warned.add(holder.run_id)
        if gone:
            logger.warning("output %s: taking over the lease of %s: that process is gone from this host",
                           url, holder.describe(now))
        elif live:
            logger.warning("output %s: --force-unlock: taking over the live lease of %s; if that run is still "
                           "alive it stops with an error before writing its manifest", url, holder.describe(now))
        else:
            logger.warning("output %s: taking over the stale lease of %s: no heartbeat for more than %.0fs "
                           "(output.lease_timeout_s), its driver is gone", url, holder.describe(now), timeout)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"embedjob-lease-{self.run_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            with self._lock:
                if self._lost or self._version is None:
                    return
                try:
                    written = self.store.replace_bytes_if(self.name, self._body(), self._version)
                    if written is not None:
                        self._version = written
                    else:
                        self._reconcile()
                except Exception as e:  # noqa: BLE001 - a store hiccup: try again at the next beat
                    logger.warning("output %s: could not refresh lease %s: %s", self.store.url(), self.name, e)
                if self._lost:
                    return

    def _reconcile(self) -> None:
        """After the file changed under this run: keep it if it still names us (or was deleted, then
        write it again), else record the loss. Called with ``self._lock`` held."""
        current = self._read()
        if current is None:
            written = self.store.create_bytes(self.name, self._body())
            if written is not None:
                logger.warning("output %s: lease file %s was deleted while run %s held it; written again",
                               self.store.url(), self.name, self.run_id)
                self._version = written
                return
            current = self._read()
        holder = current[0] if current else None
        if holder is not None and holder.run_id == self.run_id:
            self._version = current[1]
            return
        who = holder.describe(time.time()) if holder else "an unreadable or missing lease file"
        self._lost = (f"output {self.store.url()} was taken over by another run while run {self.run_id} wrote it "
                      f"({who}); this run stops before writing its manifest, the other run's manifest will "
                      "describe the output")
        logger.error("%s", self._lost)
