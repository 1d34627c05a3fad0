"""Synthetic stores: the records of a long lab run, written in bulk.

Driving 100 000 orders through the gateway and the workers takes many minutes,
yet the watch and checker benchmarks only need the rows such a run leaves
behind. `fill` writes them directly: every order follows a path the pipeline
really takes (placed, payment attempts that fail and are retried, charge,
reservation, completion; or compensation and cancellation; or dead-lettering
when retries run out), with the ledgers, outbox, DLQ and stock that path
implies, so the invariant checker finds the store clean. A seeded generator
makes two fills with one seed identical apart from the wall-clock timestamps.

Timestamps end just before the call, at a steady placement rate, so a
snapshot taken right after a fill sees a full last minute of settlements, as
it would while watching a busy lab.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from failfirst import models, store

PLACED_PER_SECOND = 100.0
BATCH = 20_000
MAX_FAILURES = 4
DEAD_ATTEMPTS = 5
WORKERS = 8

COMPLETED = "completed"
CANCELLED_CHARGED = "cancelled-charged"
CANCELLED_DECLINED = "cancelled-declined"
DEAD = "dead"
IN_FLIGHT = "in-flight"

# Shares of settled outcomes, close to the demo scenario's with its default faults.
KINDS = (COMPLETED, CANCELLED_CHARGED, CANCELLED_DECLINED, DEAD)
WEIGHTS = (0.82, 0.08, 0.05, 0.05)

RETRYABLE = ("TIMEOUT: simulated failure", "GATEWAY_ERROR: simulated failure")
BOTTLENECK = "INVENTORY_BOTTLENECK: the warehouse cannot take the reservation"
DECLINED = "INSUFFICIENT_FUNDS: card declined for insufficient funds"


@dataclass(slots=True)
class Plan:
    """One order's outcome and how many payment attempts failed before it."""

    kind: str
    failures: int

    @property
    def events(self) -> int:
        """Events this path writes: placed, two per failed attempt, then the final stretch."""
        if self.kind == DEAD:
            return 2 + 2 * DEAD_ATTEMPTS
        tail = {COMPLETED: 4, CANCELLED_CHARGED: 3, CANCELLED_DECLINED: 2, IN_FLIGHT: 0}[self.kind]
        return 1 + 2 * self.failures + tail


def fill(engine: Engine, orders: int, events_per_order: int = 6, *, seed: int = 0) -> None:
    """Add `orders` orders and about `orders * events_per_order` events to the store.

    The event total is exact for 6 to 12 events per order (the outcome mix
    needs about 5 with no failed payment at all, and 4 failures per order is
    the most it retries); outside that range it is as close as the paths
    allow. One order in a hundred, at most 50, is left in flight (CREATED or
    waiting to retry a payment) with its outbox row. Products are added to
    the catalogue if it is empty and restocked by what the new orders hold,
    so stock stays conserved whatever the store held before.
    """
    if orders <= 0:
        return
    rng = random.Random(seed)
    plans = _plans(orders, events_per_order, rng)
    with engine.begin() as conn:
        first_order = _next_id(conn, models.orders)
        first_charge = _next_id(conn, models.charges)
        prices = _catalogue(conn)
        writer = _Writer(conn, rng, prices, first_order, first_charge, seed)
        writer.write(plans)
        _restock(conn, prices, writer.held)
        if conn.dialect.name == "postgresql":
            for table in ("orders", "charges"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )


def _plans(orders: int, events_per_order: int, rng: random.Random) -> list[Plan]:
    """Outcomes for every order, then payment failures shifted until the event total is the target."""
    in_flight = min(orders // 100, 50)
    plans = [Plan(rng.choices(KINDS, WEIGHTS)[0], 0) for _ in range(orders - in_flight)]
    for plan in plans:
        while plan.kind != DEAD and plan.failures < MAX_FAILURES and rng.random() < 0.25:
            plan.failures += 1
    plans += [Plan(IN_FLIGHT, i % 2) for i in range(in_flight)]
    diff = orders * events_per_order - sum(p.events for p in plans)
    movable = [p for p in plans if p.kind in (COMPLETED, CANCELLED_CHARGED, CANCELLED_DECLINED)]
    while abs(diff) >= 2 and movable:
        moved = False
        for plan in rng.sample(movable, len(movable)):
            if diff >= 2 and plan.failures < MAX_FAILURES:
                plan.failures += 1
                diff -= 2
                moved = True
            elif diff <= -2 and plan.failures > 0:
                plan.failures -= 1
                diff += 2
                moved = True
            if abs(diff) < 2:
                break
        if not moved:
            break
    # An odd remainder: one order is cancelled at the reservation instead of completing, or vice versa.
    swap = {1: (CANCELLED_CHARGED, COMPLETED), -1: (COMPLETED, CANCELLED_CHARGED)}.get(diff)
    if swap is not None:
        for plan in movable:
            if plan.kind == swap[0]:
                plan.kind = swap[1]
                break
    return plans


def _next_id(conn: Connection, table: Any) -> int:
    return int(conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one()) + 1


def _catalogue(conn: Connection) -> dict[str, int]:
    """SKU -> price; seeds the default catalogue into a store that has none."""
    p = models.products
    rows: dict[str, int] = dict(conn.execute(select(p.c.sku, p.c.price_cents)).all())
    if rows:
        return rows
    conn.execute(
        insert(p),
        [
            {"sku": s, "name": n, "price_cents": c, "stock": q, "baseline": q}
            for s, n, c, q in store.DEFAULT_CATALOGUE
        ],
    )
    return {s: c for s, _, c, _ in store.DEFAULT_CATALOGUE}


def _restock(conn: Connection, prices: dict[str, int], held: dict[str, int]) -> None:
    """Raise each SKU's baseline by what completed orders now hold: stock + held stays the baseline."""
    p = models.products
    for sku in prices:
        if held.get(sku):
            conn.execute(update(p).where(p.c.sku == sku).values(baseline=p.c.baseline + held[sku]))


# Columns written per table, in the order the row tuples below use.
COLUMNS: dict[str, tuple[str, ...]] = {
    "orders": (
        "id", "customer", "idempotency_key", "sku", "quantity", "amount_cents", "state", "version",
        "attempts", "round_attempts", "replays", "last_error", "parked_from", "cancel_reason",
        "comp_attempts", "next_attempt_at", "lease_owner", "lease_until", "created_at", "updated_at",
        "settled_at",
    ),
    "order_events": ("order_id", "from_state", "to_state", "version", "attempt", "reason", "worker", "at"),
    "idempotency_keys": (
        "customer", "key", "fingerprint", "status", "order_id", "response", "locked_until", "expires_at",
        "created_at",
    ),
    "outbox": ("order_id", "created_at", "dispatched_at"),
    "charges": ("id", "order_id", "provider_key", "amount_cents", "at"),
    "refunds": ("charge_id", "order_id", "amount_cents", "at"),
    "reservations": ("order_id", "sku", "quantity", "at"),
    "dlq": ("order_id", "parked_from", "error", "attempts", "created_at"),
}


class _Writer:
    """Turns plans into row tuples and flushes each table with the driver's executemany.

    Tuples straight to the driver, not dicts through SQLAlchemy's parameter
    processing: at 600 000 event rows that processing costs more than SQLite's
    own inserts.
    """

    def __init__(
        self, conn: Connection, rng: random.Random, prices: dict[str, int],
        first_order: int, first_charge: int, seed: int,
    ) -> None:
        self.conn = conn
        self.rng = rng
        self.prices = prices
        self.skus = sorted(prices)
        self.next_order = first_order
        self.next_charge = first_charge
        self.seed = seed
        self.held: dict[str, int] = {}
        self.rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in COLUMNS}
        mark = {"qmark": "?", "numeric": ":{}", "named": ":p{}"}.get(conn.dialect.paramstyle, "%s")
        self.sql = {
            name: f"INSERT INTO {name} ({', '.join(cols)}) VALUES "
            f"({', '.join(mark.format(i + 1) for i in range(len(cols)))})"
            for name, cols in COLUMNS.items()
        }

    def add(self, table: str, row: tuple[Any, ...]) -> None:
        batch = self.rows[table]
        batch.append(row)
        if len(batch) >= BATCH:
            self.flush(table)

    def flush(self, table: str) -> None:
        batch = self.rows[table]
        if batch:
            self.conn.exec_driver_sql(self.sql[table], batch)
            batch.clear()

    def write(self, plans: list[Plan]) -> None:
        end = time.time() - 5.0
        start = end - len(plans) / PLACED_PER_SECOND
        for i, plan in enumerate(plans):
            self.order(plan, start + i / PLACED_PER_SECOND)
        for table in self.rows:
            self.flush(table)

    def order(self, plan: Plan, created: float) -> None:
        """Write one order: its event path, its ledger rows and its idempotency key."""
        rng = self.rng
        oid = self.next_order
        self.next_order += 1
        sku = self.skus[rng.randrange(len(self.skus))]
        qty = 1 + rng.randrange(3)
        amount = self.prices[sku] * qty
        customer = f"cust-{rng.randrange(97)}"
        key = f"synthetic-{self.seed}-{oid}"
        worker = f"synthetic:{1000 + rng.randrange(WORKERS)}"
        events = self.events = [(oid, None, "CREATED", 1, 0, "placed", "gateway", created)]
        self.now = created
        self.worker = worker

        state = "CREATED"
        failures = DEAD_ATTEMPTS if plan.kind == DEAD else plan.failures
        error: str | None = None
        for n in range(1, failures + 1):
            self.step(state, "PAYMENT_PENDING", n, f"payment attempt {n}", 0.002 + 0.018 * rng.random())
            error = RETRYABLE[rng.random() < 0.5]
            self.step("PAYMENT_PENDING", "PAYMENT_FAILED", n, error, 0.005 + 0.025 * rng.random())
            state = "PAYMENT_FAILED"
            self.now += min(0.3, 0.02 * 2 ** (n - 1)) * rng.random()
        attempts = failures
        parked = cancel = retry_at = None
        if plan.kind == DEAD:
            self.step(state, "DEAD_LETTERED", attempts, "retries exhausted", 0.001)
            parked = state
            self.add("dlq", (oid, state, error, attempts, self.now))
        elif plan.kind == IN_FLIGHT:
            retry_at = self.now + 0.1 if failures else None
            self.add("outbox", (oid, created, created))
        else:
            attempts += 1
            self.step(state, "PAYMENT_PENDING", attempts, f"payment attempt {attempts}",
                      0.002 + 0.018 * rng.random())
            if plan.kind == CANCELLED_DECLINED:
                self.step("PAYMENT_PENDING", "CANCELLED", attempts, DECLINED, 0.005 + 0.025 * rng.random())
                error = cancel = DECLINED
            else:
                charge = self.next_charge
                self.next_charge += 1
                self.step("PAYMENT_PENDING", "PAYMENT_SUCCESS", attempts, f"charged (charge {charge})",
                          0.005 + 0.025 * rng.random())
                self.add("charges", (charge, oid, f"order-{oid}", amount, self.now))
                if plan.kind == COMPLETED:
                    self.step("PAYMENT_SUCCESS", "INVENTORY_RESERVED", attempts, "stock reserved",
                              0.002 + 0.018 * rng.random())
                    self.add("reservations", (oid, sku, qty, self.now))
                    self.held[sku] = self.held.get(sku, 0) + qty
                    self.step("INVENTORY_RESERVED", "COMPLETED", attempts, "paid and reserved", 0.0)
                else:
                    self.step("PAYMENT_SUCCESS", "CANCELLED", attempts, BOTTLENECK,
                              0.005 + 0.025 * rng.random())
                    self.add("refunds", (charge, oid, amount, self.now))
                    error = cancel = BOTTLENECK
        last = events[-1][2]
        settled = self.now if last in ("COMPLETED", "CANCELLED", "DEAD_LETTERED") else None
        self.add("orders", (
            oid, customer, key, sku, qty, amount, last, len(events), attempts, attempts, 0, error, parked,
            cancel, 0, retry_at, None, None, created, self.now, settled,
        ))
        for event in events:
            self.add("order_events", event)
        body = f'["{customer}","{sku}",{qty}]'
        response = json.dumps({
            "order_id": oid, "state": "CREATED", "idempotency_key": key, "customer": customer, "sku": sku,
            "quantity": qty, "amount_cents": amount, "replayed": False, "enqueued": True,
        })
        self.add("idempotency_keys", (
            customer, key, hashlib.sha256(body.encode()).hexdigest(), "done", oid, response, created,
            created + 24 * 3600.0, created,
        ))

    def step(self, frm: str, to: str, attempt: int, reason: str, pause: float) -> None:
        """Append the next event of the current order, `pause` seconds after the previous one."""
        self.now += pause
        events = self.events
        events.append((events[0][0], frm, to, len(events) + 1, attempt, reason, self.worker, self.now))
