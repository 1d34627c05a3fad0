"""How write transactions meet SQLite's single write lock: they wait their turn, then give up."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from failfirst import config, store
from tests.conftest import needs_sqlite


def _hold_write_lock(settings: config.Settings) -> sqlite3.Connection:
    path = store.sqlite_path(settings.database_url)
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@needs_sqlite
def test_write_transaction_waits_for_another_writer_to_release_the_lock_then_commits(home: Path) -> None:
    settings = config.load()
    engine = store.open_store(settings.database_url)
    holder = _hold_write_lock(settings)
    released: list[float] = []

    def release() -> None:
        released.append(time.monotonic())
        holder.rollback()

    # Contention, not a wait for work: the lock is held for a moment, then let go.
    timer = threading.Timer(0.3, release)
    timer.start()
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE products SET stock = stock - 1 WHERE sku = 'KB-101'"))
        committed = time.monotonic()
    finally:
        timer.join()
        holder.close()
    assert released and committed >= released[0]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT stock FROM products WHERE sku = 'KB-101'")).scalar_one() == 999


@needs_sqlite
def test_write_transaction_gives_up_as_database_is_locked_after_the_busy_timeout(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config.load()
    engine = store.open_store(settings.database_url)
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 200)
    holder = _hold_write_lock(settings)
    try:
        with pytest.raises(OperationalError, match="database is locked"), engine.begin() as conn:
            conn.execute(text("UPDATE products SET stock = 0"))
    finally:
        holder.close()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT min(stock) FROM products")).scalar_one() == 1000


def _connect_at_the_barrier(url: str, barrier: object, results: object) -> None:
    engine = store.get_engine(url)
    barrier.wait()  # type: ignore[attr-defined]
    try:
        engine.connect().close()
        results.put("ok")  # type: ignore[attr-defined]
    except OperationalError as exc:
        results.put(str(exc.orig))  # type: ignore[attr-defined]


def test_processes_opening_a_fresh_file_at_once_all_switch_it_to_wal(tmp_path: Path) -> None:
    # SQLite answers all but one of them SQLITE_BUSY at once, without its busy
    # handler; before the switch polled for the lock, several of these trials failed.
    fork = multiprocessing.get_context("fork")
    failures = []
    for trial in range(60):
        url = f"sqlite:///{tmp_path / f'fresh-{trial}.db'}"
        barrier, results = fork.Barrier(3), fork.Queue()
        procs = [fork.Process(target=_connect_at_the_barrier, args=(url, barrier, results)) for _ in range(3)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        failures += [o for o in outcomes if o != "ok"]
    assert not failures, failures[:3]
