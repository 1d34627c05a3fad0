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
from redis import Redis
from rq.worker import Worker
from sqlalchemy import select

from failfirst import config, connections, models, store
from failfirst.embedded import EmbeddedRedis
from failfirst.errors import RedisUnavailable
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.processes import running, terminate
from failfirst.supervisor import _await_ready
from tests.conftest import needs_embedded_redis, needs_sqlite, wait_until


def reachable_redis() -> Redis | None:
    try:
        return connections.get_redis(config.load(), start=False)
    except RedisUnavailable:
        return None


def start_redis_and_drive_one_order(home: Path, key: str) -> None:
    """Start the embedded Redis, place one order, and wait until a worker already running completes it."""
    settings = config.load()
    EmbeddedRedis(home).start()
    redis = connections.get_redis(settings, start=False)
    gateway = Gateway(settings, store.open_store(settings.database_url), redis)
    order = gateway.place(PlaceRequest("cust", "KB-101", 1, key)).order_id
    o = models.orders

    def completed() -> bool:
        with store.open_store(settings.database_url).connect() as conn:
            return conn.execute(select(o.c.state).where(o.c.id == order)).scalar_one() == "COMPLETED"

    wait_until(completed, timeout=60)


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
        wait_until(lambda: not any(running(p) for p in pids), timeout=30)
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
        # Workers are started before the supervisor has started Redis; they wait for it.
        redis = wait_until(reachable_redis, timeout=30)
        wait_until(lambda: first in {w.pid for w in Worker.all(connection=redis)}, timeout=30)
        os.kill(first, signal.SIGKILL)
        (second,) = started_pids(proc, 1)
        assert second != first
        assert running(second)
        # The dead worker cannot unregister itself; the supervisor strikes it from RQ's registry.
        wait_until(lambda: {w.pid for w in Worker.all(connection=redis)} == {second}, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_until(lambda: not running(second), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_embedded_redis
@needs_sqlite
def test_worker_started_before_redis_answers_waits_for_it_and_then_drives_orders(home: Path) -> None:
    settings = config.load()
    db = store.sqlite_path(settings.database_url)
    assert db is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "failfirst.workerproc", "early-worker"],
        env=dict(os.environ), stdin=subprocess.DEVNULL,
    )
    try:
        # The worker opens the store before it looks for Redis: once the file is
        # open, it is in its wait for Redis.
        def holds_store_open() -> bool:
            fds = Path(f"/proc/{proc.pid}/fd")
            return any(os.path.realpath(fd) == str(db) for fd in fds.iterdir())

        wait_until(holds_store_open, timeout=60)
        assert proc.poll() is None
        start_redis_and_drive_one_order(home, "early")
        assert proc.poll() is None, "the worker died instead of waiting for Redis"
    finally:
        terminate([proc])


def test_workers_open_no_rq_command_channel(home: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "failfirst", "worker", "-n", "2"],
        env=dict(os.environ), stdout=subprocess.PIPE, text=True,
    )
    try:
        pids = set(started_pids(proc, 2))
        redis = wait_until(reachable_redis, timeout=30)
        wait_until(lambda: pids <= {w.pid for w in Worker.all(connection=redis)}, timeout=30)
        ours = {f"rq:pubsub:{w.name}".encode() for w in Worker.all(connection=redis) if w.pid in pids}
        # RQ's stop waited up to a second for this channel's listener thread.
        assert not ours & set(redis.pubsub_channels("rq:pubsub:*"))  # type: ignore[union-attr]
    finally:
        terminate([proc])


def test_supervisor_waits_for_every_worker_to_report_ready_or_die() -> None:
    ready, dead, silent = os.pipe(), os.pipe(), os.pipe()
    os.write(ready[1], b"1")
    os.close(dead[1])  # a worker that died before reporting closes its end
    _await_ready([ready[0], dead[0]], timeout=60)
    os.close(ready[1])
    # Every read end is closed once the wait is over, whatever ended it.
    for fd in (ready[0], dead[0]):
        with pytest.raises(OSError):
            os.fstat(fd)
    _await_ready([silent[0]], timeout=0.05)
    with pytest.raises(OSError):
        os.fstat(silent[0])
    os.close(silent[1])


@needs_embedded_redis
def test_supervisor_that_does_not_own_redis_leaves_it_down_and_its_workers_wait(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from failfirst import supervisor

    monkeypatch.setattr(supervisor, "READY_WAIT", 0.2)
    settings = config.load()
    sup = supervisor.Supervisor(settings, count=1, start_redis=False)
    sup.start()
    try:
        # A chaos run's outage at its first instant: the pool must not end it.
        assert not EmbeddedRedis(home).running()
        start_redis_and_drive_one_order(home, "waited")
    finally:
        sup.stop()


def test_supervisor_that_cannot_reach_redis_leaves_no_worker_and_no_open_pipe(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from failfirst import supervisor

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    fds_before = set(os.listdir("/proc/self/fd"))
    sup = supervisor.Supervisor(config.load(), count=2)
    with pytest.raises(RedisUnavailable):
        sup.start()
    assert len(sup.procs) == 2
    assert all(proc.poll() is not None for proc in sup.procs)
    assert set(os.listdir("/proc/self/fd")) <= fds_before


def test_workers_of_a_killed_host_are_struck_from_rqs_registry_by_a_supervisor_on_the_same_machine(
    home: Path,
) -> None:
    from failfirst.supervisor import Supervisor

    redis = connections.get_redis(config.load())
    host = subprocess.Popen(
        [sys.executable, "-m", "failfirst", "worker", "-n", "1"],
        env=dict(os.environ), stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        [pid] = started_pids(host, 1)

        def registered() -> set[int | None]:
            return {w.pid for w in Worker.all(connection=redis)}

        wait_until(lambda: pid in registered(), timeout=60)
        os.killpg(host.pid, signal.SIGKILL)  # the whole host: its supervisor cannot forget the worker
        host.wait()
        wait_until(lambda: not running(pid), timeout=30)
        assert pid in registered()
        survivor = Supervisor(config.load(), count=1)
        survivor.start()
        try:
            wait_until(lambda: pid not in registered(), timeout=60)
        finally:
            survivor.stop()
    finally:
        terminate([host], group=True)


def test_worker_dequeues_on_connections_with_rqs_socket_timeout_not_the_clients(home: Path) -> None:
    from failfirst.pipeline import context
    from failfirst.workerproc import rq_worker

    connections.get_redis(config.load())  # the embedded server, unless the suite runs on one
    ctx = context()  # pings: the pool now holds a connection made with get_redis's 5 s
    worker = rq_worker(ctx, "timeout-check")
    pool = ctx.redis.connection_pool
    conn = pool.get_connection()
    try:
        # An idle worker blocks this long in BLPOP; a shorter socket timeout made it back off instead.
        assert conn.socket_timeout is not None and conn.socket_timeout > worker.dequeue_timeout
    finally:
        pool.release(conn)
