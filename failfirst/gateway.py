"""Order placement: validation, rate limit, idempotency, outbox, enqueue.

Idempotency follows Stripe's rules. A key is scoped to its customer and claimed
with a unique insert, so exactly one request owns it. The request body is
fingerprinted: the same key with the same body replays the stored answer and
creates nothing; with another body it is refused. While the owner works the key
is "in progress" under a lock that expires, so a request that crashed after
claiming does not hold the key forever. Only final answers are stored: a
failure before the order commits releases the claim.

The order row, its creation event, its outbox row and the key's final answer
commit in one transaction. Enqueueing comes after and may fail (Redis down):
the outbox row stays, and the reconciler enqueues the order later.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from failfirst import models, sql
from failfirst.config import Settings
from failfirst.errors import (
    IdempotencyConflict,
    RequestInProgress,
    ValidationError,
)
from failfirst.states import State

if TYPE_CHECKING:
    from redis import Redis

MAX_QUANTITY = 1000
MAX_KEY = 255
MAX_CUSTOMER = 100


@dataclass(frozen=True)
class PlaceRequest:
    customer: str
    sku: str
    quantity: int
    key: str | None = None

    def fingerprint(self) -> str:
        body = json.dumps([self.customer, self.sku, self.quantity], separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class PlaceResult:
    order_id: int
    state: str
    idempotency_key: str
    customer: str
    sku: str
    quantity: int
    amount_cents: int
    replayed: bool
    enqueued: bool

    def to_dict(self) -> dict[str, Any]:
        # Flat fields: a shallow copy, not asdict's recursive deep copy (placement's hot path).
        return dict(self.__dict__)


def validate(req: PlaceRequest) -> None:
    """Raise ValidationError for a request that can never succeed."""
    if not req.customer or not req.customer.strip():
        raise ValidationError("customer id is empty; pass --customer ID")
    if len(req.customer) > MAX_CUSTOMER or not req.customer.isprintable():
        raise ValidationError(
            f"customer id must be at most {MAX_CUSTOMER} printable characters"
        )
    if isinstance(req.quantity, bool) or not isinstance(req.quantity, int):
        raise ValidationError(f"quantity {req.quantity!r} is not an integer")
    if not 1 <= req.quantity <= MAX_QUANTITY:
        raise ValidationError(f"quantity {req.quantity} is out of range; use 1..{MAX_QUANTITY}")
    if req.key is not None:
        if not req.key:
            raise ValidationError("idempotency key is empty; omit --key to get a fresh one")
        if len(req.key) > MAX_KEY:
            raise ValidationError(
                f"idempotency key is {len(req.key)} characters long; the limit is {MAX_KEY}"
            )
        if not req.key.isprintable():
            raise ValidationError("idempotency key contains control characters; use printable text")


def parse_quantity(raw: str) -> int:
    """Parse a quantity typed by a person, with the same message as validation."""
    try:
        value = int(raw.strip())
    except (ValueError, AttributeError):
        raise ValidationError(f"quantity {raw!r} is not an integer; use 1..{MAX_QUANTITY}") from None
    if not 1 <= value <= MAX_QUANTITY:
        raise ValidationError(f"quantity {value} is out of range; use 1..{MAX_QUANTITY}")
    return value


class ClaimLost(Exception):
    """Our claim on a key expired and another request took it over; nothing was written."""


class Gateway:
    """Places orders against one store and one Redis. Safe to share across threads."""

    def __init__(self, settings: Settings, engine: Engine, redis: Redis | None) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self._bucket = None
        self._queue = None
        if redis is not None:
            from failfirst.queueing import order_queue
            from failfirst.ratelimit import TokenBucket

            self._bucket = TokenBucket(redis, settings.rate_per_second, settings.rate_burst)
            self._queue = order_queue(redis, settings.queue)
        self._prices: dict[str, int] = {}

    def price(self, sku: str) -> int:
        price = self._prices.get(sku)
        if price is None:
            with self.engine.connect() as conn:
                price = conn.execute(
                    select(models.products.c.price_cents).where(models.products.c.sku == sku)
                ).scalar()
            if price is None:
                raise ValidationError(f"unknown SKU {sku!r}; see `failfirst stock list`")
            self._prices[sku] = price
        return price

    def place(self, req: PlaceRequest, *, wait: float = 5.0) -> PlaceResult:
        """Place `req` (or replay it); see the module docstring for the rules."""
        validate(req)
        if self._bucket is not None:
            self._bucket.take(req.customer)
        price = self.price(req.sku)
        req = req if req.key is not None else PlaceRequest(
            req.customer, req.sku, req.quantity, uuid.uuid4().hex
        )
        if self.settings.breaks.idempotency:
            return self._place_unprotected(req, price)
        try:
            return self._enqueue(self._create_claimed(req, price))
        except IntegrityError:
            pass
        deadline = time.monotonic() + wait
        while True:
            lock, replay = self._claim(req)
            if replay is not None:
                return replay
            if lock is not None:
                try:
                    return self._enqueue(self._create(req, price, lock))
                except ClaimLost:
                    continue
                except BaseException:
                    self._release(req, lock)
                    raise
            if time.monotonic() >= deadline:
                raise RequestInProgress(
                    f"a request with key {req.key!r} is still in progress; retry shortly"
                )
            time.sleep(0.02)

    def _claim(self, req: PlaceRequest) -> tuple[float | None, PlaceResult | None]:
        """Try to own the key: (lock, None), (None, replayed answer) or (None, None) to wait.

        The lock is the claim's `locked_until`; it fences the claim, so a request
        whose lock expired and was taken over can no longer finish the key.
        """
        now = time.time()
        lock = now + self.settings.idempotency_lock
        k = models.idem_keys
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(k).values(
                        customer=req.customer,
                        key=req.key,
                        fingerprint=req.fingerprint(),
                        status="in_progress",
                        locked_until=lock,
                        expires_at=now + self.settings.idempotency_ttl,
                        created_at=now,
                    )
                )
            return lock, None
        except IntegrityError:
            pass
        with self.engine.begin() as conn:
            row = conn.execute(
                select(k).where(and_(k.c.customer == req.customer, k.c.key == req.key))
            ).first()
            if row is None:
                return None, None
            if row.expires_at <= now:
                conn.execute(
                    delete(k).where(
                        and_(k.c.customer == req.customer, k.c.key == req.key, k.c.expires_at <= now)
                    )
                )
                return None, None
            if row.fingerprint != req.fingerprint():
                raise IdempotencyConflict(
                    f"idempotency key {req.key!r} was already used by customer {req.customer!r} "
                    "with a different request; use a new key"
                )
            if row.status == "done":
                return None, PlaceResult(**{**json.loads(row.response), "replayed": True})
            if row.locked_until > now:
                return None, None
            taken = conn.execute(
                update(k)
                .where(
                    and_(
                        k.c.customer == req.customer,
                        k.c.key == req.key,
                        k.c.status == "in_progress",
                        k.c.locked_until == row.locked_until,
                    )
                )
                .values(locked_until=lock)
            )
        return (lock if taken.rowcount == 1 else None), None

    def _release(self, req: PlaceRequest, lock: float) -> None:
        """Give up our claim (only ours: a takeover's claim has another lock)."""
        k = models.idem_keys
        with self.engine.begin() as conn:
            conn.execute(
                delete(k).where(
                    and_(
                        k.c.customer == req.customer,
                        k.c.key == req.key,
                        k.c.status == "in_progress",
                        k.c.locked_until == lock,
                    )
                )
            )

    def _insert_order(self, conn: Connection, req: PlaceRequest, price: int, now: float) -> int:
        order_id = int(
            sql.INSERT_ORDER(
                conn,
                customer=req.customer,
                key=req.key,
                sku=req.sku,
                quantity=req.quantity,
                amount=price * req.quantity,
                state=State.CREATED.value,
                now=now,
            ).scalar_one()
        )
        sql.INSERT_EVENT(
            conn,
            order_id=order_id,
            from_state=None,
            to_state=State.CREATED.value,
            version=1,
            attempt=0,
            reason="placed",
            worker="gateway",
            at=now,
        )
        if not self.settings.breaks.outbox:
            sql.INSERT_OUTBOX(conn, order_id=order_id, now=now)
        return order_id

    def _result(self, req: PlaceRequest, price: int, order_id: int) -> PlaceResult:
        return PlaceResult(
            order_id=order_id,
            state=State.CREATED.value,
            idempotency_key=req.key or "",
            customer=req.customer,
            sku=req.sku,
            quantity=req.quantity,
            amount_cents=price * req.quantity,
            replayed=False,
            enqueued=False,
        )

    def _create_claimed(self, req: PlaceRequest, price: int) -> PlaceResult:
        """A key nobody has used: claim it and create the order in one transaction.

        The key row goes in last, already final, so a concurrent request with the
        same key fails on it and the whole attempt rolls back; the caller then
        takes the claim path and replays the winner's answer. Raises
        IntegrityError when the key exists.
        """
        now = time.time()
        with self.engine.begin() as conn:
            result = self._result(req, price, self._insert_order(conn, req, price, now))
            sql.INSERT_DONE_KEY(
                conn,
                customer=req.customer,
                key=req.key,
                fingerprint=req.fingerprint(),
                order_id=result.order_id,
                response=json.dumps(result.to_dict()),
                now=now,
                expires=now + self.settings.idempotency_ttl,
            )
        return result

    def _create(self, req: PlaceRequest, price: int, lock: float) -> PlaceResult:
        """Create the order for a key this request claimed on the slow path.

        The key is finished only if our claim still holds (same lock): when it
        expired and another request took it over, ClaimLost rolls our order back,
        so one key never ends with two orders.
        """
        now = time.time()
        with self.engine.begin() as conn:
            result = self._result(req, price, self._insert_order(conn, req, price, now))
            k = models.idem_keys
            done = conn.execute(
                update(k)
                .where(
                    and_(
                        k.c.customer == req.customer,
                        k.c.key == req.key,
                        k.c.status == "in_progress",
                        k.c.locked_until == lock,
                    )
                )
                .values(status="done", order_id=result.order_id, response=json.dumps(result.to_dict()))
            )
            if done.rowcount != 1:
                raise ClaimLost(req.key or "")
        return result

    def _place_unprotected(self, req: PlaceRequest, price: int) -> PlaceResult:
        """The naive check-then-insert of the original demo, kept only for `--break idempotency`."""
        o = models.orders
        with self.engine.connect() as conn:
            found = conn.execute(
                select(o.c.id, o.c.state).where(
                    and_(o.c.customer == req.customer, o.c.idempotency_key == req.key)
                )
            ).first()
        if found is not None:
            return PlaceResult(
                found.id, found.state, req.key or "", req.customer, req.sku,
                req.quantity, price * req.quantity, replayed=True, enqueued=False,
            )
        time.sleep(0.005)
        now = time.time()
        with self.engine.begin() as conn:
            order_id = self._insert_order(conn, req, price, now)
        return self._enqueue(
            PlaceResult(
                order_id, State.CREATED.value, req.key or "", req.customer, req.sku,
                req.quantity, price * req.quantity, replayed=False, enqueued=False,
            )
        )

    def _enqueue(self, result: PlaceResult) -> PlaceResult:
        if self._queue is None:
            return result
        from redis.exceptions import RedisError

        from failfirst.queueing import enqueue_order

        try:
            enqueue_order(self._queue, result.order_id, 0)
        except RedisError:
            return result
        return replace(result, enqueued=True)
