"""Opening the database: engines, pragmas, schema creation and version checks.

SQLite is the default and the hard case: several worker processes write to one
file. It runs in WAL mode (readers never block the writer) with a busy timeout,
and every write transaction starts with BEGIN IMMEDIATE so two writers queue on
the lock instead of deadlocking when both try to upgrade a read lock; writers
poll for that lock themselves (`_when_unlocked`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, func, insert, inspect, select
from sqlalchemy.exc import (
    DatabaseError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
)
from sqlmodel import SQLModel

from failfirst import models
from failfirst.errors import FailfirstError, StoreError

BUSY_TIMEOUT_MS = 30_000
LOCK_FIRST_PAUSE = 0.00005
LOCK_MAX_PAUSE = 0.002

DEFAULT_CATALOGUE: tuple[tuple[str, str, int, int], ...] = (
    ("KB-101", "Mechanical keyboard", 8900, 1000),
    ("MS-202", "Wireless mouse", 2900, 1000),
    ("MN-303", "27-inch monitor", 24900, 1000),
    ("HD-404", "Headset", 5900, 1000),
    ("CB-505", "USB-C cable", 990, 1000),
)

_engines: dict[tuple[str, bool], Engine] = {}
_ready: set[str] = set()
_lock = threading.Lock()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def with_schema(url: str, schema: str) -> str:
    """`url` with every connection's search_path set to `schema` (PostgreSQL).

    The schema goes into libpq's `options`, so worker processes that receive
    the URL through the environment land in the same schema without any code
    of their own; a `-c` given later overrides one already in the URL.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    options = parsed.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    setting = f"-csearch_path={schema}"
    new = parsed.update_query_dict({"options": f"{options} {setting}".strip()})
    return new.render_as_string(hide_password=False)


def create_schema(url: str, schema: str) -> None:
    """Create an empty PostgreSQL schema (a chaos run's or a test's private store)."""
    _admin(url, f'CREATE SCHEMA "{schema}"')


def drop_schema(url: str, schema: str) -> None:
    """Drop a schema made by `create_schema`, with everything in it."""
    _admin(url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _admin(url: str, statement: str) -> None:
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    except OperationalError as exc:
        raise StoreError(_explain(url, exc)) from None
    finally:
        engine.dispose()


def sqlite_path(url: str) -> Path | None:
    if not is_sqlite(url) or ":memory:" in url:
        return None
    raw = url.split("///", 1)[1] if "///" in url else ""
    return Path(raw.split("?", 1)[0]) if raw else None


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(
        url,
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=4,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.isolation_level = None
        # Processes opening a fresh file at once all switch it to WAL; SQLite
        # refuses all but one with SQLITE_BUSY without waiting (a deadlock
        # between lock upgrades), so this statement polls like BEGIN IMMEDIATE.
        _when_unlocked(dbapi_conn, "PRAGMA journal_mode=WAL")
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        # A write connection waits for the lock in `_when_unlocked`, not in SQLite.
        cur.execute(f"PRAGMA busy_timeout={0 if immediate else BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=OFF")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if immediate:
            _when_unlocked(conn.connection.dbapi_connection, "BEGIN IMMEDIATE")  # type: ignore[arg-type]
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def _when_unlocked(raw: sqlite3.Connection, sql: str) -> None:
    """Run `sql` once SQLite lets it, polling every 50 us to 2 ms until BUSY_TIMEOUT_MS passes.

    Used for BEGIN IMMEDIATE (SQLite's write lock) and for the switch to WAL.
    SQLite's own busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries, while
    a worker's transaction holds the lock for about 50 us: two workers that
    collided lost a millisecond or more each time, and under a burst one of them
    could wait most of a second while the other took the lock again and again.
    Every statement of a write connection runs inside a transaction begun here,
    so its busy timeout is 0 and this loop is the only wait.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = LOCK_FIRST_PAUSE
    while True:
        try:
            raw.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # any SQLITE_BUSY_* as well
            if not busy or time.monotonic() >= deadline:
                raise DBAPIError.instance(sql, (), exc, sqlite3.Error) from exc
        time.sleep(pause)
        pause = min(pause * 2, LOCK_MAX_PAUSE)


def get_engine(url: str, *, readonly: bool = False) -> Engine:
    """One engine per URL and mode per process, created on first use.

    `readonly` engines start deferred transactions, so watch and check never
    take SQLite's write lock away from the workers.
    """
    key = (url, readonly)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if is_sqlite(url):
                path = sqlite_path(url)
                if path is not None:
                    _ensure_dir(path.parent)
                engine = _sqlite_engine(url, immediate=not readonly)
            else:
                engine = create_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True)
            _engines[key] = engine
    return engine


def dispose(url: str) -> None:
    """Close this process's engines for one URL (a chaos run's store, once it is dropped)."""
    with _lock:
        for key in [k for k in _engines if k[0] == url]:
            _engines.pop(key).dispose()
        _ready.discard(url)


def dispose_all() -> None:
    """Close every pooled connection (before a fork, or when a test swaps stores)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _ready.clear()


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FailfirstError(
            f"cannot create data directory {path}: {exc.strerror or exc}; "
            "set FAILFIRST_HOME to a writable directory"
        ) from None
    if not os.access(path, os.W_OK):
        raise FailfirstError(
            f"data directory {path} is not writable; set FAILFIRST_HOME to a writable directory"
        )


def describe(url: str) -> str:
    """The URL with any password hidden, for messages and `status`."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_store(url: str, *, create: bool = True, seed: bool = True) -> Engine:
    """Return a write engine for `url` whose schema is present and of our version.

    The first call in a process creates the tables and seeds the catalogue when
    the database is empty, and refuses a database written by another schema
    version instead of guessing.
    """
    engine = get_engine(url)
    if url in _ready:
        return engine
    try:
        _prepare(engine, url, create=create, seed=seed)
    except FailfirstError:
        raise
    except OperationalError as exc:
        raise StoreError(_explain(url, exc)) from None
    except DatabaseError as exc:
        raise StoreError(
            f"database {describe(url)} is not a usable database ({_short(exc)}); "
            "move the file away or set FAILFIRST_DATABASE_URL"
        ) from None
    _ready.add(url)
    return engine


def _prepare(engine: Engine, url: str, *, create: bool, seed: bool) -> None:
    for attempt in range(3):
        try:
            names = set(inspect(engine).get_table_names())
            if "meta" not in names:
                if names & {"orders", "order_events"}:
                    raise StoreError(
                        f"database {describe(url)} has failfirst-like tables but no schema "
                        "version; it was not written by this failfirst. Use another "
                        "FAILFIRST_DATABASE_URL"
                    )
                if not create:
                    raise StoreError(
                        f"database {describe(url)} has no failfirst schema; "
                        "run `failfirst status` or place an order to create it"
                    )
                with engine.begin() as conn:
                    SQLModel.metadata.create_all(conn)
                    conn.execute(
                        insert(models.meta).values(
                            key="schema_version", value=str(models.SCHEMA_VERSION)
                        )
                    )
            _check_version(engine, url)
            if seed:
                seed_catalogue(engine)
            return
        except (IntegrityError, OperationalError, ProgrammingError) as exc:
            # Another process created the schema at the same moment (PostgreSQL
            # reports DuplicateTable as a ProgrammingError): look again.
            if "already exists" not in str(exc) and "UNIQUE" not in str(exc).upper():
                raise
            if attempt == 2:
                raise
            time.sleep(0.05 * (attempt + 1))


def _check_version(engine: Engine, url: str) -> None:
    with engine.connect() as conn:
        found = conn.execute(
            select(models.meta.c.value).where(models.meta.c.key == "schema_version")
        ).scalar()
    if found is None:
        raise StoreError(f"database {describe(url)} has no schema version; it is not failfirst's")
    if int(found) != models.SCHEMA_VERSION:
        newer = int(found) > models.SCHEMA_VERSION
        raise StoreError(
            f"database {describe(url)} has schema v{found}, this failfirst expects "
            f"v{models.SCHEMA_VERSION}; "
            + ("upgrade failfirst" if newer else "use a fresh FAILFIRST_DATABASE_URL")
        )


def seed_catalogue(engine: Engine, items: tuple[tuple[str, str, int, int], ...] = DEFAULT_CATALOGUE) -> None:
    with engine.begin() as conn:
        count = conn.execute(select(func.count()).select_from(models.products)).scalar_one()
        if count:
            return
        conn.execute(
            insert(models.products),
            [
                {"sku": s, "name": n, "price_cents": p, "stock": q, "baseline": q}
                for s, n, p, q in items
            ],
        )


def _short(exc: Exception) -> str:
    text = str(getattr(exc, "orig", exc)) or exc.__class__.__name__
    return text.splitlines()[0][:160]


def _explain(url: str, exc: OperationalError) -> str:
    text = _short(exc)
    if "locked" in text:
        return f"database {describe(url)} is locked by another process ({text}); retry shortly"
    if "unable to open" in text:
        return (
            f"cannot open database {describe(url)} ({text}); "
            "check FAILFIRST_HOME / FAILFIRST_DATABASE_URL"
        )
    return f"database {describe(url)} is unavailable ({text}); check FAILFIRST_DATABASE_URL"


def translate(url: str, exc: Exception) -> FailfirstError:
    """Turn a driver error met mid-command into the one-line error the user sees."""
    if isinstance(exc, OperationalError):
        return StoreError(_explain(url, exc))
    return StoreError(f"database {describe(url)} failed: {_short(exc)}")
