"""The dead-letter queue: real dead letters, replayed and cancelled, each idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from sqlalchemy import func, select

from failfirst import config, models, pipeline, store
from failfirst.config import FaultConfig
from failfirst.dlq import cancel, list_entries, replay, show_entry
from failfirst.errors import NotFound
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.runtime import Runtime, open_runtime
from failfirst.states import State

pytestmark = pytest.mark.timeout(60)

SKU = "MS-202"
Workers = Callable[..., Any]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env=dict(os.environ), capture_output=True, text=True, timeout=60,
    )


def engine() -> Any:
    return store.open_store(config.load().database_url)


def place(rt: Runtime, n: int, prefix: str = "dl") -> list[int]:
    gw = Gateway(rt.settings, rt.engine, rt.redis)
    return [gw.place(PlaceRequest(f"c-{i}", SKU, 2, f"{prefix}-{i}")).order_id for i in range(n)]


def rows(ids: list[int]) -> dict[int, Any]:
    o = models.orders
    with engine().connect() as conn:
        return {r.id: r for r in conn.execute(select(o).where(o.c.id.in_(ids))).all()}


def in_state(ids: list[int], state: State) -> bool:
    current = rows(ids)
    return len(current) == len(ids) and all(r.state == state for r in current.values())


def count(table: Any, *where: Any) -> int:
    with engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def stock() -> int:
    p = models.products
    with engine().connect() as conn:
        return conn.execute(select(p.c.stock).where(p.c.sku == SKU)).scalar_one()


def check_ok() -> None:
    from failfirst.checker import check_store

    report = check_store(engine())
    assert report.ok, report.to_dict()


def dead_letter_with_workers(workers: Workers, n: int) -> tuple[Any, Runtime, list[int]]:
    """Orders whose every payment attempt fails, parked by real workers after 3 attempts."""
    sup = workers(2, FAILFIRST_PAYMENT_FAIL="1.0", FAILFIRST_RETRY_ATTEMPTS="3")
    rt = open_runtime()
    ids = place(rt, n)
    wait_until(lambda: in_state(ids, State.DEAD_LETTERED), timeout=30)
    return sup, rt, ids


def dead_letter_after_reserve(rt: Runtime, n: int) -> list[int]:
    """Orders charged and reserved, then parked by an unexpected error (driven in-process)."""
    ids = place(rt, n, prefix="late")
    calm = replace(rt.settings, faults=FaultConfig(payment_fail=0.0, inventory_fail=0.0))
    ctx = pipeline.build_context(calm, rt.engine, rt.redis)  # type: ignore[arg-type]
    reserve = ctx.inventory.reserve

    def reserve_then_explode(order: Any, step: str) -> None:
        reserve(order, step)
        raise RuntimeError("warehouse API returned garbage")

    ctx.inventory.reserve = reserve_then_explode  # type: ignore[method-assign]
    for oid in ids:
        assert pipeline.Driver(ctx, oid).run() == State.DEAD_LETTERED
    return ids


def test_list_and_show_real_dead_letters_also_via_the_cli(home: Path, workers: Workers) -> None:
    _sup, rt, ids = dead_letter_with_workers(workers, 3)
    entries = list_entries(rt.engine)
    assert sorted(e["order_id"] for e in entries) == sorted(ids)
    for e in entries:
        assert e["attempts"] == 3
        assert e["parked_from"] == State.PAYMENT_FAILED
        assert e["sku"] == SKU and e["quantity"] == 2
        assert "simulated failure" in e["error"]
    doc = show_entry(rt.engine, ids[0])
    assert doc["state"] == State.DEAD_LETTERED
    assert doc["events"][-1]["to_state"] == State.DEAD_LETTERED
    with pytest.raises(NotFound):
        show_entry(rt.engine, 99999)

    listed = run_cli("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(e["order_id"] for e in json.loads(listed.stdout)) == sorted(ids)
    shown = run_cli("dlq", "show", str(ids[0]), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["attempts"] == 3
    table = run_cli("dlq", "list")
    assert table.returncode == 0 and str(ids[0]) in table.stdout
    missing = run_cli("dlq", "show", "99999")
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr and "99999" in missing.stderr
    check_ok()


def test_replay_twice_runs_the_order_once_more_and_completes_with_one_charge(
    home: Path, workers: Workers
) -> None:
    sup, rt, ids = dead_letter_with_workers(workers, 3)
    sup.stop()
    workers(2, FAILFIRST_PAYMENT_FAIL="0")
    first, rest = ids[0], ids[1:]

    line1 = replay(rt, first)
    line2 = replay(rt, first)
    assert "replayed" in line1[0]
    # The order may already be moving again; either way the second replay changes nothing.
    assert line2[0].startswith(f"order {first} is not dead-lettered (state ")
    assert line2[0].endswith("); nothing to do")
    wait_until(lambda: in_state([first], State.COMPLETED), timeout=30)
    assert replay(rt, first) == [f"order {first} is not dead-lettered (state COMPLETED); nothing to do"]

    out1 = run_cli("dlq", "replay", "--all")
    out2 = run_cli("dlq", "replay", "--all")
    assert out1.returncode == 0, out1.stderr
    assert out1.stdout.count("replayed") == len(rest)
    assert out2.returncode == 0 and "replayed" not in out2.stdout
    wait_until(lambda: in_state(ids, State.COMPLETED), timeout=30)

    final = rows(ids)
    for oid in ids:
        assert final[oid].replays == 1
        assert final[oid].attempts == 4  # three dead-lettered attempts, then exactly one more
        assert count(models.charges, models.charges.c.order_id == oid) == 1
    e, d = models.events, models.dlq
    assert count(e, e.c.from_state == State.DEAD_LETTERED, e.c.order_id.in_(ids)) == len(ids)
    assert count(d, d.c.resolution == "replayed") == len(ids)
    assert count(d, d.c.resolved_at.is_(None)) == 0
    assert list_entries(rt.engine) == []
    with pytest.raises(NotFound):
        replay(rt, 99999)
    check_ok()


def test_replay_of_an_order_parked_after_charge_and_reservation_repeats_neither(
    home: Path, workers: Workers
) -> None:
    rt = open_runtime()
    before = stock()
    [oid] = dead_letter_after_reserve(rt, 1)
    parked = rows([oid])[oid]
    assert parked.state == State.DEAD_LETTERED and parked.parked_from == State.PAYMENT_SUCCESS
    assert stock() == before - 2
    workers(2, FAILFIRST_PAYMENT_FAIL="0")
    replay(rt, oid)
    replay(rt, oid)
    wait_until(lambda: in_state([oid], State.COMPLETED), timeout=30)
    assert count(models.charges, models.charges.c.order_id == oid) == 1
    assert count(models.reservations, models.reservations.c.order_id == oid) == 1
    assert stock() == before - 2
    check_ok()


def test_cancel_twice_compensates_once_and_ends_cancelled(home: Path, workers: Workers) -> None:
    # Chaos is on for the lab (payment always fails), but an operator's cancel must not be
    # failed by it: the refunds go through regardless.
    sup, rt, unpaid = dead_letter_with_workers(workers, 2)
    sup.stop()
    before = stock()
    paid = dead_letter_after_reserve(rt, 2)
    assert stock() == before - 4
    assert count(models.charges, models.charges.c.order_id.in_(paid)) == 2

    first = cancel(rt, paid[0])
    second = cancel(rt, paid[0])
    assert "cancelled" in first[0] and "1 charge(s) refunded" in first[0] and "stock released" in first[0]
    assert second == [f"order {paid[0]} is not dead-lettered (state CANCELLED); nothing to do"]

    out1 = run_cli("dlq", "cancel", "--all")
    out2 = run_cli("dlq", "cancel", "--all")
    assert out1.returncode == 0, out1.stderr
    assert out1.stdout.count("cancelled (") == 3
    assert out2.returncode == 0 and "cancelled (" not in out2.stdout
    again = run_cli("dlq", "cancel", str(unpaid[0]))
    assert again.returncode == 0 and "nothing to do" in again.stdout

    ids = unpaid + paid
    assert in_state(ids, State.CANCELLED)
    rf, rl = models.refunds, models.releases
    for oid in paid:
        assert count(rf, rf.c.order_id == oid) == 1
        assert count(rl, rl.c.order_id == oid) == 1
    assert count(rf, rf.c.order_id.in_(unpaid)) == 0
    assert stock() == before
    d = models.dlq
    assert count(d, d.c.resolution == "cancelled") == 4
    assert count(d, d.c.resolved_at.is_(None)) == 0
    assert count(models.outbox, models.outbox.c.order_id.in_(ids)) == 0
    with pytest.raises(NotFound):
        cancel(rt, 99999)
    check_ok()
