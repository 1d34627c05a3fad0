"""The embedded Redis daemon: up, reuse, down, and recovery after a SIGKILL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import needs_embedded_redis, wait_until

from failfirst.embedded import EmbeddedRedis
from failfirst.processes import running

pytestmark = needs_embedded_redis


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env=dict(os.environ), capture_output=True, text=True, timeout=60,
    )


def started_pid(out: str) -> int:
    match = re.search(r"pid (\d+)", out)
    assert match, out
    return int(match.group(1))


def test_up_down_up_and_a_second_up_reuses_the_server(home: Path) -> None:
    server = EmbeddedRedis(home)
    first = cli("up")
    assert first.returncode == 0, first.stderr
    assert "started" in first.stdout
    pid = started_pid(first.stdout)
    assert server.running() and server.pid() == pid

    again = cli("up")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert started_pid(again.stdout) == pid

    down = cli("down")
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert not server.socket.exists()
    assert not server.pidfile.exists()
    wait_until(lambda: not running(pid), timeout=10)
    assert not server.running()

    third = cli("up")
    assert third.returncode == 0, third.stderr
    assert "started" in third.stdout
    assert server.running()
    assert server.pid() == started_pid(third.stdout)

    cli("down")
    assert not server.socket.exists()


def test_sigkilled_server_is_reported_down_and_replaced(home: Path) -> None:
    server = EmbeddedRedis(home)
    up = cli("up")
    assert up.returncode == 0, up.stderr
    old = started_pid(up.stdout)

    assert server.kill() == old
    wait_until(lambda: not running(old), timeout=10)

    status = cli("status")
    assert status.returncode == 0, status.stderr
    redis_line = next(line for line in status.stdout.splitlines() if line.startswith("redis"))
    assert "not running" in redis_line
    assert not server.running()

    up2 = cli("up")
    assert up2.returncode == 0, up2.stderr
    assert "started" in up2.stdout
    new = started_pid(up2.stdout)
    assert new != old
    assert server.running() and server.pid() == new

    down = cli("down")
    assert down.returncode == 0, down.stderr
    assert not server.socket.exists()
    assert not server.running()


def test_down_without_a_server_is_harmless(home: Path) -> None:
    out = cli("down")
    assert out.returncode == 0, out.stderr
    assert "not running" in out.stdout
