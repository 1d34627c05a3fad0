"""The RQ side: job ids, enqueueing and scheduling of order jobs.

A job carries only the order id; the database says what the order needs next.
Job ids are derived from the order and its attempt number (`order-42-3`), so a
second enqueue of the same attempt collapses into the existing job instead of
running the order twice, and a retry never overwrites the job that scheduled it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis
    from rq import Queue

JOB_FUNC = "failfirst.pipeline.run_order"
JOB_TIMEOUT = 600


def job_id(order_id: int, attempt: int | str) -> str:
    return f"order-{order_id}-{attempt}"


def job_tag(attempts: int, replays: int = 0, comp_attempts: int = 0) -> str:
    """The part of a job id that changes whenever the order is owed a new delivery."""
    tag = str(attempts)
    if replays:
        tag += f"-r{replays}"
    if comp_attempts:
        tag += f"-c{comp_attempts}"
    return tag


def order_queue(redis: Redis, name: str) -> Queue:
    from rq import Queue

    return Queue(name, connection=redis)


def enqueue_order(
    queue: Queue, order_id: int, attempt: int | str, delay: float = 0.0, *, at_front: bool = False
) -> str:
    """Enqueue (or schedule after `delay` seconds) the job that drives `order_id`."""
    jid = job_id(order_id, attempt)
    options = {
        "job_id": jid,
        "result_ttl": 0,
        "failure_ttl": 3600,
        "job_timeout": JOB_TIMEOUT,
        "description": f"order {order_id} attempt {attempt}",
    }
    if delay > 0:
        queue.enqueue_in(timedelta(seconds=delay), JOB_FUNC, order_id, **options)
    else:
        # One round trip: RQ sends its queue-set SADD on its own otherwise.
        with queue.connection.pipeline() as pipe:
            queue.enqueue(JOB_FUNC, order_id, at_front=at_front, pipeline=pipe, **options)
            pipe.execute()
    return jid

