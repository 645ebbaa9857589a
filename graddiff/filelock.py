"""One writer per trace file: take the lock before anything is truncated.

HDF5 opens a file for writing with ``O_TRUNC`` and only then tries its lock, so a second
``h5py.File(path, "w")`` empties a live run's file before it fails. graddiff therefore opens
the path itself without truncating, refuses what is not a regular file, and takes an exclusive
``flock`` that it holds until the trace is closed; HDF5 then opens the file with its own locking
off (the flock already excludes other writers and HDF5's readers, whatever
``HDF5_USE_FILE_LOCKING`` says). Where the filesystem has no ``flock`` (some network
filesystems), an exclusive lock file ``.NAME.graddiff-lock`` holding ``pid@host`` takes its
place; one left by a killed process on this host is taken over.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: lock files only
    fcntl = None  # type: ignore[assignment]

_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)


class LockError(OSError):
    """The trace file cannot be taken for writing; the message is one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def _kind(mode: int) -> Optional[str]:
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


class WriterLock:
    """Held by a TraceWriter from before the file is truncated until it is closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None
        self._lockfile: Optional[str] = None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LockError(exc.errno, exc.strerror) from None
        else:
            what = _kind(st.st_mode)
            if what:
                raise LockError(errno.EINVAL, f"is {what}, not a trace file")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: follow it, as HDF5 would
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            else:
                raise LockError(exc.errno, exc.strerror) from None
        what = _kind(os.fstat(fd).st_mode)
        if what:
            os.close(fd)
            raise LockError(errno.EINVAL, f"is {what}, not a trace file")
        self._fd = fd
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno in _BUSY:
                    self.release()
                    raise LockError(
                        exc.errno,
                        "locked: another process is writing a trace to this file or reading it; "
                        "the file was left as it is (choose another path, or wait)",
                    ) from None
                # no flock on this filesystem: fall back to a lock file
        self._take_lockfile()

    def _take_lockfile(self) -> None:
        d, base = os.path.split(os.path.abspath(self.path))
        lockfile = os.path.join(d, f".{base}.graddiff-lock")
        me = f"{os.getpid()}@{socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(lockfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not _stale(lockfile):
                    self.release()
                    raise LockError(
                        errno.EAGAIN,
                        f"locked: another process is writing a trace to this file ({lockfile} "
                        "exists); the file was left as it is",
                    ) from None
                try:
                    os.unlink(lockfile)
                except OSError:
                    pass
                continue
            except OSError:
                return  # no lock possible here at all; HDF5's own checks are what is left
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self._lockfile = lockfile
            return

    def release(self) -> None:
        """Drop the lock (idempotent, never raises)."""
        if self._lockfile is not None:
            try:
                os.unlink(self._lockfile)
            except OSError:
                pass
            self._lockfile = None
        if self._fd is not None:
            try:
                os.close(self._fd)  # closing the descriptor releases the flock
            except OSError:
                pass
            self._fd = None


def _stale(lockfile: str) -> bool:
    """A lock file left by a process of this host that no longer runs."""
    try:
        with open(lockfile) as fh:
            pid_s, _, host = fh.read(200).strip().partition("@")
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
