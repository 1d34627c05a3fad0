"""Statements of the hot path, compiled once per dialect and run on the driver.

Building a SQLAlchemy Core statement and computing its cache key costs more
Python time than SQLite takes to run it: in the worker that overhead was the
largest single cost per order. The few statements every order runs are written
here once, with named parameters; each is compiled to the dialect's own
parameter style the first time a connection of that dialect uses it, and later
calls go straight to `exec_driver_sql`. Everything else keeps using Core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import text

if TYPE_CHECKING:
    from sqlalchemy import Connection, CursorResult


class Prepared:
    """One SQL text with `:name` parameters, ready for any dialect."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self._by_dialect: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def _compiled(self, conn: Connection) -> tuple[str, tuple[str, ...] | None]:
        name = conn.dialect.name
        found = self._by_dialect.get(name)
        if found is None:
            compiled = text(self.sql).compile(dialect=conn.dialect)
            order = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
            found = self._by_dialect[name] = (compiled.string, order)
        return found

    def __call__(self, conn: Connection, **params: Any) -> CursorResult[Any]:
        sql, order = self._compiled(conn)
        args: Any = tuple(params[n] for n in order) if order is not None else params
        return conn.exec_driver_sql(sql, args)


_updates: dict[tuple[str, ...], Prepared] = {}


def update_order(columns: tuple[str, ...], *, check_version: bool) -> Prepared:
    """`UPDATE orders SET <columns> WHERE id = :id [AND version = :expected]`, cached per shape."""
    key = (*columns, "+v" if check_version else "-v")
    found = _updates.get(key)
    if found is None:
        sets = ", ".join(f"{c} = :{c}" for c in columns)
        where = "id = :id" + (" AND version = :expected" if check_version else "")
        found = _updates[key] = Prepared(f"UPDATE orders SET {sets} WHERE {where}")
    return found


INSERT_EVENT = Prepared(
    "INSERT INTO order_events (order_id, from_state, to_state, version, attempt, reason, worker, at) "
    "VALUES (:order_id, :from_state, :to_state, :version, :attempt, :reason, :worker, :at)"
)

SETTLED_SQL = "('COMPLETED', 'CANCELLED', 'DEAD_LETTERED')"

ACQUIRE = Prepared(
    "UPDATE orders SET lease_owner = :owner, lease_until = :until "
    f"WHERE id = :id AND state NOT IN {SETTLED_SQL} "
    "AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :owner) "
    "AND (next_attempt_at IS NULL OR next_attempt_at <= :soon) "
    "RETURNING *"
)

ACQUIRE_UNLOCKED = Prepared(
    "UPDATE orders SET lease_owner = :owner, lease_until = :until "
    f"WHERE id = :id AND state NOT IN {SETTLED_SQL} RETURNING *"
)

DELETE_OUTBOX = Prepared("DELETE FROM outbox WHERE order_id = :order_id")

FIND_CHARGE = Prepared("SELECT id FROM charges WHERE provider_key = :key")

INSERT_CHARGE = Prepared(
    "INSERT INTO charges (order_id, provider_key, amount_cents, at) "
    "VALUES (:order_id, :key, :amount, :at) RETURNING id"
)

FIND_RESERVATION = Prepared("SELECT id FROM reservations WHERE order_id = :order_id")

TAKE_STOCK = Prepared(
    "UPDATE products SET stock = stock - :quantity WHERE sku = :sku AND stock >= :quantity"
)

INSERT_RESERVATION = Prepared(
    "INSERT INTO reservations (order_id, sku, quantity, at) VALUES (:order_id, :sku, :quantity, :at)"
)

INSERT_ORDER = Prepared(
    "INSERT INTO orders (customer, idempotency_key, sku, quantity, amount_cents, state, version, "
    "attempts, round_attempts, replays, comp_attempts, created_at, updated_at) "
    "VALUES (:customer, :key, :sku, :quantity, :amount, :state, 1, 0, 0, 0, 0, :now, :now) RETURNING id"
)

INSERT_OUTBOX = Prepared("INSERT INTO outbox (order_id, created_at) VALUES (:order_id, :now)")

INSERT_DONE_KEY = Prepared(
    "INSERT INTO idempotency_keys (customer, key, fingerprint, status, order_id, response, "
    "locked_until, expires_at, created_at) "
    "VALUES (:customer, :key, :fingerprint, 'done', :order_id, :response, :now, :expires, :now)"
)
