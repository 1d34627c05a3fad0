"""The reconciler: the database is the truth, the queue only wakes workers.

One pass finds orders that are owed work (they have an outbox row) but that no
live job will deliver: never enqueued (Redis was down at placement), lost
(Redis restarted empty, FLUSHDB), held by a worker that died (its lease
expired), or a retry whose scheduled job vanished. It enqueues each again under
its current job id, so a pass that races another reconciler collapses into one
job, and a duplicate delivery is refused by the lease anyway. A retry still
"scheduled" in RQ after its due time is enqueued directly: after a Redis restart
the scheduler lock of the previous scheduler can hold for a minute.

A job marked "queued" is not always waiting: RQ workers move a job from the
queue to an intermediate list before marking it started, and a worker killed
between the two leaves it there, still "queued", until RQ's own clean-up a
minute or more later. A queued job that is not in the queue list is noted in
Redis the first time a pass sees it (so every reconciler, on any host, shares
the note); seen again after STUCK_GRACE it is taken as lost and enqueued anew.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING

from sqlalchemy import and_, or_, select

from failfirst import models
from failfirst.queueing import enqueue_order, job_id, job_tag
from failfirst.states import SETTLED

if TYPE_CHECKING:
    from redis import Redis
    from rq import Queue
    from sqlalchemy import Engine

NEW_ORDER_GRACE = 1.0
RETRY_GRACE = 1.0
BATCH = 500
STUCK_GRACE = 2.0
STUCK_NOTE = "failfirst:stuck:{}"


@dataclass
class ReconcileReport:
    enqueued: list[int] = field(default_factory=list)
    redriven: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.enqueued) + len(self.redriven)


def reconcile(engine: Engine, redis: Redis, queue: Queue, now: float | None = None) -> ReconcileReport:
    """One pass; returns which orders it enqueued (never had a job) or re-drove (lost one)."""
    now = time.time() if now is None else now
    o, ob = models.orders, models.outbox
    owed = and_(
        o.c.state.notin_([s.value for s in SETTLED]),
        or_(o.c.lease_until.is_(None), o.c.lease_until < now),
        or_(o.c.next_attempt_at.is_(None), o.c.next_attempt_at < now - RETRY_GRACE),
        ob.c.created_at < now - NEW_ORDER_GRACE,
    )
    stmt = (
        select(
            o.c.id, o.c.attempts, o.c.replays, o.c.comp_attempts, o.c.lease_owner,
            o.c.lease_until, o.c.next_attempt_at, ob.c.created_at,
        )
        .select_from(ob.join(o, o.c.id == ob.c.order_id))
        .where(owed)
        .order_by(ob.c.order_id)
        .limit(BATCH)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    report = ReconcileReport()
    if not rows:
        return report
    tags = [job_tag(r.attempts, r.replays, r.comp_attempts) for r in rows]
    with redis.pipeline(transaction=False) as pipe:
        for row, tag in zip(rows, tags, strict=True):
            pipe.hmget(f"rq:job:{job_id(row.id, tag)}", "status", "started_at")
        states = pipe.execute()
    queued = [job_id(r.id, t) for r, t, (s, _) in zip(rows, tags, states, strict=True) if s == b"queued"]
    stuck = _stuck_jobs(redis, queue, queued, now)
    lost = []
    for row, tag, (status, _started) in zip(rows, tags, states, strict=True):
        if status == b"deferred" or (status == b"queued" and job_id(row.id, tag) not in stuck):
            continue
        if status == b"scheduled" and row.next_attempt_at is None:
            continue
        if (
            status == b"started"
            and row.lease_owner is None
            and row.lease_until is None
            and _started_recently(_started, now)
        ):
            continue
        lost.append((row, tag, status))
    if not lost:
        return report
    # A job that finished between our read of the order and our look at Redis is
    # gone from Redis too (result_ttl 0): read the candidates again, so an order
    # settled or leased meanwhile is not enqueued a second time.
    with engine.connect() as conn:
        still = set(
            conn.execute(
                select(o.c.id)
                .select_from(ob.join(o, o.c.id == ob.c.order_id))
                .where(and_(owed, o.c.id.in_([row.id for row, _, _ in lost])))
            ).scalars()
        )
    for row, tag, status in lost:
        if row.id not in still:
            continue
        enqueue_order(queue, row.id, tag)
        (report.redriven if row.lease_owner or status else report.enqueued).append(row.id)
    return report


def _stuck_jobs(redis: Redis, queue: Queue, queued: list[str], now: float) -> set[str]:
    """The jobs among `queued` (status "queued") that no worker will ever pop; see the module docstring."""
    if not queued:
        return set()
    waiting = {raw.decode() for raw in redis.lrange(queue.key, 0, -1)}
    suspects = [jid for jid in queued if jid not in waiting]
    if not suspects:
        return set()
    with redis.pipeline(transaction=False) as pipe:
        for jid in suspects:
            pipe.set(STUCK_NOTE.format(jid), now, nx=True, ex=60)
            pipe.get(STUCK_NOTE.format(jid))
        notes = pipe.execute()[1::2]
    stuck = {jid for jid, seen in zip(suspects, notes, strict=True) if seen and now - float(seen) >= STUCK_GRACE}
    if stuck:
        with redis.pipeline(transaction=False) as pipe:
            for jid in stuck:
                pipe.lrem(queue.intermediate_queue_key, 0, jid)
                pipe.delete(STUCK_NOTE.format(jid))
            pipe.execute()
    return stuck


def _started_recently(started_at: bytes | None, now: float, window: float = 5.0) -> bool:
    if not started_at:
        return False
    from datetime import datetime

    text = started_at.decode().rstrip("Z")
    try:
        when = datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return False
    return now - when < window
