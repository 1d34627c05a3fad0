"""What `failfirst watch` shows, as data: one frame of the lab, read in one go.

`take` runs every query a frame needs. It has to stay cheap at 100 000 orders
and 600 000 events, so each query is an aggregate over an index or reads only
the newest rows:

- orders per state: GROUP BY over `ix_orders_state` (a covering index scan);
- latest transitions: the last rows of `order_events` by primary key;
- open DLQ entries: a count over `ix_dlq_open` and the last few rows in that
  index's order (highest order id first, the newest orders, with no sort);
- throughput and settlement latency: the orders `ix_orders_settled_at` finds
  in the last minute, nothing older (settled_at is set only while an order is
  settled: a replay clears it).

The database is read on the read-only engine (a deferred BEGIN under WAL), so a
frame never takes the workers' write lock and a writer holding it never stalls
a frame. Should a read still meet a lock, the connection's busy timeout is cut
to half a second for the frame, so it costs a moment rather than the 30 s a
worker would wait (only a process's first connection waits out the store's own
timeout, while it opens the file in WAL mode).
Redis and the database fail independently: a frame records the error of the
side that failed and still carries the other side.

`Source` and `resolve` say where to look: the user's own store or a chaos run's
directory, whose database and Redis are found the way the chaos runner lays
them out. Watching never starts a Redis server; it only connects.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, func, select
from sqlalchemy.exc import DBAPIError

from failfirst import config, models, store
from failfirst.errors import NotFound, RedisUnavailable
from failfirst.states import ALL_STATES, SETTLED

if TYPE_CHECKING:
    from redis import Redis

FEED_ROWS = 20
DLQ_ROWS = 10
WORKER_ROWS = 16
WINDOW_S = 60.0
BUSY_TIMEOUT_MS = 500
_SETTLED = sorted(s.value for s in SETTLED)


@dataclass(frozen=True)
class TransitionRow:
    """One event of the audit log, as the feed shows it."""

    order_id: int
    from_state: str | None
    to_state: str
    attempt: int
    reason: str
    worker: str
    at: float


@dataclass(frozen=True)
class DlqRow:
    """One open dead letter: where the order stopped and why."""

    order_id: int
    parked_from: str
    error: str
    attempts: int
    created_at: float


@dataclass(frozen=True)
class WorkerRow:
    """One registered RQ worker and the order it is driving, if any."""

    name: str
    state: str
    job_id: str | None
    order_id: int | None
    order_state: str | None


@dataclass(frozen=True)
class Snapshot:
    """One frame. Counts of a side that could not be read are None, with that side's error."""

    taken_at: float
    elapsed_ms: float
    database: str
    database_error: str | None
    database_as_of: float | None
    states: dict[str, int]
    transitions: list[TransitionRow]
    dlq_open: int
    dlq: list[DlqRow]
    window_s: float
    settled_in_window: int
    p50_ms: float | None
    p99_ms: float | None
    redis: str
    redis_error: str | None
    queue: str
    queued: int | None = None
    scheduled: int | None = None
    started: int | None = None
    failed: int | None = None
    workers: list[WorkerRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.states.values())

    @property
    def settled(self) -> int:
        return sum(n for s, n in self.states.items() if s in _SETTLED)

    @property
    def throughput(self) -> float:
        """Settled orders per second over the window (the last minute, or less on a young store)."""
        return self.settled_in_window / self.window_s if self.window_s > 0 else 0.0

    @property
    def redis_up(self) -> bool:
        return self.redis_error is None

    def with_database_of(self, older: Snapshot) -> Snapshot:
        """This frame with `older`'s database side: a busy database shows its last good frame.

        The error stays set, so the view can say the numbers are stale and since when.
        """
        return replace(
            self,
            database_as_of=older.database_as_of,
            states=older.states,
            transitions=older.transitions,
            dlq_open=older.dlq_open,
            dlq=older.dlq,
            window_s=older.window_s,
            settled_in_window=older.settled_in_window,
            p50_ms=older.p50_ms,
            p99_ms=older.p99_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        """The frame as plain JSON types; ages are relative to `taken_at`."""
        now = self.taken_at
        return {
            "taken_at": self.taken_at,
            "elapsed_ms": round(self.elapsed_ms, 2),
            "database": {
                "url": self.database,
                "ok": self.database_error is None,
                "error": self.database_error,
                "as_of": self.database_as_of,
            },
            "orders": {"total": self.total, "settled": self.settled, "by_state": dict(self.states)},
            "transitions": [
                {
                    "order_id": t.order_id, "from": t.from_state, "to": t.to_state, "attempt": t.attempt,
                    "reason": t.reason, "worker": t.worker, "at": t.at, "age_s": round(now - t.at, 3),
                }
                for t in self.transitions
            ],
            "dlq": {
                "open": self.dlq_open,
                "entries": [
                    {
                        "order_id": d.order_id, "parked_from": d.parked_from, "error": d.error,
                        "attempts": d.attempts, "age_s": round(now - d.created_at, 3),
                    }
                    for d in self.dlq
                ],
            },
            "throughput": {
                "window_s": round(self.window_s, 3),
                "settled": self.settled_in_window,
                "per_s": round(self.throughput, 2),
                "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms,
            },
            "redis": {
                "where": self.redis,
                "up": self.redis_up,
                "error": self.redis_error,
                "queue": self.queue,
                "queued": self.queued,
                "scheduled": self.scheduled,
                "started": self.started,
                "failed": self.failed,
                "workers": [
                    {"name": w.name, "state": w.state, "job": w.job_id, "order_id": w.order_id,
                     "order_state": w.order_state}
                    for w in self.workers
                ],
            },
        }


# ---------------------------------------------------------------- taking a frame


def take(engine: Engine, redis: Redis | None, *, queue_name: str, now: float | None = None) -> Snapshot:
    """Read one frame: Redis first (to learn which orders workers hold), then the database.

    Never raises for an unreachable Redis or a busy or missing database; the
    failing side's error is in the snapshot instead.
    """
    started = time.perf_counter()
    now = time.time() if now is None else now
    rq_side = _redis_side(redis, queue_name)
    url = engine.url.render_as_string(hide_password=False)
    db: dict[str, Any] = {
        "states": {s.value: 0 for s in ALL_STATES}, "transitions": [], "dlq_open": 0, "dlq": [],
        "window_s": 0.0, "settled_in_window": 0, "p50_ms": None, "p99_ms": None,
    }
    error: str | None = None
    holding = {w.order_id for w in rq_side["workers"] if w.order_id is not None}
    order_states: dict[int, str] = {}
    path = store.sqlite_path(url)
    if path is not None and not path.exists():
        error = f"no database yet at {path}"
    else:
        try:
            with _reading(_reader(engine, url)) as conn:
                db.update(_database_side(conn, now))
                order_states = _order_states(conn, holding)
        except DBAPIError as exc:
            error = _short(exc)
    workers = [
        replace(w, order_state=order_states.get(w.order_id)) if w.order_id is not None else w
        for w in rq_side.pop("workers")
    ]
    return Snapshot(
        taken_at=now,
        elapsed_ms=(time.perf_counter() - started) * 1000,
        database=store.describe(url),
        database_error=error,
        database_as_of=None if error else now,
        redis=_describe_client(redis),
        queue=queue_name,
        workers=workers,
        **db,
        **rq_side,
    )


def _reader(engine: Engine, url: str) -> Engine:
    """The read-only twin of a SQLite file engine; other databases read on the engine given."""
    if store.is_sqlite(url) and store.sqlite_path(url) is not None:
        return store.get_engine(url, readonly=True)
    return engine


@contextlib.contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """One read transaction; on SQLite with a short busy timeout while it lasts.

    The pooled connection gets the store's usual timeout back afterwards. The
    pragmas go through the driver connection: on the SQLAlchemy connection they
    would open the transaction before `begin` does.
    """
    with engine.connect() as conn:
        raw = conn.connection.driver_connection if conn.dialect.name == "sqlite" else None
        if raw is not None:
            raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            with conn.begin():
                yield conn
        finally:
            if raw is not None:
                with contextlib.suppress(sqlite3.Error):
                    raw.execute(f"PRAGMA busy_timeout={store.BUSY_TIMEOUT_MS}")


def _database_side(conn: Connection, now: float) -> dict[str, Any]:
    o, e, d = models.orders, models.events, models.dlq
    states = {s.value: 0 for s in ALL_STATES}
    for state, count in conn.execute(select(o.c.state, func.count()).group_by(o.c.state)):
        states[state] = count
    transitions = [
        TransitionRow(r.order_id, r.from_state, r.to_state, r.attempt, r.reason, r.worker, r.at)
        for r in conn.execute(
            select(e.c.order_id, e.c.from_state, e.c.to_state, e.c.attempt, e.c.reason, e.c.worker, e.c.at)
            .order_by(e.c.id.desc())
            .limit(FEED_ROWS)
        )
    ]
    is_open = d.c.resolved_at.is_(None)
    dlq_open = conn.execute(select(func.count()).select_from(d).where(is_open)).scalar_one()
    dlq = [
        DlqRow(r.order_id, r.parked_from, r.error, r.attempts, r.created_at)
        for r in conn.execute(
            select(d.c.order_id, d.c.parked_from, d.c.error, d.c.attempts, d.c.created_at)
            .where(is_open)
            .order_by(d.c.order_id.desc())
            .limit(DLQ_ROWS)
        )
    ]
    # The window is the last minute, or the store's whole life when that is shorter,
    # so a lab that started ten seconds ago does not show a sixth of its rate.
    first = conn.execute(select(o.c.created_at).order_by(o.c.id).limit(1)).scalar()
    window = WINDOW_S if first is None else max(min(WINDOW_S, now - first), 1e-3)
    latencies = sorted(
        (r[0] * 1000 for r in conn.execute(
            select(o.c.settled_at - o.c.created_at).where(
                and_(o.c.settled_at > now - window, o.c.settled_at <= now)
            )
        )),
    )
    return {
        "states": states,
        "transitions": transitions,
        "dlq_open": dlq_open,
        "dlq": dlq,
        "window_s": window,
        "settled_in_window": len(latencies),
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
    }


def _order_states(conn: Connection, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    o = models.orders
    return dict(conn.execute(select(o.c.id, o.c.state).where(o.c.id.in_(sorted(ids)))).all())


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list: a latency that was actually observed."""
    if not ordered:
        return None
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return round(ordered[rank - 1], 1)


def _redis_side(redis: Redis | None, queue_name: str) -> dict[str, Any]:
    """RQ's counts and workers; on any Redis error, only the error."""
    if redis is None:
        return {"redis_error": "not connected", "workers": []}
    from redis.exceptions import RedisError
    from rq import Queue, Worker
    from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

    try:
        queue = Queue(queue_name, connection=redis)
        # Counting without cleanup: a watcher must not move jobs between registries.
        counts = {
            "queued": queue.count,
            "scheduled": ScheduledJobRegistry(queue_name, connection=redis).get_job_count(cleanup=False),
            "started": StartedJobRegistry(queue_name, connection=redis).get_job_count(cleanup=False),
            "failed": FailedJobRegistry(queue_name, connection=redis).get_job_count(cleanup=False),
        }
        workers = []
        for w in sorted(Worker.all(queue=queue), key=lambda w: w.name)[:WORKER_ROWS]:
            state = str(w.state)
            # The worker's hash can still name its last job after it went idle: trust the state.
            job = w.get_current_job_id() if state == "busy" else None
            job = job.decode() if isinstance(job, bytes) else job
            workers.append(WorkerRow(w.name, state, job, _job_order(job), None))
    except (RedisError, OSError) as exc:
        return {"redis_error": _short(exc), "workers": []}
    return {"redis_error": None, "workers": workers, **counts}


def _job_order(job_id: str | None) -> int | None:
    """The order a job drives: job ids are `order-<id>-<attempt tag>` (see failfirst.queueing)."""
    if not job_id or not job_id.startswith("order-"):
        return None
    head = job_id.split("-")[1]
    return int(head) if head.isdigit() else None


def _describe_client(redis: Redis | None) -> str:
    if redis is None:
        return "-"
    kw = redis.connection_pool.connection_kwargs
    if kw.get("path"):
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)} db {kw.get('db', 0)}"


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc) or exc.__class__.__name__
    return text.splitlines()[0][:160]


# ---------------------------------------------------------------- what to watch


@dataclass(frozen=True)
class Source:
    """Where a watch looks: a label for the header, a database URL, a Redis URL and a queue."""

    label: str
    database_url: str
    redis_url: str
    queue: str

    def connect(self) -> tuple[Engine, Redis]:
        """An engine and a Redis client; neither connects yet, and no server is started.

        The client fails fast (short timeouts, no retries): a frame during an
        outage should say "down" at once, not after redis-py's backoff.
        """
        from redis import Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            client = Redis.from_url(
                self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
            )
        except ValueError as exc:
            raise RedisUnavailable(f"REDIS_URL {self.redis_url!r} is not a Redis URL ({exc})") from None
        return store.get_engine(self.database_url, readonly=True), client


def resolve(run: str | None, settings: config.Settings | None = None) -> Source:
    """The user's own store when `run` is None; else the chaos run it names ("latest": the newest)."""
    from failfirst.connections import redis_url

    settings = settings or config.load()
    if run is None:
        return Source(
            f"store {store.describe(settings.database_url)}",
            settings.database_url,
            redis_url(settings, start=False),
            settings.queue,
        )
    path = find_run(settings.home / "runs", run)
    # The runner writes final-states.json as it ends, just before it stops the run's Redis.
    label = f"run {path.name}" + (" (finished)" if (path / "final-states.json").exists() else "")
    return Source(label, run_database_url(settings, path), run_redis_url(settings, path), settings.queue)


def find_run(runs: Path, name: str) -> Path:
    """A run directory by name, path or unique prefix; "latest" is the newest.

    Run directories are named `<YYYYmmdd-HHMMSS>-<scenario>-<seed>-<token>`, so
    the name orders them by start time; the modification time breaks ties
    within one second.
    """
    candidate = Path(name).expanduser()
    if candidate.is_dir() and (candidate.parent == runs or (candidate / "run.db").exists()):
        return candidate.absolute()
    found = sorted(
        (p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else [],
        key=lambda p: (p.name[:15], p.stat().st_mtime),
    )
    if not found:
        raise NotFound(f"no chaos runs under {runs}; start one with `failfirst chaos run`")
    if name == "latest":
        return found[-1]
    matches = [p for p in found if p.name == name] or [p for p in found if p.name.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    recent = ", ".join(p.name for p in found[-3:])
    if matches:
        raise NotFound(
            f"{len(matches)} chaos runs start with {name!r}; give more of the name (latest: {recent})"
        )
    raise NotFound(
        f"no chaos run named {name!r} under {runs} (latest: {recent}); `--run latest` takes the newest"
    )


def run_database_url(settings: config.Settings, run_dir: Path) -> str:
    """The run's store, as `failfirst.chaos.runner.ChaosRun` chooses it.

    On PostgreSQL a run's store is the schema `run_schema` names (dropped when
    the run ends); otherwise it is `run.db` in the run directory.
    """
    if store.is_postgres(settings.database_url):
        from failfirst.chaos.runner import run_schema

        return store.with_schema(settings.database_url, run_schema(run_dir))
    return f"sqlite:///{run_dir / 'run.db'}"


def run_redis_url(settings: config.Settings, run_dir: Path) -> str:
    """The run's Redis: the REDIS_URL server when one is set, else the run's own embedded server."""
    from failfirst.embedded import EmbeddedRedis

    return settings.redis_url or EmbeddedRedis(run_dir).url
