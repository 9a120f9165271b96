"""An exclusive lock on a run's workdir, held for the whole run.

Local and network filesystems: ``flock`` on ``WORKDIR/rpg_jax.lock``. The kernel drops the
lock when its holder dies (even by SIGKILL), so a dead run never blocks a resume; the file
names the holder (host, pid, start time) for the error a second run gets.

Object stores (``gs://``, ``s3://``: no file locks) and filesystems without ``flock``: a
lease file ``WORKDIR/rpg_jax.lease`` holding the host, pid and a heartbeat that a
background thread renews every ``heartbeat_s`` seconds. A lease whose heartbeat is older
than ``stale_s``, or whose holder on this host is no longer alive, is stale and taken over.
Two runs starting within the same second can both read "free" on a store without atomic
create-if-absent; the taker re-reads the lease after writing it and gives way if another
run's lease replaced its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

LOCK_FILE = "rpg_jax.lock"
LEASE_FILE = "rpg_jax.lease"


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir."""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (no holder recorded)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r} "
            f"(running since {holder.get('started')})")


def is_object_store(workdir: str) -> bool:
    """True for URLs such as ``gs://bucket/run`` (no POSIX file locks)."""
    return "://" in str(workdir)


class _FlockLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json(self.path)
                os.close(fd)
                raise WorkdirBusyError(
                    f"workdir {os.path.dirname(self.path)!r} is in use by the run of "
                    f"{_describe(holder)}; wait for it to finish, stop it, or use another "
                    "workdir") from None
            except OSError:
                os.close(fd)
                raise
            try:  # the previous holder may have removed the file between open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: a waiting opener re-checks the inode
        os.close(self.fd)
        self.fd = None


class _Lease:
    def __init__(self, workdir: str, heartbeat_s: float, stale_s: float):
        from etils import epath

        self.path = epath.Path(workdir) / LEASE_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = {**_holder(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        self.path.write_text(json.dumps({**self.record, "heartbeat": time.time()}))

    def _alive(self, lease: dict[str, Any]) -> bool:
        if time.time() - float(lease.get("heartbeat", 0)) > self.stale_s:
            return False
        if lease.get("host") == socket.gethostname():
            try:
                os.kill(int(lease["pid"]), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, KeyError, ValueError):
                pass
        return True

    def _busy(self, lease: dict[str, Any]) -> WorkdirBusyError:
        age = time.time() - float(lease.get("heartbeat", 0))
        return WorkdirBusyError(
            f"workdir {str(self.path.parent)!r} is leased by the run of {_describe(lease)}, "
            f"last heartbeat {age:.0f} s ago (stale after {self.stale_s:.0f} s); wait for it "
            f"to finish, stop it, or use another workdir")

    def acquire(self) -> None:
        lease = self._read()
        if lease is not None and lease.get("token") != self.record["token"] \
                and self._alive(lease):
            raise self._busy(lease)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        time.sleep(min(1.0, self.heartbeat_s))
        lease = self._read()
        if lease is None or lease.get("token") != self.record["token"]:
            raise self._busy(lease or {})
        self._thread = threading.Thread(target=self._beat, name="rpg_jax-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lease = self._read()
        if lease is not None and lease.get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def locked(workdir: str, *, lease: bool | None = None, heartbeat_s: float = 30.0,
           stale_s: float = 120.0) -> Iterator[None]:
    """Holds an exclusive lock on ``workdir`` (created if needed) for the ``with`` block.

    Raises ``WorkdirBusyError`` naming the holder when another live run has it. ``lease``
    forces (True) or forbids (False) the lease file; by default object stores get a lease,
    local paths ``flock`` (and a lease where the filesystem has no ``flock``).
    """
    if lease is None:
        lease = is_object_store(workdir)
    if not lease:
        os.makedirs(workdir, exist_ok=True)
        lock: _FlockLock | _Lease = _FlockLock(workdir)
        try:
            lock.acquire()
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            lock = _Lease(workdir, heartbeat_s, stale_s)
            lock.acquire()
    else:
        lock = _Lease(workdir, heartbeat_s, stale_s)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
