"""`failfirst worker`: N RQ worker processes, kept alive, plus scheduler and reconciler.

The supervisor owns three loops besides the workers themselves:
- a monitor that replaces any worker process that dies, within a tick;
- RQ's scheduler, run here (not inside a worker) so that killing workers never
  takes delayed retries down with them, polling every `scheduler_interval`;
- the reconciler, every `reconcile_interval`, which re-drives orders whose
  worker died and enqueues orders the queue lost, and strikes this machine's
  dead workers from RQ's registry (see `prune_dead_workers`).
The supervisor touches only the database and Redis, so supervisors on several
hosts can share one store and one Redis. It imports the database layer only
once its workers are set up (see `start`), so that their start-up is not slowed
by its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from failfirst.config import Settings, settings_env
from failfirst.processes import running, terminate
from failfirst.workerproc import READY_FD_ENV

if TYPE_CHECKING:
    from redis import Redis
    from rq.worker import Worker

log = logging.getLogger("failfirst.supervisor")

READY_WAIT = 5.0


def _unregister(redis: Redis, worker: Worker) -> None:
    from rq.worker_registration import unregister

    unregister(worker)
    redis.delete(worker.key)


def prune_dead_workers(redis: Redis) -> None:
    """Strike from RQ's registry the workers of this machine whose process is gone.

    A supervisor forgets the workers it sees die (`Supervisor._forget`), but
    when it dies with them (a host's whole process group killed) nobody does,
    and their entries stay listed, some "busy", until their key expires (RQ's
    worker TTL, minutes). Any supervisor on the same machine can tell from
    their PIDs that they are dead; supervisors elsewhere cannot and leave them
    alone. A hostname is taken to name one machine (one PID namespace).
    """
    from rq.worker import Worker

    here = socket.gethostname()
    for worker in Worker.all(connection=redis):
        if worker.hostname == here and worker.pid and not running(worker.pid):
            _unregister(redis, worker)


def _await_ready(fds: list[int], timeout: float) -> None:
    """Wait until each pipe in `fds` has a byte or is closed (its worker died), then close them all."""
    deadline = time.monotonic() + timeout
    waiting = list(fds)
    try:
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select(waiting, [], [], left)
            for fd in readable:
                os.read(fd, 1)
                waiting.remove(fd)
    finally:
        for fd in fds:
            os.close(fd)


@dataclass
class WorkerEvent:
    at: float
    kind: str
    pid: int
    detail: str = ""


@dataclass
class Supervisor:
    settings: Settings
    count: int = 2
    burst: bool = False
    on_event: Callable[[WorkerEvent], None] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # False when the caller owns Redis: a chaos run stops it on purpose, and
    # starting it again here would cut a scheduled outage short.
    start_redis: bool = True

    def __post_init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.events: list[WorkerEvent] = []
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._names: dict[int, str] = {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("REDIS_URL", None)
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        return env

    def _spawn(self, ready: list[int] | None = None) -> subprocess.Popen[bytes]:
        """Start one worker; with `ready`, append the read end of a pipe it writes to once set up."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        # Named by us, so a worker that dies can be struck from RQ's registry (see `_forget`).
        name = f"{socket.gethostname()}.{uuid.uuid4().hex[:12]}"
        env, fds = self._env(), ()
        if ready is not None:
            read_end, write_end = os.pipe()
            ready.append(read_end)
            env[READY_FD_ENV] = str(write_end)
            fds = (write_end,)
        try:
            with open(self.settings.home / "worker.log", "ab") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "failfirst.workerproc", name],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=fds,
                )
        finally:
            for fd in fds:
                os.close(fd)
        self._names[proc.pid] = name
        self._emit("started", proc.pid)
        return proc

    def _forget(self, pid: int) -> None:
        """Remove a dead worker from RQ's worker registry.

        A SIGKILLed RQ worker cannot unregister itself, and its entry (still
        "busy") would be listed by `failfirst watch` and `rq info` until its key
        expires minutes later. The job it held is not touched: the order's lease
        and the reconciler take care of that.
        """
        name = self._names.pop(pid, None)
        if name is None:
            return
        from redis.exceptions import RedisError
        from rq.worker import Worker

        from failfirst.connections import get_redis
        from failfirst.errors import RedisUnavailable

        with contextlib.suppress(RedisError, OSError, RedisUnavailable):
            redis = get_redis(self.settings, start=False, check=False)
            worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=redis)
            if worker is not None:
                _unregister(redis, worker)

    def _emit(self, kind: str, pid: int, detail: str = "") -> None:
        event = WorkerEvent(time.time(), kind, pid, detail)
        with self._lock:
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self.procs if p.poll() is None]

    def start(self) -> None:
        """Spawn the workers, start or ping Redis, and open the store once the workers are set up.

        Workers spend most of their start-up importing. Our own imports of the
        database layer would take CPU from theirs, so they wait until every
        worker has reported ready (or died, or READY_WAIT passed); Redis cannot
        wait, since the workers wait for it.
        """
        ready: list[int] = []
        try:
            with self._lock:
                for _ in range(self.count):
                    self.procs.append(self._spawn(ready))
            if self.start_redis:
                from failfirst.connections import get_redis

                get_redis(self.settings)
        except BaseException:
            for fd in ready:
                os.close(fd)
            self.stop()
            raise
        try:
            _await_ready(ready, READY_WAIT)
            from failfirst import store

            store.open_store(self.settings.database_url)
        except BaseException:
            self.stop()
            raise
        for target, name in (
            (self._monitor, "monitor"),
            (self._schedule, "scheduler"),
            (self._reconcile, "reconciler"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _monitor(self) -> None:
        backoff: dict[int, float] = {}
        while not self.stopping.wait(0.05):
            with self._lock:
                procs = list(enumerate(self.procs))
            for index, proc in procs:
                code = proc.poll()
                if code is None or self.stopping.is_set():
                    continue
                if time.monotonic() < backoff.get(index, 0):
                    continue
                self._emit("died", proc.pid, f"exit {code}")
                self._forget(proc.pid)
                replacement = self._spawn()
                with self._lock:
                    self.procs[index] = replacement
                quick = code not in (-signal.SIGKILL, -signal.SIGTERM)
                backoff[index] = time.monotonic() + (0.5 if quick else 0.0)
            if self.burst and self._drained():
                self.finished.set()
                return

    def _drained(self) -> bool:
        from sqlalchemy import select

        from failfirst import models, store
        from failfirst.states import SETTLED, State

        try:
            engine = store.get_engine(self.settings.database_url, readonly=True)
            o = models.orders
            unsettled = [s.value for s in State if s not in SETTLED]
            with engine.connect() as conn:
                left = conn.execute(select(o.c.id).where(o.c.state.in_(unsettled)).limit(1)).first()
        except Exception:
            return False
        return left is None

    def _schedule(self) -> None:
        from redis.exceptions import RedisError
        from rq.scheduler import RQScheduler

        from failfirst.connections import get_redis

        scheduler: RQScheduler | None = None
        name = f"failfirst-{os.getpid()}-{id(self):x}"
        beat = 0.0
        while not self.stopping.wait(self.settings.scheduler_interval):
            try:
                if scheduler is None:
                    redis = get_redis(self.settings, start=False, check=False)
                    scheduler = RQScheduler([self.settings.queue], connection=redis, name=name)
                    scheduler.log.setLevel(logging.ERROR)
                if not scheduler.acquired_locks:
                    scheduler.acquire_locks()
                    if scheduler.acquired_locks:
                        scheduler.register_birth()
                if scheduler.acquired_locks:
                    if time.monotonic() - beat > 1.0:
                        scheduler.heartbeat()
                        beat = time.monotonic()
                    scheduler.enqueue_scheduled_jobs()
            except RedisError:
                scheduler = None
            except Exception:
                log.exception("scheduler pass failed")
        if scheduler is not None:
            with contextlib.suppress(Exception):
                scheduler.release_locks()
                scheduler.register_death()

    def _reconcile(self) -> None:
        from redis.exceptions import RedisError
        from sqlalchemy.exc import SQLAlchemyError

        from failfirst import store
        from failfirst.connections import get_redis
        from failfirst.queueing import order_queue
        from failfirst.reconciler import reconcile

        while not self.stopping.wait(self.settings.reconcile_interval):
            try:
                redis = get_redis(self.settings, start=False, check=False)
                engine = store.get_engine(self.settings.database_url, readonly=True)
                report = reconcile(engine, redis, order_queue(redis, self.settings.queue))
                prune_dead_workers(redis)
                if report.total:
                    self._emit(
                        "reconciled",
                        0,
                        f"enqueued {len(report.enqueued)}, re-drove {len(report.redriven)}",
                    )
            except (RedisError, SQLAlchemyError):
                continue
            except Exception:
                log.exception("reconciler pass failed")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until burst work is done (True), the timeout passes, or stop() (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished.is_set() and not self.stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.finished.wait(0.1)
        return self.finished.is_set()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every worker (RQ finishes its current job), then SIGKILL stragglers."""
        self.stopping.set()
        with self._lock:
            procs = list(self.procs)
        terminate(procs, grace)
        for thread in self._threads:
            thread.join(timeout=5)
