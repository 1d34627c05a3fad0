"""One worker process: an RQ SimpleWorker plus a lease heartbeat.

SimpleWorker runs each job in this process instead of forking a child per job;
a fork per job costs more than the whole pipeline of a fault-free order. The
price is that a crashing job takes the worker with it, which the supervisor
answers by starting a new one, and the order's lease makes that safe.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time


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


def main() -> None:
    _die_with_parent()
    from rq.worker import SimpleWorker

    from failfirst.pipeline import context

    ctx = context()
    name = sys.argv[1] if len(sys.argv) > 1 else None
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(stop,), daemon=True, name="lease-heartbeat").start()
    worker = SimpleWorker([ctx.queue], connection=ctx.redis, name=name)
    level = os.environ.get("FAILFIRST_WORKER_LOG", "WARNING")
    try:
        worker.work(burst=False, with_scheduler=False, logging_level=level)
    finally:
        stop.set()


if __name__ == "__main__":
    main()
