"""The reconciler finds jobs no worker will ever run, on any Redis failfirst is pointed at."""

from __future__ import annotations

import time
from pathlib import Path

from failfirst import config, connections, store
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.queueing import job_id, order_queue
from failfirst.reconciler import STUCK_GRACE, reconcile


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
