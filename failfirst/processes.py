"""Stopping processes: the ones failfirst started, politely first, then for certain; and its own, quickly."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def terminate(procs: Sequence[subprocess.Popen[Any]], grace: float = 10.0, *, group: bool = False) -> None:
    """SIGTERM each process still running, give them `grace` seconds in all, then SIGKILL.

    One shared deadline, not one per process, so stopping many takes `grace`
    at most. With `group`, each process leads its own process group and the
    whole group is SIGKILLed at the end even when the leader exited cleanly, so
    no child it left behind survives.
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(deadline - time.monotonic(), 0.01))
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
        proc.wait()


def running(pid: int) -> bool:
    """Whether a process of this machine still runs: exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def exit_without_collecting() -> None:
    """Let this process exit without the interpreter's final garbage collections.

    Python collects garbage while it tears its modules down at exit; with
    SQLAlchemy, SQLModel and RQ loaded that took 100-200 ms, added to every
    command and to every worker stop. Freezing the heap from the last exit
    handler skips those collections: exit handlers still run, the standard
    streams are still flushed, and the operating system takes the memory back.
    """
    atexit.unregister(gc.freeze)  # once per process, however often it is asked
    atexit.register(gc.freeze)
