"""`failfirst watch`: snapshots, rendered frames, the live view in a terminal, Redis outages."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import TEST_REDIS_URL, needs_embedded_redis, needs_sqlite, wait_until
from rich.console import Console
from sqlalchemy import func, insert, select
from sqlalchemy.exc import DBAPIError

from failfirst import config, connections, models, store, synthetic
from failfirst.checker import check_store
from failfirst.dashboard import render
from failfirst.embedded import EmbeddedRedis
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.snapshot import Snapshot, resolve, run_database_url, take
from failfirst.states import State, load, transition

pytestmark = pytest.mark.timeout(120)

ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )


def place(n: int, prefix: str = "w") -> list[int]:
    settings = config.load()
    gw = Gateway(settings, store.open_store(settings.database_url), connections.get_redis(settings))
    return [
        gw.place(PlaceRequest(f"cust-{i % 5}", "KB-101", 1, f"{prefix}-{i}")).order_id for i in range(n)
    ]


def snapshot_of_store() -> Snapshot:
    source = resolve(None)
    engine, redis = source.connect()
    try:
        return take(engine, redis, queue_name=source.queue)
    finally:
        redis.close()


def text_of(
    snap: Snapshot, width: int, previous: Snapshot | None = None, height: int | None = None
) -> list[str]:
    """The frame as plain text lines, rendered by a recording console `width` columns wide."""
    out = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    out.print(render(snap, previous, width, height=height, title="test"))
    return out.export_text().splitlines()


def row(lines: list[str], label: str) -> str:
    """The one frame line that starts (inside its panel border) with `label`."""
    found = [line for line in lines if re.search(rf"[│ ]{re.escape(label)}\b", line)]
    assert found, f"no line for {label!r} in:\n" + "\n".join(lines)
    return found[0]


def park(order_id: int, error: str) -> None:
    """Drive a CREATED order to DEAD_LETTERED through the real state machine, with its DLQ row."""
    engine = store.open_store(config.load().database_url)
    with engine.begin() as conn:
        order = load(conn, order_id)
        assert order is not None
        order = transition(conn, order, State.PAYMENT_PENDING, "payment attempt 1", attempt=1,
                           changes={"attempts": 1})
        order = transition(conn, order, State.PAYMENT_FAILED, error, changes={"last_error": error})
        order = transition(conn, order, State.DEAD_LETTERED, "retries exhausted")
        conn.execute(insert(models.dlq).values(order_id=order_id, parked_from=State.PAYMENT_FAILED.value,
                                               error=error, attempts=1, created_at=time.time()))


class Screen:
    """A `failfirst watch` in a pseudo-terminal, with everything it has drawn so far as plain text."""

    def __init__(self, *args: str, rows: int = 40, cols: int = 120) -> None:
        self.child = pexpect.spawn(
            sys.executable, ["-m", "failfirst", "watch", *args], env=dict(os.environ),
            dimensions=(rows, cols), encoding="utf-8", codec_errors="replace", timeout=30,
        )
        self.raw = ""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def pump(self) -> str:
        """Read whatever arrived (waiting a moment for it); returns the plain text so far."""
        with contextlib.suppress(pexpect.TIMEOUT):
            self.raw += self.child.read_nonblocking(1 << 16, timeout=0.2)
        return self.text

    def wait_for(self, predicate: Callable[[str], object], timeout: float = 30.0) -> object:
        return wait_until(lambda: predicate(self.pump()), timeout=timeout, every=0.01)

    def interrupt(self) -> int:
        """Ctrl-C, then the exit status once the process is gone."""
        self.child.sendintr()
        self.child.expect(pexpect.EOF, timeout=15)
        self.raw += self.child.before or ""
        self.child.close()
        if self.child.exitstatus is None:
            return -(self.child.signalstatus or 0)
        return self.child.exitstatus

    def kill(self) -> None:
        if self.child.isalive():
            os.kill(self.child.pid, signal.SIGKILL)
            self.child.close(force=True)


# ---------------------------------------------------------------- frames from a known store


def test_frame_of_known_store_shows_its_state_counts_dlq_and_queue(home: Path) -> None:
    ids = place(10)
    park(ids[0], "TIMEOUT: simulated failure")
    park(ids[1], "GATEWAY_ERROR: simulated failure")
    engine = store.open_store(config.load().database_url)
    with engine.begin() as conn:
        for oid in ids[2:5]:
            order = load(conn, oid)
            assert order is not None
            transition(conn, order, State.PAYMENT_PENDING, "payment attempt 1", attempt=1)

    snap = snapshot_of_store()
    assert snap.database_error is None and snap.redis_up
    assert snap.states[State.CREATED] == 5 and snap.states[State.PAYMENT_PENDING] == 3
    assert snap.states[State.DEAD_LETTERED] == 2 and snap.total == 10
    lines = text_of(snap, 130)
    assert re.search(r"CREATED\s+5\b", row(lines, "CREATED"))
    assert re.search(r"PAYMENT_PENDING\s+3\b", row(lines, "PAYMENT_PENDING"))
    assert re.search(r"DEAD_LETTERED\s+2\b", row(lines, "DEAD_LETTERED"))
    assert re.search(r"COMPLETED\s+0\b", row(lines, "COMPLETED"))
    assert "orders 10  settled 2" in lines[1] and "redis up" in lines[1]
    frame = "\n".join(lines)
    assert "DLQ (2 open)" in frame
    assert f"{ids[0]} " in row(lines, str(ids[0])) and "TIMEOUT: simulated failure" in frame
    assert "GATEWAY_ERROR: simulated failure" in frame
    # Ten jobs were enqueued at placement and no worker has run.
    assert re.search(r"\b10\s+0\s+0\s+0\b", frame), frame
    # The newest transition heads the feed.
    feed = lines[next(i for i, line in enumerate(lines) if "latest transitions" in line) + 2]
    assert f"{ids[4]}" in feed and "CREATED → PAYMENT_PENDING" in feed


def test_delta_column_shows_change_since_the_previous_frame(home: Path) -> None:
    engine = store.open_store(config.load().database_url)
    synthetic.fill(engine, 200, seed=1)
    before = take(engine, None, queue_name="orders")
    synthetic.fill(engine, 100, seed=2)
    after = take(engine, None, queue_name="orders")
    lines = text_of(after, 130, previous=before)
    grown = after.states[State.COMPLETED] - before.states[State.COMPLETED]
    assert grown > 0
    assert re.search(rf"COMPLETED\s+{after.states[State.COMPLETED]}\s+\+{grown}\b", row(lines, "COMPLETED"))
    assert not after.redis_up and "redis DOWN: not connected" in lines[1]


def test_synthetic_fill_writes_exact_events_and_a_store_the_checker_finds_clean(home: Path) -> None:
    engine = store.open_store(config.load().database_url)
    synthetic.fill(engine, 1500, events_per_order=6, seed=7)
    with engine.connect() as conn:
        events = conn.execute(select(func.count()).select_from(models.events)).scalar_one()
        o = models.orders
        by_state = dict(conn.execute(select(o.c.state, func.count()).group_by(o.c.state)).all())
    assert events == 1500 * 6
    assert {"COMPLETED", "CANCELLED", "DEAD_LETTERED"} <= set(by_state)
    assert sum(n for s, n in by_state.items() if s not in ("COMPLETED", "CANCELLED", "DEAD_LETTERED")) > 0
    report = check_store(engine)
    assert report.ok, report.to_dict()
    snap = take(engine, None, queue_name="orders")
    assert snap.states == {s.value: by_state.get(s.value, 0) for s in State}
    assert snap.dlq_open == by_state["DEAD_LETTERED"] and snap.settled_in_window > 0
    assert snap.p50_ms is not None and snap.p99_ms is not None and snap.p50_ms <= snap.p99_ms


# ---------------------------------------------------------------- narrow terminals


def test_narrow_terminal_shows_fewer_panels_and_no_line_longer_than_the_width(home: Path) -> None:
    engine = store.open_store(config.load().database_url)
    synthetic.fill(engine, 300, seed=3)
    snap = take(engine, None, queue_name="orders")
    for width in (79, 60, 40):
        lines = text_of(snap, width, height=24)
        assert lines and max(len(line) for line in lines) <= width, (width, lines)
        frame = "\n".join(lines)
        assert "latest transitions" not in frame and f"DLQ: {snap.dlq_open} open" in frame
        assert re.search(rf"COMPLETED\s+{snap.states['COMPLETED']}\b", frame)
    for width, height in ((80, 24), (100, 30), (130, 40)):
        lines = text_of(snap, width, height=height)
        assert max(len(line) for line in lines) <= width and len(lines) <= height, (width, height)
        assert "latest transitions" in "\n".join(lines)
    out = cli("watch", "--once", COLUMNS="60")
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 60
    # Nothing started the embedded Redis; a Redis server given to the suite is up.
    assert ("redis up" if TEST_REDIS_URL else "redis DOWN") in out.stdout


# ---------------------------------------------------------------- chaos runs


def test_unknown_run_is_one_line_error(home: Path) -> None:
    out = cli("watch", "--once", "--run", "latest")
    assert out.returncode == 7 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no chaos runs under" in out.stderr
    (home / "runs" / "20260101-000000-demo-1-abcd").mkdir(parents=True)
    out = cli("watch", "--once", "--run", "nope")
    assert out.returncode == 7 and out.stderr.count("\n") == 1
    assert "no chaos run named 'nope'" in out.stderr and "20260101-000000-demo-1-abcd" in out.stderr


def test_live_view_without_a_terminal_is_one_line_error(home: Path) -> None:
    out = cli("watch")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "needs a terminal" in out.stderr


def test_once_against_a_live_chaos_run_counts_add_up_to_orders_placed_so_far(home: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "failfirst", "chaos", "run", "demo", "--orders", "300", "--latency-ms", "25",
         "--workers", "2", "--json"],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    run_dir: Path | None = None
    try:
        found = wait_until(lambda: next(iter((home / "runs").glob("*-demo-*")), None))
        assert isinstance(found, Path)
        run_dir = found
        # The run's own store: its SQLite file, or its schema on a PostgreSQL server.
        url = run_database_url(config.load(), run_dir)
        if store.is_sqlite(url):
            wait_until(lambda: (run_dir / "run.db").exists())
        engine = store.get_engine(url, readonly=True)

        def placed() -> int:
            try:
                with engine.connect() as conn:
                    return int(conn.exec_driver_sql("SELECT count(*) FROM orders").scalar_one())
            except DBAPIError:
                return 0

        wait_until(lambda: placed() > 0)
        low = placed()
        out = cli("watch", "--once", "--json", "--run", "latest")
        high = placed()
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["source"].startswith(f"run {run_dir.name}")
        assert doc["database"]["ok"] and doc["redis"]["up"], doc
        by_state = doc["orders"]["by_state"]
        assert set(by_state) == {s.value for s in State}
        assert sum(by_state.values()) == doc["orders"]["total"] > 0
        assert low <= doc["orders"]["total"] <= high
        assert proc.poll() is None, "the run ended before the frame was taken; give it more orders"
        frame = cli("watch", "--once", "--run", run_dir.name[:20], COLUMNS="120")
        assert frame.returncode == 0 and f"run {run_dir.name}" in frame.stdout
    finally:
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if run_dir is not None:
            EmbeddedRedis(run_dir).stop()
    report = json.loads(proc.stdout.read() if proc.stdout else "{}")
    assert report["orders"] == 300


# ---------------------------------------------------------------- the live view


def test_live_view_redraws_with_changing_counts_and_exits_cleanly_on_ctrl_c(
    home: Path, workers: Callable[..., Any]
) -> None:
    ids = place(150)
    screen = Screen("--interval", "0.2")
    try:
        screen.wait_for(lambda text: f"orders {len(ids)}  settled 0" in text)
        workers(2, FAILFIRST_LATENCY_MS="20")
        seen: set[int] = set()

        def redrawn(text: str) -> bool:
            seen.update(int(n) for n in re.findall(r"orders 150  settled (\d+)", text))
            return len(seen - {0}) >= 2

        screen.wait_for(redrawn, timeout=60)
        status = screen.interrupt()
    finally:
        screen.kill()
    assert status == 0, screen.text[-2000:]
    assert "Traceback" not in screen.text and "interrupted" not in screen.text
    # Leaving the alternate screen and showing the cursor again is what restores the terminal.
    last_frame_on = screen.raw[screen.raw.rindex("\x1b[?1049h"):]
    assert "\x1b[?1049l" in last_frame_on and "\x1b[?25h" in last_frame_on


@needs_embedded_redis
def test_redis_stopped_while_watching_shows_down_then_recovers(home: Path) -> None:
    ids = place(5)
    server = EmbeddedRedis(home)
    screen = Screen("--interval", "0.2")
    try:
        screen.wait_for(lambda text: "redis up" in text and f"orders {len(ids)}" in text)
        server.stop()
        mark = len(screen.text)
        screen.wait_for(lambda text: "redis DOWN" in text[mark:] and "Redis DOWN" in text[mark:])
        down = screen.text[mark:]
        assert f"orders {len(ids)}" in down and "db ok" in down
        assert screen.child.isalive()
        server.start()
        mark = len(screen.text)
        screen.wait_for(lambda text: "redis up" in text[mark:])
        status = screen.interrupt()
    finally:
        screen.kill()
    assert status == 0
    assert "Traceback" not in screen.text


@needs_sqlite
def test_frame_reads_past_a_writer_holding_the_database_lock(home: Path) -> None:
    engine = store.open_store(config.load().database_url)
    synthetic.fill(engine, 100, seed=4)
    expected = take(engine, None, queue_name="orders").states
    path = store.sqlite_path(config.load().database_url)
    writer = sqlite3.connect(str(path), isolation_level=None, timeout=5)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE orders SET state = 'CANCELLED'")
        snap = take(engine, None, queue_name="orders")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert snap.database_error is None and snap.states == expected


def test_busy_frame_keeps_the_last_good_database_side(home: Path) -> None:
    engine = store.open_store(config.load().database_url)
    synthetic.fill(engine, 50, seed=5)
    good = take(engine, None, queue_name="orders")
    busy = Snapshot(**{**good.__dict__, "database_error": "database is locked", "database_as_of": None,
                       "states": {s.value: 0 for s in State}, "transitions": [], "dlq": []})
    shown = busy.with_database_of(good)
    assert shown.states == good.states and shown.database_error == "database is locked"
    lines = text_of(shown, 130)
    assert "db unavailable: database is locked (showing" in lines[1]
    assert re.search(rf"COMPLETED\s+{good.states['COMPLETED']}\b", row(lines, "COMPLETED"))
