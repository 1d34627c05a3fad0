"""Shared fixtures: an isolated data directory, a real embedded Redis, real workers.

Every test gets its own FAILFIRST_HOME, so its own SQLite file and its own
embedded redis-server; every process a test starts is stopped by PID at teardown.

The same suite runs against servers when FAILFIRST_TEST_DATABASE_URL (PostgreSQL)
and/or FAILFIRST_TEST_REDIS_URL are set: each test then gets a fresh schema of
its own in that database, dropped at teardown, and the Redis database named by
the URL is flushed before and after each test (tests run one at a time).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from failfirst import config, connections, pipeline, store
from failfirst.embedded import EmbeddedRedis

# Read once, before the `home` fixture clears every FAILFIRST_* variable.
TEST_DATABASE_URL = os.environ.get("FAILFIRST_TEST_DATABASE_URL") or None
TEST_REDIS_URL = os.environ.get("FAILFIRST_TEST_REDIS_URL") or None
if TEST_DATABASE_URL is not None and not store.is_postgres(TEST_DATABASE_URL):
    raise pytest.UsageError(
        "FAILFIRST_TEST_DATABASE_URL must be a PostgreSQL URL (postgresql+psycopg://...): "
        "each test gets a schema of its own in it"
    )

needs_embedded_redis = pytest.mark.skipif(
    TEST_REDIS_URL is not None,
    reason="about the embedded redis-server; FAILFIRST_TEST_REDIS_URL points the suite at a server",
)
needs_sqlite = pytest.mark.skipif(
    TEST_DATABASE_URL is not None,
    reason="about the SQLite file; FAILFIRST_TEST_DATABASE_URL points the suite at a server",
)
needs_servers = pytest.mark.skipif(
    TEST_DATABASE_URL is None or TEST_REDIS_URL is None,
    reason="needs FAILFIRST_TEST_DATABASE_URL (PostgreSQL) and FAILFIRST_TEST_REDIS_URL",
)

FAST = {
    "FAILFIRST_RETRY_BASE": "0.02",
    "FAILFIRST_RETRY_CAP": "0.2",
    "FAILFIRST_INNER_BASE": "0.001",
    "FAILFIRST_INNER_CAP": "0.005",
    "FAILFIRST_RATE_PER_SECOND": "0",
    "FAILFIRST_SCHEDULER_INTERVAL": "0.05",
    "FAILFIRST_RECONCILE_INTERVAL": "0.2",
    "FAILFIRST_PAYMENT_FAIL": "0",
    "FAILFIRST_INVENTORY_FAIL": "0",
}


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, every: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(every)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    data = tmp_path / "ff"
    monkeypatch.setenv("FAILFIRST_HOME", str(data))
    for name in list(os.environ):
        if name.startswith("FAILFIRST_") and name != "FAILFIRST_HOME":
            monkeypatch.delenv(name)
    monkeypatch.delenv("REDIS_URL", raising=False)
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    schema = f"ff_test_{secrets.token_hex(6)}"
    if TEST_DATABASE_URL:
        store.create_schema(TEST_DATABASE_URL, schema)
        monkeypatch.setenv("FAILFIRST_DATABASE_URL", store.with_schema(TEST_DATABASE_URL, schema))
    if TEST_REDIS_URL:
        monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
        _flush(TEST_REDIS_URL)
    store.dispose_all()
    connections.reset_clients()
    pipeline.set_context(None)
    yield data
    pipeline.set_context(None)
    connections.reset_clients()
    store.dispose_all()
    EmbeddedRedis(data).stop()
    if TEST_DATABASE_URL:
        store.drop_schema(TEST_DATABASE_URL, schema)
    if TEST_REDIS_URL:
        _flush(TEST_REDIS_URL)


def _flush(url: str) -> None:
    """Empty the test Redis database (only the one the URL names, never the whole server)."""
    from redis import Redis

    with Redis.from_url(url, socket_timeout=5) as client:
        client.flushdb()


@pytest.fixture
def settings(home: Path) -> config.Settings:
    return config.load()


@pytest.fixture
def workers(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., object]]:
    """Start a supervised worker pool with extra environment; stopped at teardown."""
    from failfirst.supervisor import Supervisor

    started: list[Supervisor] = []

    def start(n: int = 2, **env: str) -> Supervisor:
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        sup = Supervisor(config.load(), count=n)
        sup.start()
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.stop()
