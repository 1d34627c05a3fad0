"""The payment and inventory providers, simulated, failing on purpose.

Each provider keeps its own ledger (charges and refunds; reservations and
releases) and writes it in its own transaction, as a remote service would: the
order's row may lag behind the ledger after a crash, which is exactly what the
pipeline must cope with.

Every random choice is drawn from a generator keyed by (seed, order identity,
step, attempt), never from a shared stream, so an order's fate depends on the
seed alone and not on which worker ran it or when.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from dataclasses import dataclass

from sqlalchemy import Engine, and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from failfirst import models, sql
from failfirst.config import FaultConfig
from failfirst.states import OrderView


class ProviderError(Exception):
    """A provider call that did not succeed. `retryable` says whether trying again can help."""

    kind = "PROVIDER_ERROR"
    retryable = False

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"{self.kind}{': ' + detail if detail else ''}")


class RetryableError(ProviderError):
    retryable = True


class ProviderTimeout(RetryableError):
    kind = "TIMEOUT"


class GatewayError(RetryableError):
    kind = "GATEWAY_ERROR"


class InsufficientFunds(ProviderError):
    kind = "INSUFFICIENT_FUNDS"


class OutOfStock(ProviderError):
    kind = "OUT_OF_STOCK"


class Bottleneck(ProviderError):
    kind = "INVENTORY_BOTTLENECK"


def draw(seed: int, identity: str, step: str) -> random.Random:
    """A generator for one decision, independent of every other decision."""
    digest = hashlib.blake2b(f"{seed}|{identity}|{step}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def identity(order: OrderView) -> str:
    """What keys an order's random draws: stable across runs, unlike the row id."""
    return f"{order.customer}/{order.idempotency_key}/{order.replays}"


def charge_key(order: OrderView, *, per_attempt: bool = False) -> str:
    """The provider idempotency key. Per attempt only under `--break payment-keys`."""
    base = f"order-{order.id}"
    return f"{base}-attempt-{order.attempts}" if per_attempt else base


@dataclass
class Call:
    """The fault decisions for one provider call, drawn up front."""

    latency: float
    hang: bool
    fail: float
    kind: float
    ambiguous: float
    funds: float


class Simulator:
    def __init__(self, engine: Engine, faults: FaultConfig) -> None:
        self.engine = engine
        self.faults = faults

    def _call(self, order: OrderView, step: str) -> Call:
        f = self.faults
        rng = draw(f.seed, identity(order), step)
        return Call(
            latency=(f.latency_ms + rng.random() * f.jitter_ms) / 1000 + f.storm_delay(time.time()),
            hang=rng.random() < f.hang,
            fail=rng.random(),
            kind=rng.random(),
            ambiguous=rng.random(),
            funds=rng.random(),
        )

    def _wait(self, call: Call) -> None:
        if call.hang:
            time.sleep(self.faults.call_timeout_ms / 1000)
            raise ProviderTimeout("no answer within the call timeout")
        if call.latency > 0:
            time.sleep(call.latency)


class PaymentProvider(Simulator):
    """Charges and refunds, idempotent on the caller's key like a real card processor."""

    def charge(self, order: OrderView, key: str, step: str) -> int:
        """Charge the order once per key; returns the charge id. May raise ProviderError."""
        call = self._call(order, step)
        self._wait(call)
        charge_id = self._charge_once(order, key, call)
        ambiguous = call.ambiguous < self.faults.ambiguous and (
            not self.faults.ambiguous_first_attempt_only or order.attempts <= 1
        )
        if ambiguous:
            raise ProviderTimeout("charged, but the answer was lost")
        return charge_id

    def _charge_once(self, order: OrderView, key: str, call: Call) -> int:
        """Look the key up and charge in one transaction: a known key answers with its charge."""
        try:
            with self.engine.begin() as conn:
                existing = sql.FIND_CHARGE(conn, key=key).scalar()
                if existing is not None:
                    return int(existing)
                if call.funds < self.faults.insufficient_funds:
                    raise InsufficientFunds("card declined for insufficient funds")
                if call.fail < self.faults.payment_fail:
                    raise (ProviderTimeout if call.kind < 0.5 else GatewayError)("simulated failure")
                return int(
                    sql.INSERT_CHARGE(
                        conn, order_id=order.id, key=key, amount=order.amount_cents, at=time.time()
                    ).scalar_one()
                )
        except IntegrityError:
            with self.engine.connect() as conn:
                return int(sql.FIND_CHARGE(conn, key=key).scalar_one())

    def refund_all(self, order: OrderView, step: str) -> int:
        """Refund every charge of the order not yet refunded; returns how many were refunded."""
        call = self._call(order, step)
        self._wait(call)
        if call.fail < self.faults.payment_fail:
            raise (ProviderTimeout if call.kind < 0.5 else GatewayError)("refund failed")
        ch, rf = models.charges, models.refunds
        refunded = 0
        # The unique charge_id of refunds settles a race between two calls: the
        # loser (on PostgreSQL it waits for the winner's commit) refunds nothing.
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            pending = conn.execute(
                select(ch.c.id, ch.c.amount_cents)
                .select_from(ch.outerjoin(rf, rf.c.charge_id == ch.c.id))
                .where(and_(ch.c.order_id == order.id, rf.c.id.is_(None)))
            ).all()
            for charge_id, amount in pending:
                conn.execute(
                    insert(rf).values(
                        charge_id=charge_id, order_id=order.id, amount_cents=amount, at=time.time()
                    )
                )
            refunded = len(pending)
        return refunded


class InventoryProvider(Simulator):
    """Reservations against real per-SKU stock; never below zero, once per order."""

    def reserve(self, order: OrderView, step: str) -> None:
        call = self._call(order, step)
        self._wait(call)
        # A concurrent call for this order that reserved first makes our insert fail on
        # the unique order_id (on PostgreSQL after waiting for its commit); our stock
        # take rolls back with it and the order is reserved once.
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            if sql.FIND_RESERVATION(conn, order_id=order.id).first():
                return
            if call.fail < self.faults.inventory_fail:
                raise Bottleneck("the warehouse cannot take the reservation")
            taken = sql.TAKE_STOCK(conn, sku=order.sku, quantity=order.quantity)
            if taken.rowcount != 1:
                raise OutOfStock(f"not enough {order.sku} in stock for {order.quantity}")
            sql.INSERT_RESERVATION(
                conn, order_id=order.id, sku=order.sku, quantity=order.quantity, at=time.time()
            )

    def release(self, order: OrderView) -> bool:
        """Return the order's reserved units to stock, once; False when nothing was held."""
        rs, rl, p = models.reservations, models.releases, models.products
        released = False
        # As in `reserve`: the unique order_id of releases lets only one racing call return the stock.
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            held = conn.execute(
                select(rs.c.sku, rs.c.quantity).where(rs.c.order_id == order.id)
            ).first()
            if held is None:
                return False
            if conn.execute(select(rl.c.id).where(rl.c.order_id == order.id)).first():
                return False
            conn.execute(
                insert(rl).values(order_id=order.id, sku=held.sku, quantity=held.quantity, at=time.time())
            )
            conn.execute(update(p).where(p.c.sku == held.sku).values(stock=p.c.stock + held.quantity))
            released = True
        return released
