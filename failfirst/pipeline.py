"""The job: drive one order as far as it can go.

A job carries only an order id. It takes a lease on the order (so a duplicate
delivery or a second worker backs off), reads where the order stands, and moves
it on one state-machine transition at a time. Side effects go to the providers
under keys derived from the order, so resuming after a crash at any point
repeats no charge and no reservation: the provider answers with what it already
did. A worker that dies leaves a lease that expires; the reconciler hands the
order to another worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, insert, update
from sqlalchemy.exc import IntegrityError, OperationalError

from failfirst import models, sql
from failfirst.config import Settings
from failfirst.queueing import enqueue_order, job_tag, order_queue
from failfirst.retry import RetryPolicy
from failfirst.simulators import (
    InventoryProvider,
    PaymentProvider,
    ProviderError,
    RetryableError,
    charge_key,
    draw,
    identity,
)
from failfirst.states import SETTLED, OrderView, StaleVersion, State, load, transition

if TYPE_CHECKING:
    from redis import Redis
    from rq import Queue
    from sqlalchemy import Connection, Engine

CRASH_POINTS = ("after-dequeue", "after-charge", "after-reserve", "mid-compensation")


class LeaseLost(Exception):
    """Another worker owns the order now; this job stops without touching it."""


@dataclass
class Context:
    settings: Settings
    engine: Engine
    redis: Redis
    queue: Queue
    payment: PaymentProvider
    inventory: InventoryProvider
    policy: RetryPolicy
    worker: str


_context: Context | None = None


def build_context(settings: Settings, engine: Engine, redis: Redis) -> Context:
    return Context(
        settings=settings,
        engine=engine,
        redis=redis,
        queue=order_queue(redis, settings.queue),
        payment=PaymentProvider(engine, settings.faults),
        inventory=InventoryProvider(engine, settings.faults),
        policy=RetryPolicy(settings.retry),
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )


def set_context(ctx: Context | None) -> None:
    global _context
    _context = ctx


def context() -> Context:
    """The worker process's context, built from the environment on first use."""
    global _context
    if _context is None:
        from failfirst import config, store
        from failfirst.connections import get_redis

        settings = config.load()
        _context = build_context(
            settings, store.open_store(settings.database_url), get_redis(settings, start=False)
        )
    return _context


_inflight: dict[str, float] = {}


def inflight() -> tuple[int, float] | None:
    """The order this process is driving and since when, for the lease heartbeat."""
    snapshot = dict(_inflight)
    if "id" not in snapshot or "since" not in snapshot:
        return None
    return int(snapshot["id"]), snapshot["since"]


def run_order(order_id: int) -> str:
    """RQ entry point. Returns what happened, for RQ's logs."""
    _inflight.update(id=order_id, since=time.monotonic())
    try:
        return Driver(context(), order_id).run()
    finally:
        _inflight.clear()


def renew_lease(ctx: Context, order_id: int) -> bool:
    """Extend this worker's lease on an order that takes long (slow provider calls)."""
    o = models.orders
    with ctx.engine.begin() as conn:
        done = conn.execute(
            update(o)
            .where(and_(o.c.id == order_id, o.c.lease_owner == ctx.worker))
            .values(lease_until=time.time() + ctx.settings.lease_seconds)
        )
    return done.rowcount == 1


class Driver:
    def __init__(self, ctx: Context, order_id: int) -> None:
        self.ctx = ctx
        self.order_id = order_id
        self.breaks = ctx.settings.breaks

    def run(self) -> str:
        order = self.acquire()
        if order is None:
            return "skipped"
        self.crash_point("after-dequeue", order)
        try:
            return self.drive(order)
        except LeaseLost:
            return "lease-lost"
        except OperationalError:
            raise
        except Exception as exc:
            self.dead_letter_after_error(exc)
            return State.DEAD_LETTERED.value

    def acquire(self) -> OrderView | None:
        """Take the lease if the order needs work now and nobody else holds it.

        When the order is waiting for a payment attempt, the attempt starts in
        the same transaction: one commit fewer per order, on the path every
        order takes.
        """
        now = time.time()
        statement = sql.ACQUIRE_UNLOCKED if self.breaks.locking else sql.ACQUIRE
        with self.ctx.engine.begin() as conn:
            row = statement(
                conn,
                id=self.order_id,
                owner=self.ctx.worker,
                until=now + self.ctx.settings.lease_seconds,
                now=now,
                soon=now + 0.05,
            ).first()
            if row is None:
                return None
            order = OrderView.from_row(row)
            start = self.attempt_start(order)
            if start is None:
                return order
            try:
                return self._move(conn, order, State.PAYMENT_PENDING, **start)
            except StaleVersion:
                return order

    def attempt_start(self, order: OrderView) -> dict[str, Any] | None:
        """The PAYMENT_PENDING move that starts the next attempt, if that is what the order needs."""
        if order.cancel_reason or order.state not in (State.CREATED, State.PAYMENT_FAILED):
            return None
        if self.ctx.policy.exhausted(order.round_attempts):
            return None
        attempt = order.attempts + 1
        return {
            "reason": f"payment attempt {attempt}",
            "attempt": attempt,
            "changes": {
                "attempts": attempt,
                "round_attempts": order.round_attempts + 1,
                "next_attempt_at": None,
            },
        }

    def drive(self, order: OrderView) -> str:
        while order.state not in SETTLED:
            if order.cancel_reason:
                order = self.compensate(order)
            elif order.state in (State.CREATED, State.PAYMENT_FAILED):
                start = self.attempt_start(order)
                if start is None:
                    order = self.move(order, State.DEAD_LETTERED, "retries exhausted")
                else:
                    order = self.move(order, State.PAYMENT_PENDING, **start)
            elif order.state == State.PAYMENT_PENDING:
                order = self.pay(order)
            elif order.state == State.PAYMENT_SUCCESS:
                order = self.reserve(order)
            elif order.state == State.INVENTORY_RESERVED:
                order = self.move(order, State.COMPLETED, "paid and reserved")
            if order.lease_owner is None and order.state not in SETTLED:
                return "rescheduled"
        return order.state

    def move(
        self,
        order: OrderView,
        to: State,
        reason: str,
        *,
        attempt: int | None = None,
        changes: dict[str, Any] | None = None,
        then: tuple[State, str] | None = None,
    ) -> OrderView:
        """One transition under the lease (and `then` a second one in the same commit).

        A stale version reloads the order instead: someone else moved it.
        """
        try:
            with self.ctx.engine.begin() as conn:
                moved = self._move(conn, order, to, reason, attempt=attempt, changes=changes)
                if then is not None:
                    moved = self._move(conn, moved, *then)
            return moved
        except StaleVersion:
            return self.reload()

    def _move(
        self,
        conn: Connection,
        order: OrderView,
        to: State,
        reason: str,
        *,
        attempt: int | None = None,
        changes: dict[str, Any] | None = None,
    ) -> OrderView:
        values = {"lease_until": time.time() + self.ctx.settings.lease_seconds, **(changes or {})}
        moved = transition(
            conn,
            order,
            to,
            reason,
            worker=self.ctx.worker,
            attempt=attempt,
            changes=values,
            check_version=not self.breaks.locking,
            guard_compensation=not self.breaks.compensation,
        )
        if to in SETTLED:
            self._settle(conn, moved, order.state, reason)
        return moved

    def _settle(self, conn: Connection, order: OrderView, parked_from: str, reason: str) -> None:
        sql.DELETE_OUTBOX(conn, order_id=order.id)
        if order.state == State.DEAD_LETTERED:
            conn.execute(
                insert(models.dlq).values(
                    order_id=order.id,
                    parked_from=parked_from,
                    error=order.last_error or reason,
                    attempts=order.attempts,
                    created_at=time.time(),
                )
            )

    def reload(self) -> OrderView:
        with self.ctx.engine.connect() as conn:
            order = load(conn, self.order_id)
        if order is None:
            raise LeaseLost(f"order {self.order_id} vanished")
        if order.state not in SETTLED and order.lease_owner != self.ctx.worker and not self.breaks.locking:
            raise LeaseLost(f"order {self.order_id} is leased by {order.lease_owner}")
        return order

    def pay(self, order: OrderView) -> OrderView:
        ctx = self.ctx
        key = charge_key(order, per_attempt=self.breaks.payment_keys)
        step = f"pay:{order.attempts}"

        def attempt(n: int) -> int:
            call_key = f"{key}-call-{n}" if self.breaks.payment_keys else key
            return ctx.payment.charge(order, call_key, f"{step}:{n}")

        try:
            charge_id = ctx.policy.call(attempt)
        except RetryableError as exc:
            return self.payment_failed(order, exc)
        except ProviderError as exc:
            return self.mark_cancel(order, str(exc))
        self.crash_point("after-charge", order)
        return self.move(order, State.PAYMENT_SUCCESS, f"charged (charge {charge_id})")

    def payment_failed(self, order: OrderView, exc: ProviderError) -> OrderView:
        ctx = self.ctx
        if ctx.policy.exhausted(order.round_attempts):
            failed = self.move(order, State.PAYMENT_FAILED, str(exc), changes={"last_error": str(exc)})
            if failed.state != State.PAYMENT_FAILED:
                return failed
            return self.move(failed, State.DEAD_LETTERED, "retries exhausted")
        rng = draw(ctx.settings.faults.seed, identity(order), f"backoff:{order.attempts}")
        delay = ctx.policy.backoff(order.round_attempts, rng)
        failed = self.move(
            order,
            State.PAYMENT_FAILED,
            str(exc),
            changes={
                "last_error": str(exc),
                "next_attempt_at": time.time() + delay,
                "lease_owner": None,
                "lease_until": None,
            },
        )
        if failed.state == State.PAYMENT_FAILED and failed.lease_owner is None:
            self.schedule(failed, delay)
        return failed

    def schedule(self, order: OrderView, delay: float) -> None:
        """Ask RQ's scheduler for the next delivery; if Redis is down the reconciler will."""
        from redis.exceptions import RedisError

        tag = job_tag(order.attempts, order.replays, order.comp_attempts)
        with contextlib.suppress(RedisError):
            enqueue_order(self.ctx.queue, order.id, tag, delay)

    def reserve(self, order: OrderView) -> OrderView:
        ctx = self.ctx
        step = f"reserve:{order.attempts}"
        try:
            ctx.policy.call(lambda n: ctx.inventory.reserve(order, f"{step}:{n}"))
        except ProviderError as exc:
            return self.mark_cancel(order, str(exc))
        self.crash_point("after-reserve", order)
        return self.move(
            order, State.INVENTORY_RESERVED, "stock reserved", then=(State.COMPLETED, "paid and reserved")
        )

    def mark_cancel(self, order: OrderView, reason: str) -> OrderView:
        """Record that the order must be compensated and cancelled, before doing any of it."""
        o = models.orders
        cond: Any = o.c.id == order.id
        if not self.breaks.locking:
            cond = and_(cond, o.c.version == order.version)
        with self.ctx.engine.begin() as conn:
            done = conn.execute(update(o).where(cond).values(cancel_reason=reason, last_error=reason))
        if done.rowcount != 1:
            return self.reload()
        return replace(order, cancel_reason=reason, last_error=reason)

    def compensate(self, order: OrderView) -> OrderView:
        """Refund, release, then cancel; a failed refund is retried later, never skipped."""
        ctx = self.ctx
        reason = order.cancel_reason or "cancelled"
        if not self.breaks.compensation:
            step = f"refund:{order.attempts}:{order.comp_attempts}"
            try:
                ctx.policy.call(lambda n: ctx.payment.refund_all(order, f"{step}:{n}"))
            except RetryableError as exc:
                return self.retry_compensation(order, exc)
            self.crash_point("mid-compensation", order)
            ctx.inventory.release(order)
        return self.move(order, State.CANCELLED, reason)

    def retry_compensation(self, order: OrderView, exc: ProviderError) -> OrderView:
        ctx = self.ctx
        o = models.orders
        comp = order.comp_attempts + 1
        rng = draw(ctx.settings.faults.seed, identity(order), f"comp-backoff:{comp}")
        delay = ctx.policy.backoff(comp, rng)
        values = {
            "comp_attempts": comp,
            "last_error": f"refund failed, will retry: {exc}",
            "next_attempt_at": time.time() + delay,
            "lease_owner": None,
            "lease_until": None,
        }
        with ctx.engine.begin() as conn:
            done = conn.execute(
                update(o).where(and_(o.c.id == order.id, o.c.version == order.version)).values(**values)
            )
        if done.rowcount != 1:
            return self.reload()
        order = replace(order, **values)
        self.schedule(order, delay)
        return order

    def dead_letter_after_error(self, exc: Exception) -> None:
        """Park the order in the DLQ with the error, unless it settled meanwhile."""
        error = f"unexpected {exc.__class__.__name__}: {exc}"[:500]
        with self.ctx.engine.begin() as conn:
            order = load(conn, self.order_id)
            if order is None or order.state in SETTLED:
                return
            moved = transition(
                conn,
                order,
                State.DEAD_LETTERED,
                error,
                worker=self.ctx.worker,
                changes={"last_error": error},
                check_version=not self.breaks.locking,
            )
            self._settle(conn, moved, order.state, error)

    def crash_point(self, point: str, order: OrderView) -> None:
        """SIGKILL this worker here, once per order, for the seeded share the lab asked for."""
        s = self.ctx.settings
        if point not in s.crash_at:
            return
        if draw(s.faults.seed, identity(order), f"crash:{point}").random() >= s.crash_rate:
            return
        try:
            with self.ctx.engine.begin() as conn:
                conn.execute(
                    insert(models.faults).values(
                        order_id=order.id, kind=f"crash:{point}", detail=self.ctx.worker, at=time.time()
                    )
                )
        except IntegrityError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
