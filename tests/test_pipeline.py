"""The pipeline end to end: real embedded Redis, real worker processes, real faults."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_embedded_redis, wait_until
from sqlalchemy import func, select

from failfirst import config, connections, models, store
from failfirst.embedded import EmbeddedRedis
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.states import SETTLED, State

pytestmark = pytest.mark.timeout(60)

SKU = "KB-101"


def gateway() -> Gateway:
    settings = config.load()
    engine = store.open_store(settings.database_url)
    return Gateway(settings, engine, connections.get_redis(settings))


def engine() -> Any:
    return store.open_store(config.load().database_url)


def place(gw: Gateway, n: int, *, sku: str = SKU, quantity: int = 1, prefix: str = "k") -> list[int]:
    return [gw.place(PlaceRequest(f"cust-{i % 5}", sku, quantity, f"{prefix}-{i}")).order_id for i in range(n)]


def states(ids: list[int]) -> dict[int, str]:
    o = models.orders
    with engine().connect() as conn:
        return dict(conn.execute(select(o.c.id, o.c.state).where(o.c.id.in_(ids))).all())


def all_settled(ids: list[int]) -> bool:
    current = states(ids)
    return len(current) == len(ids) and all(s in SETTLED for s in current.values())


def wait_settled(ids: list[int], timeout: float = 40.0) -> dict[int, str]:
    wait_until(lambda: all_settled(ids), timeout=timeout)
    return states(ids)


def count(table: Any, *where: Any) -> int:
    with engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def per_order(table: Any, ids: list[int]) -> dict[int, int]:
    with engine().connect() as conn:
        rows = conn.execute(
            select(table.c.order_id, func.count()).where(table.c.order_id.in_(ids)).group_by(table.c.order_id)
        ).all()
    return {i: 0 for i in ids} | dict(rows)


def stock(sku: str = SKU) -> int:
    p = models.products
    with engine().connect() as conn:
        return conn.execute(select(p.c.stock).where(p.c.sku == sku)).scalar_one()


def order_rows(ids: list[int]) -> dict[int, Any]:
    o = models.orders
    with engine().connect() as conn:
        return {r.id: r for r in conn.execute(select(o).where(o.c.id.in_(ids))).all()}


def assert_checker_passes() -> None:
    from failfirst.checker import check_store

    report = check_store(engine())
    assert report.ok, report.to_dict()


Workers = Callable[..., Any]


def test_fifty_fault_free_orders_all_complete_and_ledgers_add_up(home: Path, workers: Workers) -> None:
    workers(2)
    gw = gateway()
    before = stock()
    ids = place(gw, 50)
    final = wait_settled(ids)
    assert set(final.values()) == {State.COMPLETED}
    assert stock() == before - 50
    assert per_order(models.charges, ids) == {i: 1 for i in ids}
    assert count(models.refunds) == 0
    assert count(models.reservations) == 50
    assert count(models.outbox) == 0
    assert_checker_passes()


def test_half_payment_failures_retry_through_payment_failed_and_complete(home: Path, workers: Workers) -> None:
    # One inner try per attempt, so every simulated failure goes through PAYMENT_FAILED and
    # the queue-level backoff. The seed fixes each order's fate: attempts needed, in order.
    workers(
        2, FAILFIRST_PAYMENT_FAIL="0.5", FAILFIRST_SEED="7", FAILFIRST_RETRY_ATTEMPTS="8",
        FAILFIRST_INNER_ATTEMPTS="1",
    )
    gw = gateway()
    ids = place(gw, 20)
    final = wait_settled(ids)
    assert set(final.values()) == {State.COMPLETED}
    rows = order_rows(ids)
    assert [rows[i].attempts for i in ids] == [2, 1, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 2, 1, 1, 2, 1, 1, 1, 2]
    e = models.events
    with engine().connect() as conn:
        failed = dict(
            conn.execute(
                select(e.c.order_id, func.count()).where(e.c.to_state == State.PAYMENT_FAILED)
                .group_by(e.c.order_id)
            ).all()
        )
    assert failed == {i: rows[i].attempts - 1 for i in ids if rows[i].attempts > 1}
    assert per_order(models.charges, ids) == {i: 1 for i in ids}
    assert count(models.refunds) == 0
    assert_checker_passes()


def test_payment_always_failing_dead_letters_after_exactly_the_configured_attempts(
    home: Path, workers: Workers
) -> None:
    workers(2, FAILFIRST_PAYMENT_FAIL="1.0", FAILFIRST_RETRY_ATTEMPTS="3")
    gw = gateway()
    ids = place(gw, 10)
    final = wait_settled(ids)
    assert set(final.values()) == {State.DEAD_LETTERED}
    assert {r.attempts for r in order_rows(ids).values()} == {3}
    d = models.dlq
    assert per_order(d, ids) == {i: 1 for i in ids}
    assert count(d, d.c.resolved_at.is_(None), d.c.attempts == 3) == 10
    assert count(models.charges) == 0
    assert count(models.outbox) == 0
    assert_checker_passes()


def test_insufficient_funds_cancels_without_retry(home: Path, workers: Workers) -> None:
    workers(2, FAILFIRST_INSUFFICIENT_FUNDS="1.0")
    gw = gateway()
    before = stock()
    ids = place(gw, 10)
    final = wait_settled(ids)
    assert set(final.values()) == {State.CANCELLED}
    rows = order_rows(ids)
    assert {r.attempts for r in rows.values()} == {1}
    assert all("INSUFFICIENT_FUNDS" in (r.cancel_reason or "") for r in rows.values())
    assert count(models.charges) == 0
    assert count(models.events, models.events.c.to_state == State.PAYMENT_FAILED) == 0
    assert stock() == before
    assert_checker_passes()


def test_ambiguous_first_attempt_timeouts_charge_each_order_exactly_once(home: Path, workers: Workers) -> None:
    # One inner try, so the lost answer surfaces as PAYMENT_FAILED and a second, queue-level
    # attempt, which must find the first charge under the order's key instead of charging again.
    workers(2, FAILFIRST_AMBIGUOUS="1.0", FAILFIRST_AMBIGUOUS_FIRST_ONLY="1", FAILFIRST_INNER_ATTEMPTS="1")
    gw = gateway()
    ids = place(gw, 10)
    final = wait_settled(ids)
    assert set(final.values()) == {State.COMPLETED}
    assert per_order(models.charges, ids) == {i: 1 for i in ids}
    # The first attempt's answer was lost every time, so every order needed a second attempt.
    rows = order_rows(ids)
    assert {r.attempts for r in rows.values()} == {2}
    assert all("answer was lost" in (r.last_error or "") for r in rows.values())
    e = models.events
    assert count(e, e.c.to_state == State.PAYMENT_FAILED, e.c.order_id.in_(ids)) == 10
    assert count(models.refunds) == 0
    assert_checker_passes()


def test_stock_crunch_completes_exactly_the_stock_and_refunds_the_rest(home: Path, workers: Workers) -> None:
    from failfirst.records import set_stock

    workers(2)
    gw = gateway()
    set_stock(gw.engine, SKU, 10)
    ids = place(gw, 30)
    final = wait_settled(ids)
    completed = [i for i, s in final.items() if s == State.COMPLETED]
    cancelled = [i for i, s in final.items() if s == State.CANCELLED]
    assert len(completed) == 10
    assert len(cancelled) == 20
    assert stock() == 0
    charges, refunds = per_order(models.charges, ids), per_order(models.refunds, ids)
    assert all(charges[i] == 1 for i in ids)
    assert all(refunds[i] == 1 for i in cancelled)
    assert all(refunds[i] == 0 for i in completed)
    assert all("OUT_OF_STOCK" in (order_rows(cancelled)[i].cancel_reason or "") for i in cancelled)
    assert_checker_passes()


def test_sigkilled_worker_mid_payment_is_finished_by_another_worker_charged_once(
    home: Path, workers: Workers
) -> None:
    sup = workers(2, FAILFIRST_LATENCY_MS="1500", FAILFIRST_LEASE_SECONDS="2")
    gw = gateway()
    before = stock()
    [oid] = place(gw, 1)

    def leased() -> Any:
        row = order_rows([oid])[oid]
        return row if row.lease_owner and row.state == State.PAYMENT_PENDING else None

    row = wait_until(leased, timeout=20)
    pid = int(row.lease_owner.rsplit(":", 1)[1])
    assert pid in sup.pids()
    os.kill(pid, signal.SIGKILL)
    final = wait_settled([oid], timeout=40)
    assert final[oid] == State.COMPLETED
    assert per_order(models.charges, [oid])[oid] == 1
    assert stock() == before - 1
    done = order_rows([oid])[oid]
    with engine().connect() as conn:
        e = models.events
        finisher = conn.execute(
            select(e.c.worker).where(e.c.order_id == oid, e.c.to_state == State.COMPLETED)
        ).scalar_one()
    assert finisher != row.lease_owner
    assert done.lease_owner is None
    assert any(ev.kind == "died" and ev.pid == pid for ev in sup.events)
    assert_checker_passes()


def test_redis_flushall_mid_run_loses_no_order(home: Path, workers: Workers) -> None:
    workers(2, FAILFIRST_LATENCY_MS="20")
    gw = gateway()
    ids = place(gw, 40)
    wait_until(lambda: sum(s == State.COMPLETED for s in states(ids).values()) >= 5, timeout=30)
    assert not all_settled(ids), "flush should happen while orders are still owed work"
    assert gw.redis is not None
    gw.redis.flushdb()  # everything failfirst keeps; FLUSHALL would also hit a shared server's other dbs
    final = wait_settled(ids, timeout=45)
    assert set(final.values()) == {State.COMPLETED}
    assert per_order(models.charges, ids) == {i: 1 for i in ids}
    assert_checker_passes()


@needs_embedded_redis
def test_redis_stopped_and_restarted_while_placing_loses_no_order(home: Path, workers: Workers) -> None:
    workers(2)
    gw = gateway()
    first = place(gw, 5, prefix="before")
    wait_settled(first)
    EmbeddedRedis(home).stop()
    offline = [gw.place(PlaceRequest("cust-x", SKU, 1, f"down-{i}")) for i in range(10)]
    assert not any(r.enqueued for r in offline)
    ids = [r.order_id for r in offline]
    assert count(models.outbox) == 10
    assert not any(s in SETTLED for s in states(ids).values())
    EmbeddedRedis(home).start()
    final = wait_settled(ids, timeout=45)
    assert set(final.values()) == {State.COMPLETED}
    assert per_order(models.charges, ids) == {i: 1 for i in ids}
    assert count(models.outbox) == 0
    assert_checker_passes()
