"""What `failfirst status` reports, as data: Redis, the database, counts."""

from __future__ import annotations

from typing import Any

from failfirst import config, store
from failfirst.errors import FailfirstError, RedisUnavailable


def redis_status(settings: config.Settings) -> dict[str, Any]:
    from failfirst.connections import describe_redis, get_redis
    from failfirst.embedded import EmbeddedRedis

    doc: dict[str, Any] = {
        "kind": "embedded" if settings.embedded_redis else "server",
        "where": describe_redis(settings),
        "queue": None,
    }
    if settings.embedded_redis:
        server = EmbeddedRedis(settings.home)
        stale = server.pidfile.exists() and server.pid() is None
        if not server.running():
            doc["state"] = "not running"
            if stale:
                server.stop()
                doc["note"] = "a stale pidfile/socket from a killed server was removed"
            else:
                doc["note"] = "`failfirst up` starts it; commands that need it start it on demand"
            return doc
        doc["pid"] = server.pid()
    try:
        client = get_redis(settings, start=False)
    except RedisUnavailable as exc:
        doc["state"] = exc.state
        doc["note"] = str(exc)
        return doc
    doc["state"] = "up"
    doc["queue"] = queue_counts(client, settings.queue)
    return doc


def queue_counts(client: Any, name: str) -> dict[str, Any]:
    from rq import Queue, Worker
    from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

    q = Queue(name, connection=client)
    return {
        "name": name,
        "queued": q.count,
        "scheduled": ScheduledJobRegistry(name, connection=client).count,
        "started": StartedJobRegistry(name, connection=client).count,
        "failed": FailedJobRegistry(name, connection=client).count,
        "workers": Worker.count(queue=q),
    }


def database_status(settings: config.Settings) -> dict[str, Any]:
    from sqlalchemy import func, select

    from failfirst import models

    doc: dict[str, Any] = {"url": store.describe(settings.database_url), "orders": None}
    path = store.sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        doc["state"] = "not created yet (created on first use)"
        return doc
    try:
        engine = store.open_store(settings.database_url, seed=False)
        o = models.orders
        with engine.connect() as conn:
            rows = conn.execute(select(o.c.state, func.count()).group_by(o.c.state)).all()
            dlq = conn.execute(
                select(func.count()).select_from(models.dlq).where(models.dlq.c.resolved_at.is_(None))
            ).scalar_one()
    except FailfirstError as exc:
        doc["state"] = f"unusable: {exc}"
        return doc
    doc["state"] = "ok"
    doc["orders"] = {state: count for state, count in sorted(rows)}
    doc["dlq"] = dlq
    return doc


def collect() -> dict[str, Any]:
    settings = config.load()
    return {"redis": redis_status(settings), "database": database_status(settings)}
