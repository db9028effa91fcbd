"""One run per folder: a lock file holding the owner's PID and host.

    lock = acquire("runs/rnb", "rbvl train")   # LockError while another live process holds it
    ...
    lock.release()                              # also released when the process exits, however it exits

The lock is `FOLDER/.rbvl.lock`, opened and held with `fcntl.flock`, so the kernel frees it when its process dies
(a SIGKILL, a crash): a lock file left behind is stale, detected by taking the flock, and taken over with a
warning. Its text (JSON: pid, host, command, started) is what the refusal shows. On a file system without flock the
PID is checked instead (same host only; a lock from another host is then trusted until removed by hand).
A process that already holds a folder's lock gets the same lock again (in-process reruns, tests). A forked child
(a DataLoader worker) drops its copy of the lock at fork, so workers outliving a killed run do not hold its folder.
"""

from __future__ import annotations

import atexit
import datetime as dt
import errno
import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".rbvl.lock"
_HELD: dict[str, RunLock] = {}  # resolved folder → the lock this process holds


class LockError(RuntimeError):
    """The folder is in use by another live run, or cannot hold a lock; one line."""


class RunLock:
    def __init__(self, folder: Path, fd: int | None):
        self.folder, self.fd = folder, fd  # the resolved folder: the key in _HELD, and a path cwd changes keep
        self.path = folder / LOCK_NAME

    def release(self) -> None:
        """Remove the lock file and drop the flock (idempotent)."""
        if _HELD.get(str(self.folder)) is not self:
            return
        del _HELD[str(self.folder)]
        try:
            if _owner(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            if self.fd is not None:
                os.close(self.fd)  # closing drops the flock
                self.fd = None


def acquire(folder: str | Path, command: str = "rbvl") -> RunLock:
    """Lock `folder` (created if needed) for this process, or raise LockError naming the live owner."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LockError(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        return _HELD[key]
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _flock(fd)
    except OSError:
        os.close(fd)
        raise
    previous = _owner(path)
    if locked is False or (locked is None and _alive(previous)):
        os.close(fd)
        raise LockError(
            f"{folder} is in use by another run ({_describe(previous)}); wait for it, or choose another folder"
        )
    if previous.get("pid") and previous.get("pid") != os.getpid():
        log.warning("%s: taking over a stale lock (%s, no longer running)", folder, _describe(previous))
    text = json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, (text + "\n").encode(), 0)
    os.fsync(fd)
    lock = RunLock(Path(key), fd)
    _HELD[key] = lock
    return lock


def _forget_in_child() -> None:
    """In a forked child (a DataLoader worker): close its copy of each lock's descriptor. A flock belongs to the open
    file, which fork shares, so a worker left running for seconds after its run was killed kept the folder locked and
    an immediate resume was refused; the child never holds the run's lock itself."""
    for lock in _HELD.values():
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def release(folder: str | Path) -> None:
    """Release this process's lock on `folder`, if it holds one."""
    lock = _HELD.get(str(Path(folder).resolve()))
    if lock is not None:
        lock.release()


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise


def _owner(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(owner: dict) -> bool:
    """Whether the lock's owner still runs (without flock: by PID, on this host; another host's lock is trusted)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"PID {owner.get('pid')} on {owner.get('host')}, {owner.get('command', '?')}, since {owner.get('started')}"


def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(_release_all)
