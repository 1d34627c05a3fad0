"""One worker process: an RQ SimpleWorker plus a lease heartbeat.

SimpleWorker runs each job in this process instead of forking a child per job;
a fork per job costs more than the whole pipeline of a fault-free order. The
price is that a crashing job takes the worker with it, which the supervisor
answers by starting a new one, and the order's lease makes that safe.

The supervisor stops workers with signals, so RQ's command channel (a pub/sub
listener thread per worker) is not opened: stopping it waited up to a second
for that thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from failfirst.processes import exit_without_collecting

if TYPE_CHECKING:
    from rq.worker import SimpleWorker

    from failfirst.pipeline import Context

REDIS_WAIT = 5.0
READY_FD_ENV = "FAILFIRST_READY_FD"


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the supervisor dies, so no worker is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() == 1:
        sys.exit(0)


def _heartbeat(stop: threading.Event) -> None:
    from failfirst.pipeline import context, inflight, renew_lease

    ctx = context()
    period = max(ctx.settings.lease_seconds / 3, 0.05)
    while not stop.wait(period):
        current = inflight()
        if current is None:
            continue
        order_id, since = current
        if time.monotonic() - since < period:
            continue
        try:
            renew_lease(ctx, order_id)
        except Exception:
            logging.getLogger("failfirst.worker").exception("lease heartbeat failed")


def _connect(wait: float = REDIS_WAIT) -> Context:
    """The pipeline's context, once Redis answers.

    The supervisor spawns workers before it has started or pinged Redis, so that
    their imports overlap its own start-up; a worker that finds Redis not yet
    answering waits up to `wait` seconds instead of dying and being restarted.
    """
    from failfirst.errors import RedisUnavailable
    from failfirst.pipeline import context

    deadline = time.monotonic() + wait
    while True:
        try:
            return context()
        except RedisUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _report_ready() -> None:
    """Tell the supervisor that this worker's start-up is done (see `Supervisor.start`)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"1")
    except OSError:
        pass  # the supervisor stopped waiting (READY_WAIT) and closed its end
    finally:
        os.close(int(fd))


def rq_worker(ctx: Context, name: str | None) -> SimpleWorker:
    """The RQ worker for `ctx`, without a command channel, on connections that wait as long as its dequeue.

    RQ raises the client's socket timeout above its blocking dequeue's (minutes)
    by editing the pool's settings, which only connections made afterwards
    read. `_connect` has already made one with `get_redis`'s 5 s; an idle
    worker's BLPOP on it timed out every 5 s and RQ backed off (1, 2, 4 ...
    up to 60 s) before it looked at the queue again, so an order placed
    after a quiet minute could wait that long. The pool is emptied here so
    that every connection is made with RQ's timeout.
    """
    from rq.worker import SimpleWorker

    class Worker(SimpleWorker):
        def subscribe(self) -> None:
            """No command channel: see the module docstring."""

    worker = Worker([ctx.queue], connection=ctx.redis, name=name)
    ctx.redis.connection_pool.disconnect()
    ctx.redis.connection_pool.reset()
    return worker


def main() -> None:
    _die_with_parent()
    exit_without_collecting()
    ctx = _connect()
    name = sys.argv[1] if len(sys.argv) > 1 else None
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(stop,), daemon=True, name="lease-heartbeat").start()
    worker = rq_worker(ctx, name)
    _report_ready()
    level = os.environ.get("FAILFIRST_WORKER_LOG", "WARNING")
    try:
        worker.work(burst=False, with_scheduler=False, logging_level=level)
    finally:
        stop.set()


if __name__ == "__main__":
    main()
