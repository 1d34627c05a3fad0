"""`failfirst worker` as a user runs it: supervised, and stopped cleanly by SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq.worker import Worker

from failfirst import config, connections
from tests.conftest import wait_until


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def started_pids(proc: subprocess.Popen[str], count: int) -> list[int]:
    pids: list[int] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while len(pids) < count and time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"worker started (\d+)", line)
        if match:
            pids.append(int(match.group(1)))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_command_stops_every_worker_process_on_signal(home: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "failfirst", "worker", "-n", "2"],
        env=dict(os.environ), stdout=subprocess.PIPE, text=True,
    )
    try:
        pids = started_pids(proc, 2)
        assert len(pids) == 2
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
        wait_until(lambda: not any(alive(p) for p in pids), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_killed_with_sigkill_is_replaced_by_the_supervisor(home: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "failfirst", "worker", "-n", "1"],
        env=dict(os.environ), stdout=subprocess.PIPE, text=True,
    )
    try:
        (first,) = started_pids(proc, 1)
        redis = connections.get_redis(config.load(), start=False)
        wait_until(lambda: first in {w.pid for w in Worker.all(connection=redis)}, timeout=30)
        os.kill(first, signal.SIGKILL)
        (second,) = started_pids(proc, 1)
        assert second != first
        assert alive(second)
        # The dead worker cannot unregister itself; the supervisor strikes it from RQ's registry.
        wait_until(lambda: {w.pid for w in Worker.all(connection=redis)} == {second}, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_until(lambda: not alive(second), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
