"""A watchdog for reads that HDF5 cannot finish: the command runs in a forked child.

Why a child process: a corrupt HDF5 structure (16 zeroed bytes over a global-heap object
header) makes the C library loop forever while it holds the GIL, so nothing in the same
process (a timer thread, a signal handler) ever runs again. The parent only waits: the child
runs the command and sends a heartbeat byte from a thread every 0.25 s, which needs the GIL;
when no heartbeat arrives for ``GRADDIFF_WATCHDOG`` seconds (default 30; 0 turns the watchdog
off) the parent kills the child and ends with exit 2 and one ``Error:`` line. A stall, not a
total time, is watched, so a long but healthy comparison is never cut short. The child inherits
stdin/stdout/stderr, so output streams as usual. Where ``os.fork`` is missing (Windows), or
stdout is not an OS file (click's CliRunner), the command runs in-process, unwatched.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Callable

DEFAULT_STALL_S = 30.0
HEARTBEAT_S = 0.25
#: After Ctrl-C, how long the child may take to stop by itself before it is killed.
INTERRUPT_GRACE_S = 2.0


def stall_limit() -> float:
    """Seconds without progress before the command is stopped (0: no watchdog)."""
    raw = os.environ.get("GRADDIFF_WATCHDOG", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_STALL_S
    except ValueError:
        return DEFAULT_STALL_S


def _heartbeat(fd: int) -> None:
    while True:
        try:
            os.write(fd, b".")
        except OSError:
            return
        time.sleep(HEARTBEAT_S)


def _real_streams() -> bool:
    """stdout and stderr are OS files (not click's CliRunner buffers, which a child cannot fill)."""
    try:
        sys.stdout.fileno()
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def run_watched(fn: Callable[[], int], on_stall: Callable[[float], int]) -> int:
    """Run ``fn`` (which returns an exit code) in a child; ``on_stall(limit)`` when it hangs."""
    limit = stall_limit()
    if limit <= 0 or not hasattr(os, "fork") or not _real_streams():
        return fn()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run the command, exit with its code (no parent cleanup twice)
        code = 70
        try:
            os.close(r)
            threading.Thread(target=_heartbeat, args=(w,), daemon=True).start()
            code = fn()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)
    os.close(w)
    return _wait(pid, r, limit, on_stall)


def _wait(pid: int, r: int, limit: float, on_stall: Callable[[float], int]) -> int:
    interrupted: list[float] = []

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:  # the child got it too (same process group)
            interrupted.append(time.monotonic())
        else:
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        last = time.monotonic()
        while True:
            ready, _, _ = select.select([r], [], [], 0.5)
            now = time.monotonic()
            if ready:
                if not os.read(r, 4096):
                    break  # EOF: the child has exited
                last = now
            if interrupted and now - interrupted[0] > INTERRUPT_GRACE_S:
                _kill(pid)
                print("Error: interrupted", file=sys.stderr)
                return 130
            if now - last > limit:
                _kill(pid)
                return on_stall(limit)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
        for s, h in old.items():
            signal.signal(s, h)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
