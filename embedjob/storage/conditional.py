"""Conditional writes of :class:`embedjob.storage.Storage` (the output's lease): create only if
absent, and replace or delete only if unchanged since a given version (a content hash on local
disks, the ETag on S3, where ``If-None-Match: *`` / ``If-Match`` make them atomic)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import threading
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

logger = logging.getLogger("embedjob.storage")

# Serialises conditional writes on stores that offer no atomic ones (memory://, gs://...): exact
# within one process, best effort across processes (the lease reads its writes back).
_FALLBACK_LOCK = threading.Lock()


class ConditionalWrites:
    """Mixed into :class:`~embedjob.storage.Storage`: uses its ``fs``, ``protocol``, ``path``,
    ``read_bytes``, ``write_bytes``, ``exists`` and ``delete``."""

    fs: Any
    protocol: str

    def read_versioned(self, rel: str) -> Optional[tuple[bytes, str]]:
        """Content and version of ``rel`` read together (``None`` if absent); the version is what
        :meth:`replace_bytes_if` and :meth:`delete_if` compare against."""
        path = self.path(rel)
        if self.protocol == "s3":
            from fsspec.asyn import sync

            async def get() -> tuple[bytes, str]:
                bucket, key, _ = self.fs.split_path(path)
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    return await body.read(), resp["ETag"]

            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create_bytes(self, rel: str, data: bytes) -> Optional[str]:
        """Write ``rel`` only if it does not exist: the version written, or ``None`` if it exists.

        Atomic on local disks (a complete temporary file hard-linked into place) and on S3 (a PUT
        with ``If-None-Match: *``); elsewhere check-then-write."""
        final = self.path(rel)
        if self.protocol == "file":
            parent = posixpath.dirname(final)
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, final)  # fails if final exists; readers never see a partial file
            except FileExistsError:
                return None
            except OSError as e:  # a filesystem without hard links: exclusive create, then write
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                try:
                    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return None
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            finally:
                os.unlink(tmp)
            return _digest(data)
        if self.protocol == "s3":
            try:
                return self.fs.pipe_file(final, data, mode="create")["ETag"]
            except FileExistsError:
                return None
            except OSError as e:  # 501 NotImplemented, or a 412 without its condition named
                if e.errno not in (errno.ENOSYS, errno.EINVAL):
                    raise
                if self.exists(rel):
                    return None
                _warn_unconditional(self, "If-None-Match", e)
        with _FALLBACK_LOCK:
            if self.exists(rel):
                return None
            self.write_bytes(rel, data)
            if self.protocol == "s3":
                written = self.read_versioned(rel)
                return written[1] if written else None
        return _digest(data)

    def replace_bytes_if(self, rel: str, data: bytes, version: str) -> Optional[str]:
        """Overwrite ``rel`` only if it is still at ``version``: the new version, or ``None`` if it
        changed or is gone (S3: ``If-Match``; local: under an exclusive lock of its folder)."""
        if self.protocol == "s3":
            try:
                return self.fs.pipe_file(self.path(rel), data, IfMatch=version)["ETag"]
            except FileNotFoundError:
                return None
            except OSError as e:
                if not self._unconditional_fallback(rel, version, "If-Match", e):
                    return None
                return self.fs.pipe_file(self.path(rel), data)["ETag"]
        with self._guard(rel):
            current = self.read_versioned(rel)
            if current is None or current[1] != version:
                return None
            self.write_bytes(rel, data)
        return _digest(data)

    def delete_if(self, rel: str, version: str) -> bool:
        """Delete ``rel`` only if it is still at ``version``; whether it was deleted."""
        if self.protocol == "s3":
            bucket, key, _ = self.fs.split_path(self.path(rel))
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            except FileNotFoundError:
                return False
            except OSError as e:
                if not self._unconditional_fallback(rel, version, "If-Match", e):
                    return False
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key)
            finally:
                self.fs.invalidate_cache(self.path(rel))
            return True
        with self._guard(rel):
            current = self.read_versioned(rel)
            if current is None or current[1] != version:
                return False
            self.delete(rel)
        return True

    def _unconditional_fallback(self, rel: str, version: str, header: str, e: OSError) -> bool:
        """After a refused conditional S3 request: True when ``rel`` is still at ``version``, i.e.
        the store rejected the header itself rather than the condition (then write without it)."""
        current = self.read_versioned(rel)
        if current is None or current[1] != version:
            return False
        _warn_unconditional(self, header, e)
        return True

    @contextmanager
    def _guard(self, rel: str) -> Iterator[None]:
        """Exclusive lock for a read-compare-write of ``rel``: ``flock`` on its local folder (held
        by this process only, released by the kernel if it dies), else a process-wide lock."""
        if self.protocol != "file":
            with _FALLBACK_LOCK:
                yield
            return
        import fcntl

        parent = posixpath.dirname(self.path(rel))
        os.makedirs(parent, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY)
        try:
            locked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # some network filesystems cannot lock a folder
                locked = False
                logger.debug("cannot lock %s (%s); only this process's writers are excluded", parent, e)
            with nullcontext() if locked else _FALLBACK_LOCK:
                yield
        finally:
            os.close(fd)  # releases the flock


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_warned_unconditional: set[str] = set()


def _warn_unconditional(store: Any, header: str, e: OSError) -> None:
    if store.root not in _warned_unconditional:
        _warned_unconditional.add(store.root)
        logger.warning("storage %s refused a conditional request (%s: %s); writing without it, so two "
                       "writers racing on the same file are not excluded there", store.url(), header, e)
