"""`failfirst bench`: throughput, latency and scaling, each beside a baseline run on the spot.

A resilience layer that costs too much is not used, so its cost is measured, and
measured relative to something: every case runs its failfirst figure and a
baseline (stock RQ, a bare import, a plain table scan) in the same invocation,
on the same machine and, where Redis is involved, on the same Redis server. On
a small shared box the absolute numbers drift from run to run; the ratios drift
far less, and the targets of issue 6 are set on ratios wherever a fair baseline
exists.

Every case works in a fresh data directory of its own (its own SQLite file and
its own embedded redis-server, stopped afterwards), with faults, latency and the
rate limiter switched off, so a bench never touches the user's store and never
depends on their environment. Sizes are parameters (`Sizes`) so that the test
suite runs the same code at toy scale.

`run()` returns one JSON-able document: the machine, every raw sample, medians,
ratios, targets and whether each target was met. `render()` turns that document
(fresh, or loaded from a file) into the Rich table the CLI prints.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from failfirst.errors import FailfirstError, UsageError
from failfirst.processes import terminate

if TYPE_CHECKING:
    from redis import Redis
    from sqlalchemy import Engine

    from failfirst.config import Settings
    from failfirst.embedded import EmbeddedRedis

CASES = ("pipeline", "placement", "latency", "scaling", "cli", "check", "watch")

# Long cases run once by default; the cheap ones, and the pipeline (whose single
# runs spread by about 15 % on a shared 2-core machine), are repeated so their
# medians mean something.
DEFAULT_REPEAT = {
    "pipeline": 3,
    "placement": 3,
    "latency": 1,
    "scaling": 1,
    "cli": 5,
    "check": 1,
    "watch": 5,
}

SMALL_SIZE_RUNS = 3

NOOP_QUEUE = "bench-noop"
NOOP_FUNC = "failfirst.bench.noop"
T = TypeVar("T")

SKUS = ("KB-101", "MS-202", "MN-303", "HD-404", "CB-505")
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}


def noop() -> None:
    """The baseline job: RQ's own cost per job, with no work of ours in it."""


class BenchError(FailfirstError):
    """A bench run could not produce its figures (a worker failed, a deadline passed)."""


@dataclass(frozen=True)
class Sizes:
    """How big each case is. The defaults are the issue's; tests pass toy sizes."""

    pipeline: int = 2000
    placement: int = 2000
    latency: int = 500
    latency_rate: float = 20.0
    scaling: tuple[int, ...] = (1000, 4000, 16000)
    check: int = 100_000
    watch: int = 100_000
    events_per_order: int = 6


@dataclass(frozen=True)
class Target:
    """A pass mark on one column of a row: `on` is "ratio" or "failfirst"."""

    on: str
    op: str
    value: float
    unit: str = ""

    def met(self, row: Row) -> bool | None:
        figure = row.ratio if self.on == "ratio" else row.failfirst
        return None if figure is None else OPERATORS[self.op](figure, self.value)

    def text(self) -> str:
        return f"{self.on} {self.op} {self.value:g}{self.unit}"


@dataclass
class Row:
    """One line of the table: the failfirst figure, its baseline, their ratio, the target."""

    measure: str
    failfirst: float | None
    baseline: float | None = None
    target: Target | None = None
    note: str = ""
    comparable: bool = True

    @property
    def ratio(self) -> float | None:
        """failfirst / baseline: a fraction for rates, a slowdown factor for durations."""
        if not self.comparable or self.failfirst is None or not self.baseline:
            return None
        return self.failfirst / self.baseline

    def to_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "failfirst": self.failfirst,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": None if self.target is None else {**asdict(self.target), "text": self.target.text()},
            "met": None if self.target is None else self.target.met(self),
            "note": self.note,
        }


@dataclass
class Case:
    """What one case measured: its rows, every raw sample, and notes on method."""

    name: str
    repeat: int
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, seconds: float, load: tuple[float, float]) -> dict[str, Any]:
        return {
            "repeat": self.repeat,
            "rows": [r.to_dict() for r in self.rows],
            "raw": self.raw,
            "notes": self.notes,
            "seconds": round(seconds, 3),
            "loadavg_before_after": list(load),
        }


# ---------------------------------------------------------------- labs


@dataclass
class Lab:
    """A fresh data directory: its SQLite store, its embedded Redis, settings that point at both."""

    settings: Settings
    engine: Engine
    redis: Redis
    server: EmbeddedRedis

    @property
    def url(self) -> str:
        return self.server.url

    def env(self) -> dict[str, str]:
        """The environment of a child process: ours without any failfirst or Redis override."""
        from failfirst.config import settings_env

        base = {
            k: v for k, v in os.environ.items() if not k.startswith("FAILFIRST_") and k != "REDIS_URL"
        }
        return base | settings_env(self.settings)


def lab_settings(home: Path) -> Settings:
    """Default settings with every fault, latency and the rate limiter off, rooted at `home`."""
    from failfirst.config import FaultConfig, Settings

    return Settings(
        home=home,
        database_url=f"sqlite:///{home / 'failfirst.db'}",
        redis_url=None,
        rate_per_second=0.0,
        faults=FaultConfig(payment_fail=0.0, inventory_fail=0.0),
    )


@contextlib.contextmanager
def open_lab(home: Path, *, stock: int = 1000, seed: bool = True) -> Iterator[Lab]:
    """Start a lab in `home`; its Redis is stopped and its connections closed on exit."""
    from redis import Redis

    from failfirst import store
    from failfirst.embedded import EmbeddedRedis

    settings = lab_settings(home)
    server = EmbeddedRedis(home)
    server.start()
    try:
        engine = store.open_store(settings.database_url, seed=False)
        if seed:
            store.seed_catalogue(
                engine, tuple((sku, name, price, stock) for sku, name, price, _ in store.DEFAULT_CATALOGUE)
            )
        client = Redis.from_url(server.url, socket_timeout=30)
        try:
            yield Lab(settings, engine, client, server)
        finally:
            client.close()
            engine.dispose()
    finally:
        server.stop()


def place_orders(lab: Lab, n: int, prefix: str) -> list[int]:
    """Place `n` one-unit orders with fresh idempotency keys, spread over customers and SKUs."""
    from failfirst.gateway import Gateway, PlaceRequest

    gw = Gateway(lab.settings, lab.engine, lab.redis)
    return [
        gw.place(PlaceRequest(f"cust-{i % 97}", SKUS[i % len(SKUS)], 1, f"{prefix}-{i}")).order_id
        for i in range(n)
    ]


def enqueue_noops(redis: Redis, n: int) -> None:
    """Fill the baseline queue with `n` no-op jobs in batches (set-up, not timed)."""
    from rq import Queue

    queue = Queue(NOOP_QUEUE, connection=redis)
    for start in range(0, n, 1000):
        queue.enqueue_many(
            [Queue.prepare_data(NOOP_FUNC, result_ttl=0) for _ in range(start, min(n, start + 1000))]
        )


def state_counts(engine: Engine, ids: Sequence[int] | None = None) -> dict[str, int]:
    from sqlalchemy import func, select

    from failfirst import models

    o = models.orders
    query = select(o.c.state, func.count()).group_by(o.c.state)
    if ids is not None:
        query = query.where(o.c.id.in_(list(ids)))
    with engine.connect() as conn:
        return {state: count for state, count in conn.execute(query).all()}


# ---------------------------------------------------------------- processes


def executable(name: str) -> str:
    """A console script of this environment (beside the running Python), else one on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise BenchError(f"`{name}` is not installed in this environment; run `make install`")
    return found


def failfirst_cmd() -> list[str]:
    return [executable("failfirst")]


def rq_worker_cmd(url: str, *, burst: bool) -> list[str]:
    """Stock RQ: the same in-process SimpleWorker class failfirst's workers use, logging quietly."""
    cmd = [executable("rq"), "worker", "-w", "rq.worker.SimpleWorker", "--quiet", "--url", url]
    return [*cmd, "--burst", NOOP_QUEUE] if burst else [*cmd, NOOP_QUEUE]


def timed_processes(cmds: Sequence[list[str]], env: dict[str, str], log: Path, timeout: float) -> float:
    """Wall seconds from starting every command to the last one exiting; all must exit 0."""
    procs: list[subprocess.Popen[bytes]] = []
    with open(log, "ab") as out:
        started = time.perf_counter()
        try:
            for cmd in cmds:
                procs.append(
                    subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                )
            for proc in procs:
                proc.wait(max(started + timeout - time.perf_counter(), 0.01))
            elapsed = time.perf_counter() - started
        except subprocess.TimeoutExpired:
            raise BenchError(f"{' '.join(cmds[0][:3])} did not finish within {timeout:.0f}s; see {log}") from None
        finally:
            terminate(procs)
    failed = [p.returncode for p in procs if p.returncode != 0]
    if failed:
        raise BenchError(f"{' '.join(cmds[0][:3])} exited with {failed[0]}; see {log}")
    return elapsed


def timed_command(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one short command, which must succeed."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"{' '.join(cmd)} exited with {done.returncode}: {tail[0]}")
    return elapsed


# ---------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def growth(first: float, last: float) -> float | None:
    """Relative growth in percent from `first` to `last` (None when `first` is zero)."""
    return (last / first - 1.0) * 100.0 if first > 0 else None


# ---------------------------------------------------------------- workspace


def import_attr(module: str, name: str) -> Any:
    """`module.name`, or a BenchError naming what is missing (check and watch need two helper modules)."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise BenchError(f"{module}.{name} is not available in this failfirst") from None


class Workspace:
    """Where one bench run keeps its labs, plus the one large store that check and watch share."""

    def __init__(self, root: Path, sizes: Sizes, say: Callable[[str], None]) -> None:
        self.root = root
        self.sizes = sizes
        self.say = say
        self._stack = contextlib.ExitStack()
        self._filled: dict[int, tuple[Lab, float]] = {}
        self._count = 0

    def home(self, name: str) -> Path:
        self._count += 1
        path = self.root / f"{self._count:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def filled(self, orders: int) -> tuple[Lab, float]:
        """A lab holding `orders` settled synthetic orders, and the seconds filling it took."""
        if orders not in self._filled:
            fill = import_attr("failfirst.synthetic", "fill")
            lab = self._stack.enter_context(open_lab(self.home(f"filled-{orders}"), seed=False))
            self.say(f"filling a store with {orders} orders ({self.sizes.events_per_order} events each)")
            started = time.perf_counter()
            fill(lab.engine, orders, events_per_order=self.sizes.events_per_order)
            self._filled[orders] = (lab, time.perf_counter() - started)
        return self._filled[orders]

    def close(self) -> None:
        self._stack.close()


# ---------------------------------------------------------------- cases


def pipeline_once(ws: Workspace, n: int, *, baseline_first: bool) -> dict[str, Any]:
    """One side-by-side run: `n` orders through `failfirst worker -n 2 --burst`, `n` no-ops through 2 RQ workers.

    Both sides are timed from starting the processes to their exit, so both
    include interpreter start-up and imports; the orders are placed and the
    jobs enqueued beforehand, untimed.
    """
    home = ws.home(f"pipeline-{n}")
    with open_lab(home, stock=n) as lab:
        place_orders(lab, n, "bench")
        enqueue_noops(lab.redis, n)
        env = lab.env()
        sides = {
            "failfirst": ([[*failfirst_cmd(), "worker", "-n", "2", "--burst", "--quiet"]], "failfirst-worker.log"),
            "rq": ([rq_worker_cmd(lab.url, burst=True)] * 2, "rq-worker.log"),
        }
        result: dict[str, Any] = {"orders": n}
        for side in sorted(sides, reverse=baseline_first):
            cmds, log = sides[side]
            before = redis_commands(lab.redis)
            result[f"{side}_s"] = timed_processes(cmds, env, home / log, 120 + n * 0.1)
            result[f"{side}_redis_commands"] = redis_commands(lab.redis) - before - 1
        states = state_counts(lab.engine)
        left = lab.redis.llen(f"rq:queue:{NOOP_QUEUE}")
        result["failfirst_settle_span_s"] = settle_span(lab.engine)
    if states.get("COMPLETED", 0) != n or left:
        raise BenchError(f"pipeline run of {n} did not finish cleanly: orders {states}, {left} no-op jobs left")
    return result


def settle_span(engine: Engine) -> float:
    """Seconds from the first order settling to the last: the run without start-up and shutdown.

    Process start-up is a fixed cost that wall time spreads over the orders, so
    wall time per order falls as runs grow and would hide a per-order cost that
    grows with the table; the settle span does not have that bias.
    """
    from sqlalchemy import func, select

    from failfirst import models

    o = models.orders
    with engine.connect() as conn:
        first, last = conn.execute(select(func.min(o.c.settled_at), func.max(o.c.settled_at))).one()
    return float(last - first)


def redis_commands(redis: Redis) -> int:
    """Commands the server has processed so far (this INFO call included)."""
    return int(redis.info("stats")["total_commands_processed"])


def bench_pipeline(ws: Workspace, repeat: int) -> Case:
    n = ws.sizes.pipeline
    case = Case("pipeline", repeat)
    runs = []
    for i in range(repeat):
        ws.say(f"pipeline {i + 1}/{repeat}: {n} orders vs {n} no-op jobs")
        runs.append(pipeline_once(ws, n, baseline_first=i % 2 == 1))
    ff = [n / r["failfirst_s"] for r in runs]
    rq = [n / r["rq_s"] for r in runs]
    span = [n / r["failfirst_settle_span_s"] for r in runs if r["failfirst_settle_span_s"] > 0]
    case.raw = {"orders": n, "runs": runs, "failfirst_orders_per_s": ff, "rq_jobs_per_s": rq}
    case.rows += [
        Row("orders/s | no-op jobs/s", median(ff), median(rq), Target("ratio", ">=", 0.7)),
        Row(
            "orders/s, first to last settled",
            median(span) if span else None,
            note="the same runs without process start-up and shutdown; no baseline (RQ keeps no timestamps at result_ttl 0)",
        ),
        Row(
            "Redis commands per order | per job",
            median([r["failfirst_redis_commands"] / n for r in runs]),
            median([r["rq_redis_commands"] / n for r in runs]),
            note="server-side count (INFO total_commands_processed): pipelined commands share a round trip",
        ),
    ]
    case.notes += [
        "failfirst: `failfirst worker -n 2 --burst` (supervisor, scheduler, reconciler, 2 SimpleWorker processes)",
        "baseline: 2 x `rq worker --burst -w rq.worker.SimpleWorker --quiet` on the same Redis, no-op jobs (result_ttl 0, as order jobs)",
        "both timed as wall time from process start to exit: interpreter start-up and imports included",
        "'first to last settled' divides the orders by max(settled_at) - min(settled_at) of the same run",
        "orders are fault-free and zero-latency; placement and enqueueing are done beforehand and not timed",
    ]
    return case


def placement_once(lab: Lab, n: int, *, reverse: bool) -> dict[str, float]:
    """Per-second rates of the four placement measurements, in one lab, run back to back."""
    from rq import Queue

    from failfirst.gateway import Gateway, PlaceRequest

    gw = Gateway(lab.settings, lab.engine, lab.redis)
    queue = Queue(NOOP_QUEUE, connection=lab.redis)

    def place(tag: str) -> float:
        started = time.perf_counter()
        for k in range(n):
            gw.place(PlaceRequest(f"cust-{k % 97}", SKUS[k % len(SKUS)], 1, f"{tag}-{k}"))
        return n / (time.perf_counter() - started)

    def enqueue_one() -> float:
        started = time.perf_counter()
        for _ in range(n):
            queue.enqueue(NOOP_FUNC, result_ttl=0)
        return n / (time.perf_counter() - started)

    def enqueue_batch() -> float:
        started = time.perf_counter()
        queue.enqueue_many([Queue.prepare_data(NOOP_FUNC, result_ttl=0) for _ in range(n)])
        return n / (time.perf_counter() - started)

    for k in range(20):
        gw.place(PlaceRequest("warm", SKUS[0], 1, f"warm-{k}"))
        queue.enqueue(NOOP_FUNC, result_ttl=0)
    steps: list[tuple[str, Callable[[], float]]] = [
        ("failfirst_one", lambda: place("one")),
        ("rq_one", enqueue_one),
        ("failfirst_loop", lambda: place("loop")),
        ("rq_batch", enqueue_batch),
    ]
    return {key: step() for key, step in (steps[::-1] if reverse else steps)}


def bench_placement(ws: Workspace, repeat: int) -> Case:
    """Placement API vs `Queue.enqueue`, one at a time and batched, no workers running."""
    n = ws.sizes.placement
    case = Case("placement", repeat)
    samples: dict[str, list[float]] = {"failfirst_one": [], "rq_one": [], "failfirst_loop": [], "rq_batch": []}
    for i in range(repeat):
        ws.say(f"placement {i + 1}/{repeat}: {n} orders vs {n} jobs")
        with open_lab(ws.home("placement"), stock=4 * n) as lab:
            for key, rate in placement_once(lab, n, reverse=i % 2 == 1).items():
                samples[key].append(rate)
    case.raw = {"orders": n, **{f"{k}_per_s": v for k, v in samples.items()}}
    case.rows += [
        Row("one by one: place/s | enqueue/s", median(samples["failfirst_one"]), median(samples["rq_one"]),
            Target("ratio", ">=", 0.5)),
        Row("batched: place/s | enqueue_many/s", median(samples["failfirst_loop"]), median(samples["rq_batch"]),
            note="failfirst has no batch placement API: its figure is a loop of Gateway.place in one thread"),
    ]
    case.notes += [
        "failfirst: Gateway.place with a fresh idempotency key each (validation, key claim, order + outbox commit, enqueue); rate limiter off",
        "baseline: Queue.enqueue of a no-op job (result_ttl 0); batched: Queue.enqueue_many of Queue.prepare_data items",
        "failfirst has no batch placement API: its batched figure is a second loop of Gateway.place in one thread",
    ]
    return case


def steady(n: int, rate: float, submit: Callable[[int], T]) -> list[T]:
    """Call `submit(i)` for i in 0..n-1 at `rate` per second, on a fixed schedule (no drift)."""
    out: list[T] = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        out.append(submit(i))
    return out


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.05)


def failfirst_latencies(ws: Workspace, n: int, rate: float) -> list[float]:
    """Seconds from placement to COMPLETED for `n` orders placed at `rate` per second, 2 idle workers."""
    from sqlalchemy import select

    from failfirst import models
    from failfirst.gateway import Gateway, PlaceRequest
    from failfirst.supervisor import Supervisor

    with open_lab(ws.home("latency"), stock=n + 100) as lab:
        sup = Supervisor(lab.settings, count=2)
        sup.start()
        try:
            warm = place_orders(lab, 10, "warm")
            wait_for(lambda: state_counts(lab.engine, warm).get("COMPLETED") == len(warm), 120, "warm-up")
            gw = Gateway(lab.settings, lab.engine, lab.redis)
            ids = steady(
                n,
                rate,
                lambda i: gw.place(PlaceRequest(f"cust-{i % 97}", SKUS[i % len(SKUS)], 1, f"lat-{i}")).order_id,
            )
            wait_for(
                lambda: state_counts(lab.engine, ids).get("COMPLETED") == n, 120 + n / rate, f"{n} orders completing"
            )
        finally:
            sup.stop()
        o = models.orders
        with lab.engine.connect() as conn:
            rows = conn.execute(
                select(o.c.settled_at - o.c.created_at).where(o.c.id.in_(ids), o.c.state == "COMPLETED")
            ).scalars().all()
    return [float(v) for v in rows]


def rq_latencies(ws: Workspace, n: int, rate: float) -> list[float]:
    """Seconds from enqueue to end for `n` no-op jobs enqueued at `rate` per second, 2 idle RQ workers."""
    from rq import Queue, Worker
    from rq.job import Job

    home = ws.home("latency-rq")
    with open_lab(home) as lab, open(home / "rq-worker.log", "ab") as log:
        cmd = rq_worker_cmd(lab.url, burst=False)
        procs = [subprocess.Popen(cmd, env=lab.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log) for _ in range(2)]
        try:
            queue = Queue(NOOP_QUEUE, connection=lab.redis)
            wait_for(lambda: Worker.count(queue=queue) == 2, 60, "2 RQ workers registering")

            def finished(ids: list[str]) -> bool:
                return all(job is not None and job.ended_at is not None for job in Job.fetch_many(ids, lab.redis))

            warm = [queue.enqueue(NOOP_FUNC, result_ttl=600).id for _ in range(10)]
            wait_for(lambda: finished(warm), 60, "warm-up")
            ids = steady(n, rate, lambda _i: queue.enqueue(NOOP_FUNC, result_ttl=600).id)
            wait_for(lambda: finished(ids), 120 + n / rate, f"{n} no-op jobs finishing")
            jobs = Job.fetch_many(ids, lab.redis)
        finally:
            terminate(procs)
    return [(job.ended_at - job.enqueued_at).total_seconds() for job in jobs if job is not None]


def bench_latency(ws: Workspace, repeat: int) -> Case:
    n, rate = ws.sizes.latency, ws.sizes.latency_rate
    case = Case("latency", repeat)
    ff: list[list[float]] = []
    rq: list[list[float]] = []
    for i in range(repeat):
        ws.say(f"latency {i + 1}/{repeat}: {n} orders, then {n} no-op jobs, at {rate:g}/s")
        ff.append(failfirst_latencies(ws, n, rate))
        rq.append(rq_latencies(ws, n, rate))
    ff_ms = [[v * 1000 for v in run] for run in ff]
    rq_ms = [[v * 1000 for v in run] for run in rq]
    p50 = median([percentile(run, 0.5) for run in ff_ms]), median([percentile(run, 0.5) for run in rq_ms])
    p99 = median([percentile(run, 0.99) for run in ff_ms]), median([percentile(run, 0.99) for run in rq_ms])
    case.raw = {
        "orders": n,
        "rate_per_s": rate,
        "failfirst_ms": [sorted(run) for run in ff_ms],
        "rq_ms": [sorted(run) for run in rq_ms],
    }
    case.rows += [
        Row("p50 ms to COMPLETED | job end", p50[0], p50[1], Target("failfirst", "<", 25, " ms")),
        Row("p99 ms to COMPLETED | job end", p99[0], p99[1]),
    ]
    case.notes += [
        "failfirst: settled_at - created_at of COMPLETED orders, 2 idle supervised workers, orders placed one at a time on a fixed schedule",
        "baseline: ended_at - enqueued_at of no-op jobs through 2 idle `rq worker -w rq.worker.SimpleWorker`, same rate",
        "10 warm-up orders (and jobs) first, not counted",
    ]
    return case


def bench_scaling(ws: Workspace, repeat: int) -> Case:
    sizes = ws.sizes.scaling
    case = Case("scaling", repeat)
    per_size: dict[int, list[dict[str, Any]]] = {}
    for n in sizes:
        per_size[n] = []
        # A short run is the noisiest: every size below the largest runs at least 3 times.
        runs = repeat if n == sizes[-1] else max(repeat, SMALL_SIZE_RUNS)
        for i in range(runs):
            ws.say(f"scaling {n} orders, {i + 1}/{runs}")
            per_size[n].append(pipeline_once(ws, n, baseline_first=i % 2 == 1))
    ff_ms = {n: median([r["failfirst_s"] / n * 1000 for r in runs]) for n, runs in per_size.items()}
    rq_ms = {n: median([r["rq_s"] / n * 1000 for r in runs]) for n, runs in per_size.items()}
    span_ms = {n: median([r["failfirst_settle_span_s"] / n * 1000 for r in runs]) for n, runs in per_size.items()}
    case.raw = {"runs": {str(n): runs for n, runs in per_size.items()}}
    small, large = sizes[0], sizes[-1]
    case.rows += [Row(f"wall ms/order at {n} | ms/job", ff_ms[n], rq_ms[n]) for n in sizes]
    case.rows.append(
        Row(
            f"growth %, wall, {small}->{large}",
            growth(ff_ms[small], ff_ms[large]),
            growth(rq_ms[small], rq_ms[large]),
            note="falls with size as start-up is spread thinner: not the target's figure",
            comparable=False,
        )
    )
    case.rows += [Row(f"settled ms/order at {n}", span_ms[n]) for n in sizes]
    case.rows.append(
        Row(
            f"growth %, settled, {small}->{large}",
            growth(span_ms[small], span_ms[large]),
            target=Target("failfirst", "<=", 20, " %"),
        )
    )
    case.notes += [
        "each size is the pipeline case (fresh store and Redis, same side-by-side RQ baseline) at that many orders; "
        f"sizes below the largest run at least {SMALL_SIZE_RUNS} times, medians compared",
        "wall ms/order = process start to exit / orders; the baseline column is stock RQ's, as a noise reference",
        "settled ms/order = (last settled_at - first settled_at) / orders: no fixed start-up cost, so a per-order cost "
        "that grows with the table shows; the 20 % target is judged on it",
    ]
    return case


def bench_cli(ws: Workspace, repeat: int) -> Case:
    """Start-up cost of the CLI against the imports it cannot avoid."""
    case = Case("cli", repeat)
    with open_lab(ws.home("cli")) as lab:
        env = lab.env()
        ff = failfirst_cmd()
        python = sys.executable
        cmds = {
            "help": [*ff, "--help"],
            "place": [*ff, "order", "place", "--customer", "bench", "--sku", "KB-101", "--qty", "1"],
            "import_typer": [python, "-c", "import typer"],
            "import_sqlmodel_rq": [python, "-c", "import sqlmodel, rq"],
        }
        ws.say(f"cli: {len(cmds)} commands x {repeat}")
        for cmd in cmds.values():
            timed_command(cmd, env)
        samples: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(repeat):
            for key, cmd in cmds.items():
                samples[key].append(timed_command(cmd, env) * 1000)
    case.raw = {f"{k}_ms": v for k, v in samples.items()}
    case.rows += [
        Row("ms: --help | import typer", median(samples["help"]),
            median(samples["import_typer"]), Target("ratio", "<=", 1.5)),
        Row("ms: order place | import sqlmodel, rq", median(samples["place"]),
            median(samples["import_sqlmodel_rq"])),
    ]
    case.notes += [
        "wall time of each command as a subprocess, median of the repeats; every command runs once untimed first (warm page cache)",
        "`order place` runs against an initialised store with its embedded Redis up, so it measures start-up, not schema creation",
    ]
    return case


def bench_check(ws: Workspace, repeat: int) -> Case:
    """The invariant checker over a large settled store, against one plain read of the same rows."""
    from failfirst.checker import check_store

    n = ws.sizes.check
    case = Case("check", repeat)
    lab, fill_s = ws.filled(n)
    checks: list[float] = []
    scans: list[float] = []
    ok: list[bool] = []
    for i in range(repeat):
        ws.say(f"check {i + 1}/{repeat} over {n} orders")
        started = time.perf_counter()
        report = check_store(lab.engine)
        checks.append(time.perf_counter() - started)
        ok.append(report.ok)
        started = time.perf_counter()
        with lab.engine.connect() as conn:
            for table in ("orders", "order_events"):
                conn.exec_driver_sql(f"SELECT * FROM {table}").fetchall()
        scans.append(time.perf_counter() - started)
    case.raw = {"orders": n, "events_per_order": ws.sizes.events_per_order, "fill_s": fill_s,
                "check_s": checks, "scan_s": scans, "report_ok": ok}
    case.rows.append(
        Row(f"s: check {n} orders | read all rows", median(checks),
            median(scans), Target("failfirst", "<", 5, " s"))
    )
    case.notes.append("store filled by failfirst.synthetic.fill; baseline: SELECT * of orders and order_events, fetched")
    return case


def bench_watch(ws: Workspace, repeat: int) -> Case:
    """One frame of `failfirst watch` over a large store, against the cheapest query it needs."""
    take = import_attr("failfirst.snapshot", "take")
    n = ws.sizes.watch
    case = Case("watch", repeat)
    lab, fill_s = ws.filled(n)
    ws.say(f"watch: {repeat} snapshots over {n} orders")
    started = time.perf_counter()
    frame = take(lab.engine, lab.redis, queue_name=lab.settings.queue, now=None)
    first = time.perf_counter() - started
    error = getattr(frame, "database_error", None) or getattr(frame, "redis_error", None)
    if error:
        raise BenchError(f"the snapshot could not read the lab: {error}")
    frames: list[float] = []
    counts: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        take(lab.engine, lab.redis, queue_name=lab.settings.queue, now=None)
        frames.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        state_counts(lab.engine)
        counts.append((time.perf_counter() - started) * 1000)
    case.raw = {"orders": n, "events_per_order": ws.sizes.events_per_order, "fill_s": fill_s,
                "first_frame_ms": first * 1000, "frame_ms": frames, "state_count_ms": counts,
                "frame_orders": sum(frame.states.values())}
    case.rows.append(
        Row(f"ms: frame at {n} orders | state count", median(frames), median(counts),
            Target("failfirst", "<", 100, " ms"))
    )
    case.notes += [
        "store filled by failfirst.synthetic.fill; median of the repeats after one untimed first frame (recorded in raw)",
        "baseline: SELECT state, count(*) FROM orders GROUP BY state, the least any frame must read",
    ]
    return case


RUNNERS: dict[str, Callable[[Workspace, int], Case]] = {
    "pipeline": bench_pipeline,
    "placement": bench_placement,
    "latency": bench_latency,
    "scaling": bench_scaling,
    "cli": bench_cli,
    "check": bench_check,
    "watch": bench_watch,
}


# ---------------------------------------------------------------- the run


def validate_cases(cases: Sequence[str]) -> list[str]:
    """The cases to run, in the canonical order; all of them when none is named."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise UsageError(f"unknown bench case {unknown[0]!r}; choose from {', '.join(CASES)}")
    return [c for c in CASES if c in cases] if cases else list(CASES)


def redis_server_version() -> str:
    from failfirst.embedded import server_binary

    out = subprocess.run([str(server_binary()), "--version"], capture_output=True, text=True, timeout=30).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "python": platform.python_version(),
        "redis_server": redis_server_version(),
        "sqlite": sqlite3.sqlite_version,
        "failfirst": version("failfirst"),
        "rq": version("rq"),
        "sqlalchemy": version("SQLAlchemy"),
    }


def loadavg() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0


def run(
    cases: Sequence[str] = (),
    repeat: int | None = None,
    *,
    sizes: Sizes | None = None,
    workdir: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the named cases (all when empty) and return the bench document.

    `repeat` applies to every case; None uses DEFAULT_REPEAT per case. Every
    lab lives under `workdir` (a temporary directory removed afterwards when
    not given) and every process and Redis server started is stopped before
    returning, also on error. A case that cannot produce its figures (a
    BenchError) is recorded with its error and the others still run: one
    broken case should not throw away minutes of measurements.
    """
    chosen = validate_cases(cases)
    if repeat is not None and repeat < 1:
        raise UsageError(f"--repeat must be at least 1, not {repeat}")
    sizes = sizes or Sizes()
    tell = say or (lambda _msg: None)
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="failfirst-bench-")) if workdir is None else workdir
    doc: dict[str, Any] = {
        "bench": "failfirst",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(["failfirst", "bench", *cases] + ([] if repeat is None else ["--repeat", str(repeat)])),
        "sizes": asdict(sizes) | {"scaling": list(sizes.scaling)},
        "cases": {},
    }
    ws = Workspace(root, sizes, tell)
    started = time.perf_counter()
    try:
        for name in chosen:
            reps = repeat or DEFAULT_REPEAT[name]
            load_before, case_started = loadavg(), time.perf_counter()
            try:
                case = RUNNERS[name](ws, reps)
            except BenchError as exc:
                tell(f"{name} failed: {exc}")
                doc["cases"][name] = {"repeat": reps, "rows": [], "error": str(exc)}
                continue
            doc["cases"][name] = case.to_dict(time.perf_counter() - case_started, (load_before, loadavg()))
    finally:
        ws.close()
        if own:
            shutil.rmtree(root, ignore_errors=True)
    doc["seconds"] = round(time.perf_counter() - started, 3)
    doc["errors"] = {name: case["error"] for name, case in doc["cases"].items() if "error" in case}
    doc["all_met"] = not doc["errors"] and all(
        row["met"] is not False for case in doc["cases"].values() for row in case["rows"]
    )
    return doc


# ---------------------------------------------------------------- rendering


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"


def render(doc: dict[str, Any]) -> Any:
    """The Rich table of a bench document (fresh from run(), or loaded from JSON)."""
    from rich.table import Table

    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), dict):
        raise UsageError("not a failfirst bench document (no \"cases\" object); write one with `failfirst bench --json`")
    m = doc.get("machine", {})
    title = (
        f"failfirst bench, {doc.get('date', '?')}: {m.get('cpu_count', '?')} CPUs, Python {m.get('python', '?')}, "
        f"Redis {m.get('redis_server', '?')}, SQLite {m.get('sqlite', '?')}, failfirst {m.get('failfirst', '?')}"
    )
    table = Table("case", "measure", "failfirst", "baseline", "ratio", "target", "met", title=title)
    for name, case in doc["cases"].items():
        if case.get("error"):
            table.add_row(name, f"error: {case['error']}", "-", "-", "-", "-", "NO")
        for i, row in enumerate(case.get("rows", [])):
            met = row.get("met")
            target = row.get("target") or {}
            table.add_row(
                name if i == 0 else "",
                row.get("measure", ""),
                _fmt(row.get("failfirst")),
                _fmt(row.get("baseline")),
                _fmt(row.get("ratio")),
                target.get("text", "-"),
                "-" if met is None else ("yes" if met else "NO"),
            )
    return table
