"""The store's tables.

Timestamps are Unix seconds as floats: the pipeline and the lab do arithmetic on
them (latency, leases, backoff) far more often than anyone reads them raw, and
the CLI formats them for people. Money is integer cents.

The payment and inventory ledgers (charges, refunds, reservations, releases) are
the simulated providers' own books. They are written in their own transactions,
never in the order's, exactly as a remote provider would be, so the invariant
checker can compare two independent records.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1


class Meta(SQLModel, table=True):
    __tablename__ = "meta"
    key: str = Field(primary_key=True)
    value: str


class Product(SQLModel, table=True):
    """A catalogue entry. `baseline` is stock plus units held by open reservations."""

    __tablename__ = "products"
    sku: str = Field(primary_key=True)
    name: str
    price_cents: int
    stock: int
    baseline: int


class Order(SQLModel, table=True):
    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_state", "state"),
        Index("ix_orders_customer_key", "customer", "idempotency_key"),
        Index("ix_orders_settled_at", "settled_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    customer: str
    idempotency_key: str
    sku: str
    quantity: int
    amount_cents: int
    state: str
    version: int = 1
    attempts: int = 0
    round_attempts: int = 0
    replays: int = 0
    last_error: str | None = None
    parked_from: str | None = None
    cancel_reason: str | None = None
    comp_attempts: int = 0
    next_attempt_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    created_at: float
    updated_at: float
    settled_at: float | None = None


class OrderEvent(SQLModel, table=True):
    """One row per transition: the audit log the invariants are proven from."""

    __tablename__ = "order_events"
    __table_args__ = (Index("ix_events_order", "order_id", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    order_id: int
    from_state: str | None
    to_state: str
    version: int
    attempt: int
    reason: str
    worker: str
    at: float


class IdempotencyKey(SQLModel, table=True):
    """A claimed key. The primary key makes the claim an atomic unique insert."""

    __tablename__ = "idempotency_keys"
    customer: str = Field(primary_key=True)
    key: str = Field(primary_key=True)
    fingerprint: str
    status: str
    order_id: int | None = None
    response: str | None = Field(default=None, sa_column=Column(Text))
    locked_until: float
    expires_at: float
    created_at: float


class Outbox(SQLModel, table=True):
    """Present while an order is owed work; the reconciler re-enqueues from it."""

    __tablename__ = "outbox"
    order_id: int = Field(primary_key=True)
    created_at: float
    dispatched_at: float | None = None


class Charge(SQLModel, table=True):
    __tablename__ = "charges"
    __table_args__ = (UniqueConstraint("provider_key", name="uq_charges_key"),)
    id: int | None = Field(default=None, primary_key=True)
    order_id: int = Field(index=True)
    provider_key: str
    amount_cents: int
    at: float


class Refund(SQLModel, table=True):
    __tablename__ = "refunds"
    id: int | None = Field(default=None, primary_key=True)
    charge_id: int = Field(unique=True)
    order_id: int = Field(index=True)
    amount_cents: int
    at: float


class Reservation(SQLModel, table=True):
    __tablename__ = "reservations"
    id: int | None = Field(default=None, primary_key=True)
    order_id: int = Field(unique=True)
    sku: str
    quantity: int
    at: float


class Release(SQLModel, table=True):
    __tablename__ = "releases"
    id: int | None = Field(default=None, primary_key=True)
    order_id: int = Field(unique=True)
    sku: str
    quantity: int
    at: float


class DlqEntry(SQLModel, table=True):
    """The dead-letter queue's single source of truth (RQ's failed registry is not used)."""

    __tablename__ = "dlq"
    __table_args__ = (Index("ix_dlq_open", "resolved_at", "order_id"),)
    id: int | None = Field(default=None, primary_key=True)
    order_id: int = Field(index=True)
    parked_from: str
    error: str
    attempts: int
    created_at: float
    resolved_at: float | None = None
    resolution: str | None = None


class FaultRecord(SQLModel, table=True):
    """Faults that happened inside the pipeline (crash points), written before the crash."""

    __tablename__ = "faults"
    __table_args__ = (UniqueConstraint("order_id", "kind", name="uq_faults_order_kind"),)
    id: int | None = Field(default=None, primary_key=True)
    order_id: int | None = None
    kind: str
    detail: str
    at: float


orders = Order.__table__
events = OrderEvent.__table__
products = Product.__table__
idem_keys = IdempotencyKey.__table__
outbox = Outbox.__table__
charges = Charge.__table__
refunds = Refund.__table__
reservations = Reservation.__table__
releases = Release.__table__
dlq = DlqEntry.__table__
faults = FaultRecord.__table__
meta = Meta.__table__
