"""Settings, read once from the environment.

Everything a user can tune lives here so that the CLI, the workers and the chaos
lab agree on one set of knobs. Values are plain dataclasses: a chaos run copies
them with `dataclasses.replace` instead of mutating globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from failfirst.errors import ConfigError


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _float(name: str, default: float, low: float | None = None, high: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{name}={raw!r} must be between {low} and {high}")
    return value


def _int(name: str, default: int, low: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise ConfigError(f"{name}={raw!r} must be at least {low}")
    return value


@dataclass(frozen=True)
class FaultConfig:
    """How the simulated providers misbehave. Rates are per call, in 0..1."""

    payment_fail: float = 0.5
    insufficient_funds: float = 0.0
    ambiguous: float = 0.0
    hang: float = 0.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    inventory_fail: float = 0.1
    call_timeout_ms: float = 2000.0
    seed: int = 0
    ambiguous_first_attempt_only: bool = False
    storm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def storm_delay(self, now: float) -> float:
        """Extra seconds a call takes now: a latency storm is (ms, from, until) in epoch seconds."""
        ms, start, until = self.storm
        return ms / 1000 if ms and start <= now < until else 0.0

    @classmethod
    def from_env(cls) -> FaultConfig:
        return cls(
            payment_fail=_float("FAILFIRST_PAYMENT_FAIL", 0.5, 0, 1),
            insufficient_funds=_float("FAILFIRST_INSUFFICIENT_FUNDS", 0.0, 0, 1),
            ambiguous=_float("FAILFIRST_AMBIGUOUS", 0.0, 0, 1),
            hang=_float("FAILFIRST_HANG", 0.0, 0, 1),
            latency_ms=_float("FAILFIRST_LATENCY_MS", 0.0, 0),
            jitter_ms=_float("FAILFIRST_JITTER_MS", 0.0, 0),
            inventory_fail=_float("FAILFIRST_INVENTORY_FAIL", 0.1, 0, 1),
            call_timeout_ms=_float("FAILFIRST_CALL_TIMEOUT_MS", 2000.0, 1),
            seed=_int("FAILFIRST_SEED", 0),
            ambiguous_first_attempt_only=_env("FAILFIRST_AMBIGUOUS_FIRST_ONLY", "0") == "1",
            storm=_storm(_env("FAILFIRST_STORM", "")),
        )


def _storm(raw: str) -> tuple[float, float, float]:
    if not raw:
        return (0.0, 0.0, 0.0)
    try:
        ms, start, until = (float(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(f"FAILFIRST_STORM={raw!r} must be MS,FROM,UNTIL (epoch seconds)") from None
    return (ms, start, until)


@dataclass(frozen=True)
class RetryConfig:
    """Both retry layers. Durations in seconds so labs can go to milliseconds."""

    inner_attempts: int = 3
    inner_base: float = 0.01
    inner_cap: float = 0.1
    attempts: int = 5
    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0

    @classmethod
    def from_env(cls) -> RetryConfig:
        return cls(
            inner_attempts=_int("FAILFIRST_INNER_ATTEMPTS", 3, 1),
            inner_base=_float("FAILFIRST_INNER_BASE", 0.01, 0),
            inner_cap=_float("FAILFIRST_INNER_CAP", 0.1, 0),
            attempts=_int("FAILFIRST_RETRY_ATTEMPTS", 5, 1),
            base=_float("FAILFIRST_RETRY_BASE", 1.0, 0),
            factor=_float("FAILFIRST_RETRY_FACTOR", 2.0, 1),
            cap=_float("FAILFIRST_RETRY_CAP", 60.0, 0),
        )


@dataclass(frozen=True)
class Breaks:
    """Protections a chaos run may switch off to prove the checker can fail."""

    idempotency: bool = False
    locking: bool = False
    outbox: bool = False
    compensation: bool = False
    payment_keys: bool = False

    NAMES = ("idempotency", "locking", "outbox", "compensation", "payment-keys")

    @classmethod
    def parse(cls, names: str) -> Breaks:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for name in chosen:
            if name not in cls.NAMES:
                raise ConfigError(
                    f"unknown safeguard {name!r}; choose from {', '.join(cls.NAMES)}"
                )
        return cls(**{n.replace("-", "_"): True for n in chosen})

    def names(self) -> list[str]:
        return [n for n in self.NAMES if getattr(self, n.replace("-", "_"))]


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    redis_url: str | None
    queue: str = "orders"
    rate_per_second: float = 20.0
    rate_burst: int = 40
    idempotency_ttl: float = 24 * 3600.0
    idempotency_lock: float = 30.0
    lease_seconds: float = 5.0
    reconcile_interval: float = 1.0
    scheduler_interval: float = 0.2
    faults: FaultConfig = field(default_factory=FaultConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaks: Breaks = field(default_factory=Breaks)
    crash_at: tuple[str, ...] = ()
    crash_rate: float = 0.0

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None


def load() -> Settings:
    """Build settings from the environment; raises ConfigError on a bad value."""
    home = Path(_env("FAILFIRST_HOME", ".failfirst")).expanduser().absolute()
    db_url = os.environ.get("FAILFIRST_DATABASE_URL") or f"sqlite:///{home / 'failfirst.db'}"
    crash = tuple(p for p in _env("FAILFIRST_CRASH_AT", "").split(",") if p)
    breaks = Breaks.parse(_env("FAILFIRST_BREAK", ""))
    return Settings(
        home=home,
        database_url=db_url,
        redis_url=os.environ.get("REDIS_URL") or None,
        queue=_env("FAILFIRST_QUEUE", "orders"),
        rate_per_second=_float("FAILFIRST_RATE_PER_SECOND", 20.0, 0),
        rate_burst=_int("FAILFIRST_RATE_BURST", 40, 1),
        idempotency_ttl=_float("FAILFIRST_IDEMPOTENCY_TTL", 24 * 3600.0, 1),
        idempotency_lock=_float("FAILFIRST_IDEMPOTENCY_LOCK", 30.0, 0.01),
        lease_seconds=_float("FAILFIRST_LEASE_SECONDS", 5.0, 0.1),
        reconcile_interval=_float("FAILFIRST_RECONCILE_INTERVAL", 1.0, 0.01),
        scheduler_interval=_float("FAILFIRST_SCHEDULER_INTERVAL", 0.2, 0.01),
        faults=FaultConfig.from_env(),
        retry=RetryConfig.from_env(),
        breaks=breaks,
        crash_at=crash,
        crash_rate=_float("FAILFIRST_CRASH_RATE", 1.0 if crash else 0.0, 0, 1),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces `settings` in a child process (a worker)."""
    f, r = settings.faults, settings.retry
    env = {
        "FAILFIRST_HOME": str(settings.home),
        "FAILFIRST_DATABASE_URL": settings.database_url,
        "FAILFIRST_QUEUE": settings.queue,
        "FAILFIRST_RATE_PER_SECOND": str(settings.rate_per_second),
        "FAILFIRST_RATE_BURST": str(settings.rate_burst),
        "FAILFIRST_IDEMPOTENCY_TTL": str(settings.idempotency_ttl),
        "FAILFIRST_IDEMPOTENCY_LOCK": str(settings.idempotency_lock),
        "FAILFIRST_LEASE_SECONDS": str(settings.lease_seconds),
        "FAILFIRST_RECONCILE_INTERVAL": str(settings.reconcile_interval),
        "FAILFIRST_SCHEDULER_INTERVAL": str(settings.scheduler_interval),
        "FAILFIRST_PAYMENT_FAIL": str(f.payment_fail),
        "FAILFIRST_INSUFFICIENT_FUNDS": str(f.insufficient_funds),
        "FAILFIRST_AMBIGUOUS": str(f.ambiguous),
        "FAILFIRST_HANG": str(f.hang),
        "FAILFIRST_LATENCY_MS": str(f.latency_ms),
        "FAILFIRST_JITTER_MS": str(f.jitter_ms),
        "FAILFIRST_INVENTORY_FAIL": str(f.inventory_fail),
        "FAILFIRST_CALL_TIMEOUT_MS": str(f.call_timeout_ms),
        "FAILFIRST_SEED": str(f.seed),
        "FAILFIRST_AMBIGUOUS_FIRST_ONLY": "1" if f.ambiguous_first_attempt_only else "0",
        "FAILFIRST_STORM": ",".join(repr(v) for v in f.storm) if f.storm[0] else "",
        "FAILFIRST_INNER_ATTEMPTS": str(r.inner_attempts),
        "FAILFIRST_INNER_BASE": str(r.inner_base),
        "FAILFIRST_INNER_CAP": str(r.inner_cap),
        "FAILFIRST_RETRY_ATTEMPTS": str(r.attempts),
        "FAILFIRST_RETRY_BASE": str(r.base),
        "FAILFIRST_RETRY_FACTOR": str(r.factor),
        "FAILFIRST_RETRY_CAP": str(r.cap),
        "FAILFIRST_BREAK": ",".join(settings.breaks.names()),
        "FAILFIRST_CRASH_AT": ",".join(settings.crash_at),
        "FAILFIRST_CRASH_RATE": str(settings.crash_rate),
    }
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    return env
