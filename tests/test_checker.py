"""The invariant checker: silent on a healthy store, loud and specific on each kind of damage.

Orders are built through the real gateway, state machine and simulated
providers (with every fault rate at zero), then one record is damaged by hand
so each test proves the checker notices exactly that damage and names the order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, update

from failfirst import config, models
from failfirst.checker import CheckReport, Verdict, check_store, liveness, render_report
from failfirst.config import FaultConfig, Settings
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.simulators import InventoryProvider, PaymentProvider, charge_key
from failfirst.states import OrderView, State, load, transition
from failfirst.store import open_store

NO_FAULTS = FaultConfig(payment_fail=0.0, inventory_fail=0.0)


class Lab:
    """A store plus the pieces needed to walk orders through their lives by hand."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.gateway = Gateway(settings, engine, None)
        self.pay = PaymentProvider(engine, NO_FAULTS)
        self.inv = InventoryProvider(engine, NO_FAULTS)
        self._n = 0

    def place(self, customer: str = "alice", key: str | None = None) -> OrderView:
        self._n += 1
        result = self.gateway.place(PlaceRequest(customer, "KB-101", 1, key or f"key-{self._n}"))
        return self.get(result.order_id)

    def get(self, order_id: int) -> OrderView:
        with self.engine.connect() as conn:
            order = load(conn, order_id)
        assert order is not None
        return order

    def move(self, order: OrderView, to: State, **kw: object) -> OrderView:
        with self.engine.begin() as conn:
            return transition(conn, order, to, "test", **kw)  # type: ignore[arg-type]

    def charged(self, order: OrderView) -> OrderView:
        """CREATED -> PAYMENT_PENDING -> (charge) -> PAYMENT_SUCCESS -> (reserve) -> INVENTORY_RESERVED."""
        order = self.move(order, State.PAYMENT_PENDING)
        self.pay.charge(order, charge_key(order), "charge")
        order = self.move(order, State.PAYMENT_SUCCESS)
        self.inv.reserve(order, "reserve")
        return self.move(order, State.INVENTORY_RESERVED)

    def completed(self, **kw: str) -> OrderView:
        return self.move(self.charged(self.place(**kw)), State.COMPLETED)

    def cancelled_with_refund(self) -> OrderView:
        order = self.charged(self.place())
        self.pay.refund_all(order, "refund")
        self.inv.release(order)
        return self.move(order, State.CANCELLED)

    def dead_lettered(self, order: OrderView) -> OrderView:
        """Park the order and write its DLQ row, as the pipeline's settle step does."""
        parked_from = order.state
        order = self.move(order, State.DEAD_LETTERED)
        with self.engine.begin() as conn:
            conn.execute(
                insert(models.dlq).values(
                    order_id=order.id, parked_from=parked_from, error="boom",
                    attempts=order.attempts, created_at=time.time(),
                )
            )
        return order


@pytest.fixture
def lab(home: Path) -> Lab:
    settings = config.load()
    return Lab(settings, open_store(settings.database_url))


def verdict(report: CheckReport, number: int) -> Verdict:
    return next(v for v in report.verdicts if v.number == number)


def failing(report: CheckReport) -> set[int]:
    return {v.number for v in report.verdicts if not v.ok}


def offender_ids(report: CheckReport, number: int) -> list[int | str]:
    return [o.order_id for o in verdict(report, number).offenders]


def test_clean_store_of_completed_cancelled_and_replayed_orders_passes_every_invariant(lab: Lab) -> None:
    lab.completed()
    lab.completed(customer="bob")
    lab.cancelled_with_refund()
    # Parked, replayed back to where it was parked, then completed: a legal detour.
    order = lab.dead_lettered(lab.move(lab.place(), State.PAYMENT_PENDING))
    with lab.engine.begin() as conn:
        conn.execute(update(models.dlq).values(resolved_at=time.time(), resolution="replayed"))
    order = lab.move(order, State.PAYMENT_PENDING)
    lab.pay.charge(order, charge_key(order), "charge")
    order = lab.move(order, State.PAYMENT_SUCCESS)
    lab.inv.reserve(order, "reserve")
    lab.move(lab.move(order, State.INVENTORY_RESERVED), State.COMPLETED)
    # Still parked, with its DLQ row.
    lab.dead_lettered(lab.place())

    report = check_store(lab.engine)

    assert report.ok, report.to_dict()
    assert [v.number for v in report.verdicts] == [1, 2, 3, 4, 5, 6, 7]
    assert all(v.kind == "safety" and v.count == 0 for v in report.verdicts)
    assert report.orders == 5
    assert report.liveness is not None and report.liveness.ok
    json.dumps(report.to_dict())
    assert render_report(report) is not None


def test_unsettled_order_is_a_liveness_failure_not_a_safety_failure(lab: Lab) -> None:
    order = lab.place()

    report = check_store(lab.engine)
    live = liveness(lab.engine)

    assert report.ok
    assert not live.ok and live.kind == "liveness" and live.number == 0
    assert [o.order_id for o in live.offenders] == [order.id]
    assert report.to_dict()["liveness"]["count"] == 1


def test_unsettled_order_without_outbox_row_is_lost_and_fails_invariant_1(lab: Lab) -> None:
    order = lab.place()
    with lab.engine.begin() as conn:
        conn.execute(models.outbox.delete())

    report = check_store(lab.engine)

    assert failing(report) == {1}
    assert offender_ids(report, 1) == [order.id]


def test_second_charge_fails_invariant_2_and_names_the_order(lab: Lab) -> None:
    lab.completed()
    victim = lab.completed()
    with lab.engine.begin() as conn:
        conn.execute(
            insert(models.charges).values(
                order_id=victim.id, provider_key=f"order-{victim.id}-again",
                amount_cents=victim.amount_cents, at=time.time(),
            )
        )

    report = check_store(lab.engine)

    assert failing(report) == {2}
    v = verdict(report, 2)
    assert v.count == 1 and offender_ids(report, 2) == [victim.id]
    assert "2 charges" in v.offenders[0].witness
    assert f"order-{victim.id}-again" in v.offenders[0].witness


def test_negative_stock_fails_invariant_3(lab: Lab) -> None:
    lab.completed()
    with lab.engine.begin() as conn:
        conn.execute(
            update(models.products).where(models.products.c.sku == "MS-202").values(stock=-1)
        )

    report = check_store(lab.engine)

    assert 3 in failing(report)
    assert offender_ids(report, 3) == ["MS-202"]
    assert "negative" in verdict(report, 3).offenders[0].witness


def test_stock_not_matching_baseline_fails_invariant_3(lab: Lab) -> None:
    lab.completed()
    with lab.engine.begin() as conn:
        conn.execute(
            update(models.products)
            .where(models.products.c.sku == "KB-101")
            .values(stock=models.products.c.stock + 1)
        )

    report = check_store(lab.engine)

    assert failing(report) == {3}
    assert offender_ids(report, 3) == ["KB-101"]


def test_illegal_event_created_to_completed_fails_invariant_4(lab: Lab) -> None:
    order = lab.place()
    with lab.engine.begin() as conn:
        conn.execute(
            insert(models.events).values(
                order_id=order.id, from_state="CREATED", to_state="COMPLETED", version=2,
                attempt=0, reason="forged", worker="test", at=time.time(),
            )
        )
        conn.execute(
            update(models.orders)
            .where(models.orders.c.id == order.id)
            .values(state="COMPLETED", version=2)
        )

    report = check_store(lab.engine)

    assert failing(report) == {4}
    v = verdict(report, 4)
    assert offender_ids(report, 4) == [order.id]
    assert "CREATED->COMPLETED" in v.offenders[0].witness


def test_version_gap_and_stale_order_row_fail_invariant_4(lab: Lab) -> None:
    gap = lab.move(lab.place(), State.PAYMENT_PENDING)
    stale = lab.completed()
    with lab.engine.begin() as conn:
        conn.execute(
            update(models.events)
            .where(models.events.c.order_id == gap.id, models.events.c.version == 2)
            .values(version=3)
        )
        conn.execute(
            update(models.orders).where(models.orders.c.id == gap.id).values(version=3)
        )
        conn.execute(
            update(models.orders).where(models.orders.c.id == stale.id).values(state="CANCELLED")
        )

    report = check_store(lab.engine)

    assert 4 in failing(report)
    assert offender_ids(report, 4) == sorted([gap.id, stale.id])


def test_replay_to_a_state_other_than_the_parked_one_fails_invariant_4(lab: Lab) -> None:
    order = lab.dead_lettered(lab.move(lab.place(), State.PAYMENT_PENDING))
    with lab.engine.begin() as conn:
        conn.execute(models.dlq.delete())
        conn.execute(
            insert(models.events).values(
                order_id=order.id, from_state="DEAD_LETTERED", to_state="CREATED",
                version=order.version + 1, attempt=0, reason="bad replay", worker="t", at=time.time(),
            )
        )
        conn.execute(
            update(models.orders)
            .where(models.orders.c.id == order.id)
            .values(state="CREATED", version=order.version + 1)
        )

    report = check_store(lab.engine)

    assert failing(report) == {4}
    assert "parked from PAYMENT_PENDING" in verdict(report, 4).offenders[0].witness


def test_duplicate_order_for_one_key_fails_invariant_5(lab: Lab) -> None:
    first = lab.completed(key="same")
    replay = lab.gateway.place(PlaceRequest("alice", "KB-101", 1, "same"))
    assert replay.replayed and replay.order_id == first.id
    # What a broken gateway would do: a second order row under the same key.
    with lab.engine.begin() as conn:
        dup_id = lab.gateway._insert_order(conn, PlaceRequest("alice", "KB-101", 1, "same"), 8900, time.time())
    lab.move(lab.get(dup_id), State.CANCELLED)

    report = check_store(lab.engine)

    assert failing(report) == {5}
    assert offender_ids(report, 5) == [first.id, dup_id]


def test_dead_lettered_order_without_dlq_row_fails_invariant_6(lab: Lab) -> None:
    order = lab.move(lab.place(), State.DEAD_LETTERED)

    report = check_store(lab.engine)

    assert failing(report) == {6}
    assert offender_ids(report, 6) == [order.id]
    assert "0 open DLQ rows" in verdict(report, 6).offenders[0].witness


def test_open_dlq_row_for_a_settled_order_fails_invariant_6(lab: Lab) -> None:
    order = lab.completed()
    with lab.engine.begin() as conn:
        conn.execute(
            insert(models.dlq).values(
                order_id=order.id, parked_from="CREATED", error="x", attempts=1, created_at=time.time()
            )
        )

    report = check_store(lab.engine)

    assert failing(report) == {6}
    assert offender_ids(report, 6) == [order.id]


def test_cancelled_order_with_charge_and_no_refund_fails_invariants_7_and_2(lab: Lab) -> None:
    order = lab.charged(lab.place())
    lab.inv.release(order)
    lab.move(order, State.CANCELLED, guard_compensation=False)

    report = check_store(lab.engine)

    assert failing(report) == {2, 7}
    assert offender_ids(report, 2) == [order.id]
    assert offender_ids(report, 7) == [order.id]
    assert "not refunded" in verdict(report, 7).offenders[0].witness


def test_cancelled_order_with_unreleased_stock_fails_invariant_7(lab: Lab) -> None:
    order = lab.charged(lab.place())
    lab.pay.refund_all(order, "refund")
    lab.move(order, State.CANCELLED, guard_compensation=False)

    report = check_store(lab.engine)

    assert failing(report) == {7}
    assert "not released" in verdict(report, 7).offenders[0].witness


def test_charge_for_a_missing_order_fails_invariant_7(lab: Lab) -> None:
    with lab.engine.begin() as conn:
        conn.execute(
            insert(models.charges).values(order_id=999, provider_key="ghost", amount_cents=1, at=0.0)
        )

    report = check_store(lab.engine)

    assert 7 in failing(report)
    assert offender_ids(report, 7) == [999]


def _run_check(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", "check", "--json"],
        env=dict(os.environ), capture_output=True, text=True, timeout=60, check=False,
    )


def test_cli_check_exits_0_on_a_good_store_and_1_on_a_bad_one(lab: Lab, home: Path) -> None:
    order = lab.completed()

    good = _run_check(home)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["ok"] is True

    with lab.engine.begin() as conn:
        conn.execute(
            insert(models.charges).values(
                order_id=order.id, provider_key="dup", amount_cents=1, at=time.time()
            )
        )
    bad = _run_check(home)
    assert bad.returncode == 1, bad.stderr
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False
    v2 = next(v for v in doc["verdicts"] if v["number"] == 2)
    assert v2["offenders"][0]["order_id"] == order.id


def test_checker_handles_5000_bulk_settled_orders(lab: Lab) -> None:
    n, now = 5000, time.time()
    path = ["CREATED", "PAYMENT_PENDING", "PAYMENT_SUCCESS", "INVENTORY_RESERVED", "COMPLETED"]
    orders, events, charges = [], [], []
    for i in range(1, n + 1):
        cancelled = i % 10 == 0
        states = [*path[:3], "CANCELLED"] if cancelled else path
        orders.append({
            "id": i, "customer": f"c{i % 97}", "idempotency_key": f"k{i}", "sku": "CB-505",
            "quantity": 1, "amount_cents": 990, "state": states[-1], "version": len(states),
            "created_at": now, "updated_at": now, "settled_at": now,
        })
        prev = None
        for v, s in enumerate(states, start=1):
            events.append({
                "order_id": i, "from_state": prev, "to_state": s, "version": v, "attempt": 1,
                "reason": "bulk", "worker": "bulk", "at": now,
            })
            prev = s
        if not cancelled:
            charges.append({"order_id": i, "provider_key": f"order-{i}", "amount_cents": 990, "at": now})
    with lab.engine.begin() as conn:
        conn.execute(insert(models.orders), orders)
        conn.execute(insert(models.events), events)
        conn.execute(insert(models.charges), charges)

    report = check_store(lab.engine)

    assert report.ok, report.to_dict()
    assert report.orders == n


def test_duplicate_event_version_fails_invariant_4(lab: Lab) -> None:
    order = lab.move(lab.place(), State.PAYMENT_PENDING)
    with lab.engine.begin() as conn:
        conn.execute(
            insert(models.events).values(
                order_id=order.id, from_state="CREATED", to_state="PAYMENT_PENDING", version=2,
                attempt=0, reason="lost update", worker="other", at=time.time(),
            )
        )

    report = check_store(lab.engine)

    assert failing(report) == {4}
    assert offender_ids(report, 4) == [order.id]
    assert "version 2 then 2" in verdict(report, 4).offenders[0].witness
