"""Statements of the hot path, compiled once per dialect and run on the driver.

Building a SQLAlchemy Core statement and computing its cache key costs more
Python time than SQLite takes to run it: in the worker that overhead was the
largest single cost per order. The few statements every order runs are written
here once, with named parameters; each is compiled to the dialect's own
parameter style the first time a connection of that dialect uses it.

Inside a transaction, later calls run on the driver's own cursor: even
`exec_driver_sql` spends ten times longer in SQLAlchemy's execution layer
(36 us) than SQLite takes for a keyed SELECT on the bare cursor (3.3 us), and an
order runs fifteen of these. Driver errors are wrapped into SQLAlchemy's
exception classes as `exec_driver_sql` would, so callers catch one family.
Outside a transaction the statement goes through `exec_driver_sql`, which
starts one the way the engine is configured to. Everything else keeps using
Core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, NoResultFound

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

    def __call__(self, conn: Connection, **params: Any) -> Rows | CursorResult[Any]:
        sql, order = self._compiled(conn)
        args: Any = tuple(params[n] for n in order) if order is not None else params
        if not conn.in_transaction():
            return conn.exec_driver_sql(sql, args)
        dbapi = conn.dialect.loaded_dbapi
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql, args)
            return Rows(cursor)
        except dbapi.Error as exc:
            raise DBAPIError.instance(sql, args, exc, dbapi.Error) from exc
        finally:
            cursor.close()


class Row:
    """One result row, readable by attribute or through `_mapping` like SQLAlchemy's."""

    __slots__ = ("_mapping",)

    def __init__(self, keys: tuple[str, ...], values: tuple[Any, ...]) -> None:
        self._mapping = dict(zip(keys, values, strict=True))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mapping[name]
        except KeyError:
            raise AttributeError(name) from None


class Rows:
    """The part of a SQLAlchemy result the hot path reads: first row, scalars, rowcount."""

    __slots__ = ("_keys", "_rows", "rowcount")

    def __init__(self, cursor: Any) -> None:
        self._keys: tuple[str, ...] = tuple(d[0] for d in cursor.description or ())
        self._rows: list[tuple[Any, ...]] = list(cursor.fetchall()) if cursor.description else []
        # Read after fetching: SQLite counts RETURNING rows only as they are stepped through.
        self.rowcount: int = cursor.rowcount

    def first(self) -> Row | None:
        return Row(self._keys, self._rows[0]) if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise NoResultFound(f"expected one row, got {len(self._rows)}")
        return self._rows[0][0]


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
