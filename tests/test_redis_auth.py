"""A Redis server that asks for a password: REDIS_URL carries it, and a wrong one is one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from failfirst.embedded import server_binary
from failfirst.processes import terminate

SECRET = "pw-7f3a9c-secret"


@pytest.fixture
def locked_redis(home: Path) -> Iterator[Path]:
    """A redis-server of its own (the embedded binary) on a private socket, with `requirepass`."""
    folder = Path(tempfile.mkdtemp(prefix="ffauth"))
    sock = folder / "redis.sock"
    proc = subprocess.Popen(
        [str(server_binary()), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--requirepass", SECRET, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(sock.exists, timeout=30)
        yield sock
    finally:
        terminate([proc])
        shutil.rmtree(folder, ignore_errors=True)


def cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=120,
    )


def test_password_in_redis_url_reaches_the_server_and_the_order_completes(locked_redis: Path) -> None:
    url = f"unix://:{SECRET}@{locked_redis}?db=0"
    placed = cli("order", "place", "-c", "c1", "-s", "KB-101", "-q", "1", "-k", "auth-1", "--json", redis_url=url)
    assert placed.returncode == 0, placed.stderr
    order_id = json.loads(placed.stdout)["order_id"]
    burst = cli("worker", "-n", "1", "--burst", "--quiet", redis_url=url)
    assert burst.returncode == 0, burst.stderr
    shown = cli("order", "show", str(order_id), "--json", redis_url=url)
    assert json.loads(shown.stdout)["state"] == "COMPLETED"
    status = cli("status", redis_url=url)
    assert status.returncode == 0 and SECRET not in status.stdout + status.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("unix://:not-the-password-42@{sock}?db=0", "refused the credentials"),
        ("unix://{sock}?db=0", "refused the credentials"),
        ("foo://:not-the-password-42@{sock}", "is not a Redis URL"),
    ],
)
def test_redis_refusing_the_url_is_one_line_that_never_shows_the_password(
    locked_redis: Path, url: str, needle: str
) -> None:
    out = cli("order", "place", "-c", "c1", "-s", "KB-101", "-q", "1", redis_url=url.format(sock=locked_redis))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("failfirst: error:") and needle in lines[0], out.stderr
    assert "not-the-password-42" not in out.stderr


def test_status_heads_a_refused_password_as_credentials_refused_not_unreachable(locked_redis: Path) -> None:
    out = cli("status", "--json", redis_url=f"unix://:not-the-password-42@{locked_redis}?db=0")
    assert out.returncode == 0, out.stderr
    redis = json.loads(out.stdout)["redis"]
    assert redis["state"] == "credentials refused", redis
    assert "not-the-password-42" not in out.stdout
