"""Reading orders and stock for people: the queries behind `order` and `stock`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select, update

from failfirst import models
from failfirst.errors import NotFound, ValidationError
from failfirst.states import State


def order_detail(engine: Engine, order_id: int) -> dict[str, Any]:
    """The order row plus its full event history, oldest first."""
    o, e = models.orders, models.events
    with engine.connect() as conn:
        row = conn.execute(select(o).where(o.c.id == order_id)).first()
        if row is None:
            raise NotFound(f"no order {order_id}; see `failfirst order list`")
        history = conn.execute(
            select(e).where(e.c.order_id == order_id).order_by(e.c.version, e.c.id)
        ).all()
        charges = conn.execute(
            select(func.count()).select_from(models.charges).where(models.charges.c.order_id == order_id)
        ).scalar_one()
        refunds = conn.execute(
            select(func.count()).select_from(models.refunds).where(models.refunds.c.order_id == order_id)
        ).scalar_one()
    detail = dict(row._mapping)
    detail["charges"] = charges
    detail["refunds"] = refunds
    detail["events"] = [
        {k: v for k, v in dict(ev._mapping).items() if k != "order_id"} for ev in history
    ]
    return detail


def list_orders(engine: Engine, state: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    o = models.orders
    stmt = select(
        o.c.id, o.c.customer, o.c.idempotency_key, o.c.sku, o.c.quantity,
        o.c.amount_cents, o.c.state, o.c.version, o.c.attempts, o.c.last_error, o.c.created_at,
    )
    if state is not None:
        try:
            state = State(state.upper()).value
        except ValueError:
            raise ValidationError(
                f"unknown state {state!r}; use one of {', '.join(s.value for s in State)}"
            ) from None
        stmt = stmt.where(o.c.state == state)
    if limit < 1:
        raise ValidationError("--limit must be at least 1")
    with engine.connect() as conn:
        rows = conn.execute(stmt.order_by(o.c.id.desc()).limit(limit)).all()
    return [dict(r._mapping) for r in rows]


def list_stock(engine: Engine) -> list[dict[str, Any]]:
    p = models.products
    with engine.connect() as conn:
        rows = conn.execute(select(p).order_by(p.c.sku)).all()
    return [dict(r._mapping) for r in rows]


def set_stock(engine: Engine, sku: str, quantity: int) -> dict[str, Any]:
    """Set on-hand stock; the baseline moves with it so conservation still holds."""
    if quantity < 0:
        raise ValidationError(f"stock {quantity} is negative; use 0 or more")
    p = models.products
    with engine.begin() as conn:
        row = conn.execute(select(p).where(p.c.sku == sku)).first()
        if row is None:
            raise ValidationError(f"unknown SKU {sku!r}; see `failfirst stock list`")
        delta = quantity - row.stock
        conn.execute(
            update(p).where(p.c.sku == sku).values(stock=quantity, baseline=p.c.baseline + delta)
        )
        new = conn.execute(select(p).where(p.c.sku == sku)).first()
    assert new is not None
    return dict(new._mapping)
