"""The command line: bad input is one line on stderr and writes nothing; good input works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_DATABASE_URL, TEST_REDIS_URL, needs_sqlite
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from failfirst import store


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )


def db_counts(home: Path) -> tuple[int, int, int]:
    """(orders, idempotency keys, outbox rows); zeros when no database was created."""
    url = os.environ.get("FAILFIRST_DATABASE_URL") or f"sqlite:///{home / 'failfirst.db'}"
    if store.is_sqlite(url) and not (home / "failfirst.db").exists():
        return 0, 0, 0
    engine = create_engine(url, poolclass=NullPool)
    try:
        if "orders" not in inspect(engine).get_table_names():
            return 0, 0, 0
        with engine.connect() as conn:
            return tuple(  # type: ignore[return-value]
                conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one()
                for t in ("orders", "idempotency_keys", "outbox")
            )
    finally:
        engine.dispose()


def assert_one_line_failure(out: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    assert out.returncode != 0, out.stdout
    if code is not None:
        assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("failfirst: error:")
    return lines[0]


PLACE = ("order", "place", "-c", "c1", "-s", "KB-101", "-k", "key-1")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("order", "place", "-c", "c1", "-s", "NOPE-9", "-q", "1"), "unknown SKU"),
        (("order", "place", "-c", "c1", "-s", "KB-101", "-q", "0"), "out of range"),
        (("order", "place", "-c", "c1", "-s", "KB-101", "--qty=-3"), "out of range"),
        (("order", "place", "-c", "c1", "-s", "KB-101", "-q", "abc"), "not an integer"),
        (("order", "place", "-c", "c1", "-s", "KB-101", "-q", "1001"), "out of range"),
        (("order", "place", "-c", "", "-s", "KB-101", "-q", "1"), "customer"),
        (("order", "place", "-c", "c1", "-s", "KB-101", "-q", "1", "-k", "x" * 256), "255"),
        (("order", "place", "--nope"), "--nope"),
        (("--nope",), "--nope"),
    ],
    ids=["unknown-sku", "qty-0", "qty-neg", "qty-abc", "qty-1001", "empty-customer",
         "key-too-long", "bad-flag", "bad-top-flag"],
)
def test_bad_input_is_one_line_and_writes_nothing(
    home: Path, args: tuple[str, ...], needle: str
) -> None:
    out = cli(*args)
    line = assert_one_line_failure(out)
    assert needle in line
    assert db_counts(home) == (0, 0, 0)


def test_key_reused_with_a_different_body_exits_2(home: Path) -> None:
    first = cli(*PLACE, "-q", "1", "--json")
    assert first.returncode == 0, first.stderr
    order_id = json.loads(first.stdout)["order_id"]
    out = cli(*PLACE, "-q", "2")
    line = assert_one_line_failure(out, code=2)
    assert "different request" in line
    assert db_counts(home) == (1, 1, 1)
    replay = cli(*PLACE, "-q", "1", "--json")
    assert replay.returncode == 0
    assert json.loads(replay.stdout)["order_id"] == order_id


def test_unreachable_redis_is_one_line_and_no_order(home: Path) -> None:
    out = cli(*PLACE, "-q", "1", REDIS_URL="redis://127.0.0.1:1")
    line = assert_one_line_failure(out)
    assert "unreachable" in line and "REDIS_URL" in line
    assert db_counts(home) == (0, 0, 0)


@pytest.mark.skipif(
    TEST_DATABASE_URL is not None and TEST_REDIS_URL is not None,
    reason="with a database server and a Redis server nothing is written to the data directory",
)
def test_unwritable_data_directory_is_one_line(tmp_path: Path, home: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    out = cli(*PLACE, "-q", "1", FAILFIRST_HOME=str(blocker / "ff"))
    line = assert_one_line_failure(out)
    assert "FAILFIRST_HOME" in line
    assert blocker.read_bytes() == b"not a directory"
    assert not home.exists() or db_counts(home) == (0, 0, 0)


@needs_sqlite
def test_corrupt_database_is_one_line_and_left_alone(home: Path) -> None:
    home.mkdir(parents=True)
    garbage = bytes(range(256)) * 64
    (home / "failfirst.db").write_bytes(garbage)
    out = cli(*PLACE, "-q", "1")
    line = assert_one_line_failure(out)
    assert "database" in line
    assert (home / "failfirst.db").read_bytes() == garbage
    listing = cli("order", "list")
    assert_one_line_failure(listing)


def test_placed_order_is_shown_and_listed_as_json(home: Path) -> None:
    placed = cli(*PLACE, "-q", "3", "--json")
    assert placed.returncode == 0, placed.stderr
    doc = json.loads(placed.stdout)
    assert {"order_id", "state", "idempotency_key", "replayed"} <= doc.keys()
    assert doc["state"] == "CREATED" and doc["idempotency_key"] == "key-1"
    assert doc["replayed"] is False

    again = json.loads(cli(*PLACE, "-q", "3", "--json").stdout)
    assert again["replayed"] is True and again["order_id"] == doc["order_id"]

    show = cli("order", "show", str(doc["order_id"]), "--json")
    assert show.returncode == 0, show.stderr
    detail = json.loads(show.stdout)
    assert detail["id"] == doc["order_id"] and detail["quantity"] == 3
    assert [e["to_state"] for e in detail["events"]] == ["CREATED"]
    assert detail["events"][0]["version"] == 1

    listed = cli("order", "list", "--state", "CREATED", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [doc["order_id"]]
    assert json.loads(cli("order", "list", "--state", "COMPLETED", "--json").stdout) == []

    missing = cli("order", "show", "99999")
    assert "no order 99999" in assert_one_line_failure(missing)


def test_stock_set_changes_what_stock_list_shows(home: Path) -> None:
    out = cli("stock", "set", "KB-101", "5")
    assert out.returncode == 0, out.stderr
    assert "KB-101" in out.stdout and "5" in out.stdout
    listed = cli("stock", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    stock = {r["sku"]: r["stock"] for r in json.loads(listed.stdout)}
    assert stock["KB-101"] == 5
    assert "MS-202" in stock
    bad = cli("stock", "set", "NOPE-9", "5")
    assert "unknown SKU" in assert_one_line_failure(bad)


def test_help_lists_every_command_and_their_options(home: Path) -> None:
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("order", "stock", "worker", "dlq", "check", "chaos", "watch", "bench", "status"):
        assert command in out.stdout, command
    sub = cli("order", "place", "--help")
    assert sub.returncode == 0 and "--customer" in sub.stdout
