"""The dead-letter queue: list, show, replay and cancel parked orders.

The `dlq` table is the DLQ's single source of truth: one open row (no
`resolved_at`) per DEAD_LETTERED order. Replay moves the order back to the
state it was parked from with a fresh retry budget, reopens its outbox row and
enqueues it; cancel compensates (refund every charge, release the stock) and
ends the order in CANCELLED. Both are idempotent: acting on an order that is no
longer dead-lettered changes nothing and says so.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, insert, select, update

from failfirst import models
from failfirst.errors import NotFound
from failfirst.states import OrderView, StaleVersion, State, load, transition

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from failfirst.runtime import Runtime

OPERATOR = "operator"


def list_entries(engine: Engine) -> list[dict[str, Any]]:
    """Open DLQ entries, oldest first, with the order's SKU, quantity and customer."""
    d, o = models.dlq, models.orders
    stmt = (
        select(
            d.c.order_id, d.c.parked_from, d.c.error, d.c.attempts, d.c.created_at,
            o.c.sku, o.c.quantity, o.c.customer,
        )
        .select_from(d.join(o, o.c.id == d.c.order_id))
        .where(d.c.resolved_at.is_(None))
        .order_by(d.c.created_at, d.c.order_id)
    )
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt).all()]


def render_entries(rows: list[dict[str, Any]]) -> Any:
    from datetime import datetime

    from rich.table import Table

    table = Table(title=f"dead-letter queue: {len(rows)} open")
    for name in ("order", "parked from", "attempts", "sku", "qty", "customer", "since", "error"):
        table.add_column(name, justify="right" if name in ("order", "attempts", "qty") else "left")
    for r in rows:
        since = datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            str(r["order_id"]), r["parked_from"], str(r["attempts"]), r["sku"],
            str(r["quantity"]), r["customer"], since, r["error"],
        )
    return table


def _open_entry(conn: Connection, order_id: int) -> Any:
    d = models.dlq
    return conn.execute(
        select(d).where(and_(d.c.order_id == order_id, d.c.resolved_at.is_(None))).order_by(d.c.id)
    ).first()


def show_entry(engine: Engine, order_id: int) -> dict[str, Any]:
    """The order's DLQ entry (the open one, else the latest), the order and its events."""
    d, o, e = models.dlq, models.orders, models.events
    with engine.connect() as conn:
        entry = _open_entry(conn, order_id)
        if entry is None:
            entry = conn.execute(
                select(d).where(d.c.order_id == order_id).order_by(d.c.id.desc())
            ).first()
        if entry is None:
            raise NotFound(f"order {order_id} is not in the DLQ; see `failfirst dlq list`")
        order = conn.execute(select(o).where(o.c.id == order_id)).first()
        history = conn.execute(
            select(e).where(e.c.order_id == order_id).order_by(e.c.version, e.c.id)
        ).all()
    doc: dict[str, Any] = {
        "order_id": order_id,
        "parked_from": entry.parked_from,
        "error": entry.error,
        "attempts": entry.attempts,
        "created_at": entry.created_at,
        "resolved_at": entry.resolved_at,
        "resolution": entry.resolution,
    }
    if order is not None:
        m = order._mapping
        for key in ("state", "sku", "quantity", "customer", "amount_cents", "replays",
                    "idempotency_key", "last_error"):
            doc[key] = m[key]
    doc["events"] = [
        {k: v for k, v in dict(ev._mapping).items() if k != "order_id"} for ev in history
    ]
    return doc


def _targets(engine: Engine, order_id: int | None) -> list[int]:
    if order_id is not None:
        with engine.connect() as conn:
            if load(conn, order_id) is None:
                raise NotFound(f"no order {order_id}; see `failfirst dlq list`")
        return [order_id]
    return [r["order_id"] for r in list_entries(engine)]


def _not_dead(order: OrderView) -> str:
    return f"order {order.id} is not dead-lettered (state {order.state}); nothing to do"


def _resolve(conn: Connection, order_id: int, resolution: str) -> None:
    d = models.dlq
    conn.execute(
        update(d)
        .where(and_(d.c.order_id == order_id, d.c.resolved_at.is_(None)))
        .values(resolved_at=time.time(), resolution=resolution)
    )


# ---------------------------------------------------------------- replay


def replay(rt: Runtime, order_id: int | None) -> list[str]:
    """Resume dead letters where they were parked, with a fresh retry budget."""
    lines: list[str] = []
    for oid in _targets(rt.engine, order_id):
        lines.append(_replay_one(rt, oid))
    if not lines:
        lines.append("the DLQ is empty; nothing to replay")
    return lines


def _replay_one(rt: Runtime, order_id: int) -> str:
    from failfirst.queueing import enqueue_order, job_tag, order_queue

    try:
        with rt.engine.begin() as conn:
            order = load(conn, order_id)
            if order is None:
                raise NotFound(f"no order {order_id}; see `failfirst dlq list`")
            if order.state != State.DEAD_LETTERED:
                return _not_dead(order)
            entry = _open_entry(conn, order_id)
            target = order.parked_from or (entry.parked_from if entry is not None else None)
            if target is None:
                return f"order {order_id} has no parked state to resume; cancel it instead"
            if order.parked_from is None:
                order = replace(order, parked_from=target)
            moved = transition(
                conn,
                order,
                target,
                f"replayed from the DLQ (replay {order.replays + 1})",
                worker=OPERATOR,
                changes={
                    "round_attempts": 0,
                    "replays": order.replays + 1,
                    "cancel_reason": None,
                    "next_attempt_at": None,
                    "lease_owner": None,
                    "lease_until": None,
                    "settled_at": None,
                    "parked_from": None,
                },
            )
            _resolve(conn, order_id, "replayed")
            ob = models.outbox
            if conn.execute(select(ob.c.order_id).where(ob.c.order_id == order_id)).first() is None:
                conn.execute(insert(ob).values(order_id=order_id, created_at=time.time()))
    except StaleVersion:
        return f"order {order_id} changed while replaying; run the command again"
    enqueued = "enqueued"
    if rt.redis is None:
        enqueued = "the reconciler will enqueue it"
    else:
        from redis.exceptions import RedisError

        try:
            enqueue_order(
                order_queue(rt.redis, rt.settings.queue),
                order_id,
                job_tag(moved.attempts, moved.replays, moved.comp_attempts),
            )
        except RedisError:
            enqueued = "Redis is unreachable, the reconciler will enqueue it"
    return f"order {order_id} replayed: back to {moved.state} with a fresh retry budget ({enqueued})"


# ---------------------------------------------------------------- cancel


def cancel(rt: Runtime, order_id: int | None) -> list[str]:
    """Compensate (refund every charge, release the stock) and cancel dead letters."""
    lines: list[str] = []
    for oid in _targets(rt.engine, order_id):
        lines.append(_cancel_one(rt, oid))
    if not lines:
        lines.append("the DLQ is empty; nothing to cancel")
    return lines


def _cancel_one(rt: Runtime, order_id: int) -> str:
    from failfirst.config import FaultConfig
    from failfirst.simulators import InventoryProvider, PaymentProvider

    with rt.engine.connect() as conn:
        order = load(conn, order_id)
    if order is None:
        raise NotFound(f"no order {order_id}; see `failfirst dlq list`")
    if order.state != State.DEAD_LETTERED:
        return _not_dead(order)
    # An operator's cancel is not part of the experiment: no injected faults.
    calm = FaultConfig(payment_fail=0.0, inventory_fail=0.0, seed=rt.settings.faults.seed)
    refunded = PaymentProvider(rt.engine, calm).refund_all(order, f"dlq-refund:{order.replays}")
    released = InventoryProvider(rt.engine, calm).release(order)
    reason = "cancelled from the DLQ by an operator"
    try:
        with rt.engine.begin() as conn:
            moved = transition(
                conn,
                order,
                State.CANCELLED,
                reason,
                worker=OPERATOR,
                changes={"cancel_reason": reason, "next_attempt_at": None},
            )
            _resolve(conn, order_id, "cancelled")
            conn.execute(delete(models.outbox).where(models.outbox.c.order_id == order_id))
    except StaleVersion:
        return f"order {order_id} changed while cancelling; run the command again"
    parts = [f"{refunded} charge(s) refunded"]
    if released:
        parts.append("stock released")
    return f"order {order_id} cancelled ({', '.join(parts)}); now {moved.state}"
