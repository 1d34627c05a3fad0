"""The order state machine: the one place that decides what may follow what.

Every state change in failfirst goes through `transition`, a compare-and-set on
the order's `version` that writes the new state, bumps the version and appends
the audit event in the caller's transaction. Nothing else updates `state`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, and_, func, select

from failfirst import models, sql


class State(StrEnum):
    CREATED = "CREATED"
    PAYMENT_PENDING = "PAYMENT_PENDING"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    PAYMENT_SUCCESS = "PAYMENT_SUCCESS"
    INVENTORY_RESERVED = "INVENTORY_RESERVED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    DEAD_LETTERED = "DEAD_LETTERED"


TERMINAL = frozenset({State.COMPLETED, State.CANCELLED})
SETTLED = TERMINAL | {State.DEAD_LETTERED}
ALL_STATES = tuple(State)

_D = State.DEAD_LETTERED
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.PAYMENT_PENDING, State.CANCELLED, _D}),
    State.PAYMENT_PENDING: frozenset(
        {State.PAYMENT_SUCCESS, State.PAYMENT_FAILED, State.CANCELLED, _D}
    ),
    State.PAYMENT_FAILED: frozenset({State.PAYMENT_PENDING, State.CANCELLED, _D}),
    State.PAYMENT_SUCCESS: frozenset({State.INVENTORY_RESERVED, State.CANCELLED, _D}),
    State.INVENTORY_RESERVED: frozenset({State.COMPLETED, State.CANCELLED, _D}),
    State.COMPLETED: frozenset(),
    State.CANCELLED: frozenset(),
    # Replay returns to the parked state only; `is_legal` checks which one.
    _D: frozenset(
        {
            State.CREATED,
            State.PAYMENT_PENDING,
            State.PAYMENT_FAILED,
            State.PAYMENT_SUCCESS,
            State.INVENTORY_RESERVED,
            State.CANCELLED,
        }
    ),
}


def is_legal(frm: str, to: str, parked_from: str | None = None) -> bool:
    """Whether `frm -> to` is an edge of the machine (replay must go back where it was parked)."""
    try:
        allowed = TRANSITIONS[State(frm)]
    except ValueError:
        return False
    if to not in allowed:
        return False
    return not (frm == _D and to != State.CANCELLED and parked_from is not None and to != parked_from)


class IllegalTransition(Exception):
    """A transition the machine does not allow; nothing was written."""

    def __init__(self, order_id: int, frm: str, to: str, why: str = "") -> None:
        detail = f": {why}" if why else ""
        super().__init__(f"order {order_id}: {frm} -> {to} is not allowed{detail}")
        self.order_id, self.frm, self.to = order_id, frm, to


class StaleVersion(Exception):
    """Someone else moved the order first; reload it and decide again."""

    def __init__(self, order_id: int, version: int) -> None:
        super().__init__(f"order {order_id} is no longer at version {version}")
        self.order_id, self.version = order_id, version


@dataclass(frozen=True, slots=True)
class OrderView:
    """An immutable snapshot of one order row, as read at `version`."""

    id: int
    customer: str
    idempotency_key: str
    sku: str
    quantity: int
    amount_cents: int
    state: str
    version: int
    attempts: int
    round_attempts: int
    replays: int
    last_error: str | None
    parked_from: str | None
    cancel_reason: str | None
    comp_attempts: int
    next_attempt_at: float | None
    lease_owner: str | None
    lease_until: float | None
    created_at: float
    updated_at: float
    settled_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> OrderView:
        m = row._mapping
        return cls(**{f.name: m[f.name] for f in fields(cls)})

    @property
    def settled(self) -> bool:
        return self.state in SETTLED


def load(conn: Connection, order_id: int) -> OrderView | None:
    row = conn.execute(select(models.orders).where(models.orders.c.id == order_id)).first()
    return OrderView.from_row(row) if row is not None else None


def holds_side_effects(conn: Connection, order_id: int) -> str | None:
    """Why the order may not be CANCELLED yet: an unrefunded charge or unreleased stock."""
    ch, rf, rs, rl = models.charges, models.refunds, models.reservations, models.releases
    unrefunded = conn.execute(
        select(func.count())
        .select_from(ch.outerjoin(rf, rf.c.charge_id == ch.c.id))
        .where(and_(ch.c.order_id == order_id, rf.c.id.is_(None)))
    ).scalar_one()
    if unrefunded:
        return "it still holds a charge that was not refunded"
    unreleased = conn.execute(
        select(func.count())
        .select_from(rs.outerjoin(rl, rl.c.order_id == rs.c.order_id))
        .where(and_(rs.c.order_id == order_id, rl.c.id.is_(None)))
    ).scalar_one()
    if unreleased:
        return "it still holds reserved stock that was not released"
    return None


def transition(
    conn: Connection,
    order: OrderView,
    to: State | str,
    reason: str,
    *,
    worker: str = "",
    attempt: int | None = None,
    changes: dict[str, Any] | None = None,
    check_version: bool = True,
    guard_compensation: bool = True,
) -> OrderView:
    """Move `order` to `to` if it is still at `order.version`; return the new snapshot.

    Runs inside the caller's transaction: the row update and the event insert
    commit or roll back together. `check_version=False` exists only so a chaos
    run can prove that the checker notices lost updates.
    """
    to = State(to)
    if not is_legal(order.state, to, order.parked_from):
        raise IllegalTransition(order.id, order.state, to)
    if to == State.CANCELLED and guard_compensation:
        why = holds_side_effects(conn, order.id)
        if why:
            raise IllegalTransition(order.id, order.state, to, why)
    now = time.time()
    values: dict[str, Any] = dict(changes or {})
    values.update(state=to.value, version=order.version + 1, updated_at=now)
    if to in SETTLED:
        values.setdefault("settled_at", now)
        values.setdefault("lease_owner", None)
        values.setdefault("lease_until", None)
    if to == State.DEAD_LETTERED:
        values.setdefault("parked_from", order.state)
    columns = tuple(sorted(values))
    result = sql.update_order(columns, check_version=check_version)(
        conn, id=order.id, expected=order.version, **values
    )
    if result.rowcount != 1:
        raise StaleVersion(order.id, order.version)
    sql.INSERT_EVENT(
        conn,
        order_id=order.id,
        from_state=order.state,
        to_state=to.value,
        version=order.version + 1,
        attempt=order.attempts if attempt is None else attempt,
        reason=reason,
        worker=worker,
        at=now,
    )
    return replace(order, **values)
