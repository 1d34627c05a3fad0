"""One chaos run: a fresh store and Redis, workers, load, faults, then the verdict.

Each run lives in its own directory under `<home>/runs/`, with its own SQLite
file and its own embedded redis-server, so runs never see each other's orders
or the user's. When FAILFIRST_DATABASE_URL names PostgreSQL the run's store is a
schema of its own in that database instead, dropped when the run ends; with
REDIS_URL the run uses that server's database, flushed before and after.
The per-key final states are kept in the run directory either way, so two runs
of one seed can be compared after their stores are gone.
"""

from __future__ import annotations

import contextlib
import json
import random
import shlex
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from failfirst import config, models, store
from failfirst.chaos.claim import claim, renew
from failfirst.chaos.hosts import RESTART_DELAY, Hosts
from failfirst.chaos.scenario import Scenario, parse_outage, parse_storm
from failfirst.chaos.scenario import load as load_scenario
from failfirst.config import Breaks, FaultConfig, RetryConfig, Settings
from failfirst.embedded import EmbeddedRedis
from failfirst.errors import ConfigError
from failfirst.states import SETTLED, State


@dataclass
class FaultLog:
    started: float = field(default_factory=time.time)
    entries: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, detail: str, at: float | None = None) -> None:
        """Log a fault now, or at `at` seconds into the run for one that keeps its own clock."""
        t = time.time() - self.started if at is None else at
        with self.lock:
            self.entries.append({"t": round(t, 3), "kind": kind, "detail": detail})


def run_schema(run_dir: Path) -> str:
    """A run's PostgreSQL schema, named from its directory `<YYYYmmdd-HHMMSS>-<scenario>-<seed>-<token>`."""
    stamp, token = run_dir.name[:15], run_dir.name.rsplit("-", 1)[-1]
    return f"ff_run_{stamp.replace('-', '_')}_{token}"


def run_settings(scn: Scenario, home: Path, redis_url: str | None, db_url: str | None) -> Settings:
    base = config.load()
    faults = FaultConfig(
        payment_fail=scn.payment_fail,
        insufficient_funds=scn.insufficient_funds,
        ambiguous=scn.ambiguous,
        hang=scn.hang,
        latency_ms=scn.latency_ms,
        jitter_ms=scn.jitter_ms,
        inventory_fail=scn.inventory_fail,
        call_timeout_ms=scn.call_timeout_ms,
        seed=scn.seed,
    )
    retry = RetryConfig(
        inner_attempts=scn.inner_attempts, inner_base=0.002, inner_cap=0.01,
        attempts=scn.attempts, base=scn.backoff_base, factor=2.0, cap=scn.backoff_cap,
    )
    return Settings(
        home=home,
        database_url=db_url or f"sqlite:///{home / 'run.db'}",
        redis_url=redis_url,
        queue=base.queue,
        rate_per_second=0.0,
        lease_seconds=scn.lease_seconds,
        reconcile_interval=0.25,
        scheduler_interval=0.05,
        faults=faults,
        retry=retry,
        breaks=Breaks.parse(",".join(scn.breaks)),
        crash_at=scn.crash_at,
        crash_rate=scn.crash_rate,
    )


FLAGS = (
    "orders", "workers", "hosts", "payment_fail", "inventory_fail", "ambiguous", "latency_ms", "jitter_ms",
    "latency_storm", "kill_workers", "redis_outage", "redis_flush", "duplicates", "inner_attempts",
    "deadline",
)


def replay_command(scn: Scenario, source: str) -> str:
    """The command that reruns `scn`: the source, the seed, and every flag that changed it."""
    try:
        base = load_scenario(source)
    except ConfigError:
        base = Scenario()
    parts = ["failfirst", "chaos", "run", source, "--seed", str(scn.seed)]
    for name in FLAGS:
        value = getattr(scn, name)
        if value != getattr(base, name):
            parts += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    if scn.crash_at != base.crash_at:
        for point in scn.crash_at:
            parts += ["--crash-at", point]
    if scn.breaks != base.breaks:
        for name in scn.breaks:
            parts += ["--break", name]
    return shlex.join(parts)


class ChaosRun:
    def __init__(self, scn: Scenario, source: str, *, progress: Any = None) -> None:
        self.scn = scn
        self.source = source
        self.progress = progress
        base = config.load()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = base.home / "runs" / f"{stamp}-{scn.name}-{scn.seed}-{random.randrange(1 << 16):04x}"
        self.dir.mkdir(parents=True, exist_ok=True)
        redis_url = None
        if base.redis_url:
            redis_url = base.redis_url
        self.external_redis = redis_url is not None
        self.base_db_url = base.database_url
        self.schema: str | None = None
        db_url = None
        if store.is_postgres(base.database_url):
            self.schema = run_schema(self.dir)
            db_url = store.with_schema(base.database_url, self.schema)
        self.settings = run_settings(scn, self.dir, redis_url, db_url)
        self.log = FaultLog()
        self.placed: dict[str, int] = {}
        self.duplicates_answered: list[tuple[str, int, int]] = []
        self.kills: list[dict[str, Any]] = []
        self.first_kill_due: float | None = None
        self.stop_faults = threading.Event()
        self.pool: Any = None

    # ------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Redis first, so a database the run may not take is refused before anything is created.

        Without REDIS_URL, `get_redis` starts the run's own embedded server.
        """
        from failfirst.connections import describe_redis, get_redis

        self.redis = get_redis(self.settings)
        if self.external_redis:
            claim(self.redis, describe_redis(self.settings), self.dir.name)
        if self.schema is not None:
            store.create_schema(self.base_db_url, self.schema)
        engine = store.open_store(self.settings.database_url, seed=False)
        store.seed_catalogue(
            engine,
            tuple((sku, name, price, self.scn.stock) for sku, name, price, _ in store.DEFAULT_CATALOGUE),
        )
        self.engine = engine

    # ------------------------------------------------------------ load
    def place_all(self) -> None:
        from failfirst.errors import FailfirstError
        from failfirst.gateway import Gateway, PlaceRequest

        gw = Gateway(self.settings, self.engine, self.redis)
        rng = random.Random(self.scn.seed)
        skus = [s for s, *_ in store.DEFAULT_CATALOGUE]
        plan = []
        for i in range(self.scn.orders):
            req = PlaceRequest(f"cust-{i % 97}", rng.choice(skus), 1 + rng.randrange(3 if self.scn.stock > 1000 else 1),
                               f"run-{self.scn.seed}-{i}")
            plan.append(req)
            if rng.random() < self.scn.duplicates:
                plan.append(req)
        work = list(enumerate(plan))
        lock = threading.Lock()

        def placer() -> None:
            while True:
                with lock:
                    if not work:
                        return
                    _, req = work.pop(0)
                    twin = work and work[0][1] == req
                    if twin:
                        work.pop(0)
                reqs = [req, req] if twin else [req]
                threads = [threading.Thread(target=self._place_one, args=(gw, r, FailfirstError)) for r in reqs]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

        pool = [threading.Thread(target=placer) for _ in range(self.scn.placers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    def _place_one(self, gw: Any, req: Any, error_type: type[Exception]) -> None:
        deadline = time.monotonic() + self.scn.deadline
        while time.monotonic() < deadline:
            try:
                result = gw.place(req, wait=2.0)
            except error_type:
                time.sleep(0.05)
                continue
            except Exception:
                time.sleep(0.05)
                continue
            with self.log.lock:
                first = self.placed.setdefault(req.key, result.order_id)
                if result.replayed or first != result.order_id:
                    self.duplicates_answered.append((req.key, first, result.order_id))
            if self.scn.redeliver and random.random() < self.scn.redeliver:
                with contextlib.suppress(Exception):
                    from failfirst.queueing import enqueue_order, order_queue

                    enqueue_order(order_queue(self.redis, self.settings.queue), result.order_id, "dup")
            return

    # ------------------------------------------------------------ faults
    def inject(self, sup: Any) -> None:
        """Inject the scenario's faults on the run's clock (seconds since `log.started`).

        The workers' latency storm is a wall-clock window on that clock; it is
        logged at its window's edges, which the workers keep whatever moment
        this loop notices them.
        """
        scn = self.scn
        t0 = time.monotonic() - (time.time() - self.log.started)
        outage = parse_outage(scn.redis_outage) if scn.redis_outage else None
        outage_done = flush_done = False
        storm = parse_storm(scn.latency_storm) if scn.latency_storm else None
        storm_state = 0
        rng = random.Random(scn.seed * 31 + 7)
        next_kill = t0 + (rng.expovariate(scn.kill_workers) if scn.kill_workers else 1e18)
        if scn.kill_workers:
            self.first_kill_due = round(next_kill - t0, 3)
        renewed = t0
        while not self.stop_faults.wait(0.02):
            now = time.monotonic()
            elapsed = now - t0
            if self.external_redis and now - renewed >= 1.0:
                renewed = now
                with contextlib.suppress(Exception):
                    renew(self.redis, self.dir.name)
            if isinstance(sup, Hosts):
                sup.tick()
            if scn.kill_workers and now >= next_kill:
                pids = sup.pids()
                if pids:
                    import os
                    import signal

                    pid = rng.choice(pids)
                    if isinstance(sup, Hosts):
                        host = sup.kill(pid)
                        self.log.add(
                            "kill-host", f"SIGKILL process group {pid} ({host}), back in {RESTART_DELAY:g}s"
                        )
                    else:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                        self.log.add("kill-worker", f"SIGKILL worker {pid}")
                    self.kills.append({"t": round(elapsed, 3), "pid": pid})
                next_kill = now + rng.expovariate(scn.kill_workers)
            if outage and not outage_done and elapsed >= outage[1] and self.external_redis:
                outage_done = True
                self.log.add("redis-outage-skipped", "REDIS_URL names a server failfirst did not start")
            if outage and not outage_done and elapsed >= outage[1] and not self.external_redis:
                outage_done = True
                server = EmbeddedRedis(self.dir)
                server.stop()
                self.log.add("redis-down", f"redis stopped for {outage[0]}s")
                if self.stop_faults.wait(outage[0]):
                    server.start()
                    self.log.add("redis-up", "redis restarted as the run ended")
                    return
                server.start()
                self.log.add("redis-up", "redis restarted")
            if storm and storm_state == 0 and elapsed >= storm[1]:
                storm_state = 1
                self.log.add(
                    "latency-storm", f"every provider call +{storm[0]:g} ms for {storm[2]:g}s", at=storm[1]
                )
            if storm and storm_state == 1 and elapsed >= storm[1] + storm[2]:
                storm_state = 2
                self.log.add("latency-storm-end", "provider latency back to normal", at=storm[1] + storm[2])
            if scn.redis_flush >= 0 and not flush_done and elapsed >= scn.redis_flush:
                flush_done = True
                with contextlib.suppress(Exception):
                    self.redis.flushdb()
                    self.log.add("redis-flush", "FLUSHDB: every queued and scheduled job lost")
                    if self.external_redis:
                        renew(self.redis, self.dir.name)

    def unreached(self) -> list[dict[str, Any]]:
        """The faults the scenario asked for that the run ended before injecting.

        A run that settles early outlives none of its later faults; saying so
        keeps a passing verdict from reading as proof against a fault that
        never happened.
        """
        scn = self.scn
        logged = {e["kind"] for e in self.log.entries}
        due: list[dict[str, Any]] = []
        if self.first_kill_due is not None and not self.kills:
            kind = "kill-host" if scn.hosts else "kill-worker"
            due.append({"kind": kind, "due_s": self.first_kill_due})
        if scn.redis_outage and not logged & {"redis-down", "redis-outage-skipped"}:
            due.append({"kind": "redis-down", "due_s": parse_outage(scn.redis_outage)[1]})
        if scn.redis_flush >= 0 and "redis-flush" not in logged:
            due.append({"kind": "redis-flush", "due_s": scn.redis_flush})
        if scn.latency_storm and "latency-storm" not in logged:
            due.append({"kind": "latency-storm", "due_s": parse_storm(scn.latency_storm)[1]})
        return due

    # ------------------------------------------------------------ observation
    def counts(self) -> dict[str, int]:
        o = models.orders
        eng = store.get_engine(self.settings.database_url, readonly=True)
        with eng.connect() as conn:
            rows = conn.execute(select(o.c.state, func.count()).group_by(o.c.state)).all()
        return {s: c for s, c in rows}

    def settled(self) -> bool:
        counts = self.counts()
        total = sum(counts.values())
        done = sum(c for s, c in counts.items() if s in SETTLED)
        return total > 0 and done == total and len(self.placed) >= len(
            {f"run-{self.scn.seed}-{i}" for i in range(self.scn.orders)}
        )

    # ------------------------------------------------------------ the run
    def execute(self) -> dict[str, Any]:
        """Run the experiment; its workers stop and its schema (PostgreSQL) is dropped however it ends.

        Hosts run in sessions of their own, so nothing would stop them if the run
        died of an exception or Ctrl-C; stopping twice is harmless.
        """
        try:
            return self._execute()
        finally:
            self.stop_faults.set()
            if self.pool is not None:
                self.pool.stop()
            if self.schema is not None:
                store.dispose(self.settings.database_url)
                store.drop_schema(self.base_db_url, self.schema)

    def workers(self) -> Any:
        """The in-process supervisor, or with `hosts` that many independent `failfirst worker` groups."""
        from failfirst.supervisor import Supervisor

        if self.scn.hosts:
            from failfirst.connections import redis_url

            url = redis_url(self.settings, start=False)
            return Hosts(self.settings, self.scn.hosts, self.scn.workers, self.dir, url)
        return Supervisor(self.settings, count=self.scn.workers, start_redis=False)

    def _execute(self) -> dict[str, Any]:
        self.prepare()
        started = time.time()
        self.log.started = started
        if self.scn.latency_storm:
            ms, at, seconds = parse_storm(self.scn.latency_storm)
            faults = replace(self.settings.faults, storm=(ms, started + at, started + at + seconds))
            self.settings = replace(self.settings, faults=faults)
        sup = self.pool = self.workers()
        # The load and the faults run on the run's clock from its first instant;
        # workers coming up is part of the system under test, not a pause before it.
        fault_thread = threading.Thread(target=self.inject, args=(sup,), daemon=True)
        fault_thread.start()
        placing = threading.Thread(target=self.place_all, daemon=True)
        placing.start()
        sup.start()
        deadline = time.monotonic() + self.scn.deadline
        timeline: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                counts = self.counts()
                timeline.append({"t": round(time.time() - started, 2), **counts})
                if self.progress is not None:
                    self.progress(counts, self.log.entries, time.time() - started)
            if not placing.is_alive() and self.settled():
                break
            time.sleep(0.2)
        self.stop_faults.set()
        fault_thread.join(timeout=15)
        placing.join(timeout=5)
        sup.stop()
        elapsed = time.time() - started
        report = self.report(elapsed, timeline, sup)
        self.keep_final_states()
        if not self.external_redis:
            EmbeddedRedis(self.dir).stop()
        else:
            with contextlib.suppress(Exception):
                self.redis.flushdb()
        return report

    def keep_final_states(self) -> None:
        """Write `final-states.json` (idempotency key -> final state) into the run directory."""
        o = models.orders
        with self.engine.connect() as conn:
            rows = conn.execute(select(o.c.idempotency_key, o.c.state).order_by(o.c.idempotency_key)).all()
        (self.dir / "final-states.json").write_text(json.dumps(dict(rows), indent=0) + "\n")

    def report(self, elapsed: float, timeline: list[dict[str, Any]], sup: Any) -> dict[str, Any]:
        from failfirst.checker import check_store, liveness
        from failfirst.connections import describe_redis

        o = models.orders
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(o.c.state, o.c.attempts, o.c.created_at, o.c.settled_at)
            ).all()
            dlq_rows = conn.execute(
                select(models.dlq.c.order_id, models.dlq.c.parked_from, models.dlq.c.error, models.dlq.c.attempts)
                .where(models.dlq.c.resolved_at.is_(None)).limit(20)
            ).all()
            crashes = conn.execute(select(models.faults.c.kind, models.faults.c.order_id, models.faults.c.at)).all()
        states = Counter(r.state for r in rows)
        attempts = Counter(r.attempts for r in rows)
        lat = sorted((r.settled_at - r.created_at) * 1000 for r in rows if r.settled_at)
        check = check_store(self.engine)
        live = liveness(self.engine)
        n = len(rows)
        completed = states.get(State.COMPLETED, 0) / n if n else 0.0
        dead = states.get(State.DEAD_LETTERED, 0) / n if n else 0.0
        dup_ok = all(a == b for _, a, b in self.duplicates_answered)
        thresholds = [
            {"name": f"completed share >= {self.scn.min_completed:g}", "value": round(completed, 4),
             "ok": completed >= self.scn.min_completed},
            {"name": f"dead-lettered share <= {self.scn.max_dead_lettered:g}", "value": round(dead, 4),
             "ok": dead <= self.scn.max_dead_lettered},
            {"name": "duplicate submissions got the original order back",
             "value": len(self.duplicates_answered), "ok": dup_ok},
        ]
        for entry in crashes:
            self.log.entries.append({"t": round(entry.at - self.log.started, 3), "kind": entry.kind,
                                     "detail": f"order {entry.order_id}"})
        self.log.entries.sort(key=lambda e: e["t"])
        recoveries = []
        for kill in self.kills:
            kill_at = self.log.started + kill["t"]
            after = [t for t in _restart_times(sup) if t >= kill_at]
            if after:
                recoveries.append(round((min(after) - kill_at) * 1000, 1))

        def pct(q: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)

        ok = check.ok and live.ok and all(t["ok"] for t in thresholds)
        return {
            "scenario": self.scn.name,
            "description": self.scn.description,
            "parameters": self.scn.params(),
            "seed": self.scn.seed,
            "run_dir": str(self.dir),
            "store": store.describe(self.settings.database_url),
            "redis": describe_redis(self.settings),
            "orders": n,
            "keys_submitted": len(self.placed),
            "elapsed_s": round(elapsed, 2),
            "throughput_per_s": round(n / elapsed, 1) if elapsed else 0.0,
            "final_states": dict(sorted(states.items())),
            "attempts_histogram": {str(k): v for k, v in sorted(attempts.items())},
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                           "max": round(lat[-1], 1) if lat else None,
                           "mean": round(statistics.fmean(lat), 1) if lat else None},
            "faults": self.log.entries,
            "faults_not_reached": self.unreached(),
            "worker_kills": len(self.kills),
            "kill_recovery_ms": recoveries,
            "dlq": [dict(r._mapping) for r in dlq_rows],
            "invariants": check.to_dict(),
            "liveness": live.to_dict() if hasattr(live, "to_dict") else {"ok": live.ok},
            "thresholds": thresholds,
            "timeline": timeline,
            "ok": ok,
            "replay": replay_command(self.scn, self.source),
        }


def _restart_times(sup: Any) -> list[float]:
    return [ev.at for ev in sup.events if ev.kind == "started"]
