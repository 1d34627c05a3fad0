"""The reconciler finds jobs no worker will ever run, on any Redis failfirst is pointed at."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from failfirst import config, connections, store
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.queueing import job_id, order_queue
from failfirst.reconciler import STUCK_GRACE, reconcile
from failfirst.states import State, load, transition


def test_job_left_in_rq_intermediate_list_by_a_killed_worker_is_enqueued_again(home: Path) -> None:
    settings = config.load()
    engine = store.open_store(settings.database_url)
    redis = connections.get_redis(settings)
    queue = order_queue(redis, settings.queue)
    gw = Gateway(settings, engine, redis)
    lost = gw.place(PlaceRequest("c1", "KB-101", 1, "lost")).order_id
    waiting = gw.place(PlaceRequest("c1", "KB-101", 1, "waiting")).order_id
    lost_job, waiting_job = job_id(lost, 0), job_id(waiting, 0)
    # What an RQ worker does first when it takes a job; SIGKILLed here, it never marks it started.
    assert redis.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT") == lost_job.encode()
    assert redis.hget(f"rq:job:{lost_job}", "status") == b"queued"

    now = time.time() + 2
    first = reconcile(engine, redis, queue, now=now)
    assert first.total == 0, "a job just taken may be about to start: only noted"
    later = reconcile(engine, redis, queue, now=now + STUCK_GRACE)
    assert later.total == 1 and lost in later.enqueued + later.redriven
    assert [j.decode() for j in redis.lrange(queue.key, 0, -1)] == [waiting_job, lost_job]
    assert redis.lrange(queue.intermediate_queue_key, 0, -1) == []


def test_order_settled_between_the_store_read_and_the_redis_read_is_not_enqueued_again(home: Path) -> None:
    settings = config.load()
    engine = store.open_store(settings.database_url)
    redis = connections.get_redis(settings)
    queue = order_queue(redis, settings.queue)
    # Placed while Redis was unreachable: an outbox row and no job, which the reconciler is for.
    order_id = Gateway(settings, engine, None).place(PlaceRequest("c1", "KB-101", 1, "raced")).order_id

    class WorkerFinishesMidPass:
        """The real client; a worker settles the order just after the pass read the store."""

        def __getattr__(self, name: str) -> Any:
            return getattr(redis, name)

        def pipeline(self, *args: Any, **kwargs: Any) -> Any:
            with engine.begin() as conn:
                order = load(conn, order_id)
                assert order is not None
                transition(conn, order, State.CANCELLED, "settled by a worker meanwhile")
            return redis.pipeline(*args, **kwargs)

    report = reconcile(engine, WorkerFinishesMidPass(), queue, now=time.time() + 2)  # type: ignore[arg-type]
    assert report.total == 0
    assert queue.count == 0
