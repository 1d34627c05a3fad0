"""Chaos scenarios: TOML files with a description, load, faults, policies, thresholds.

A scenario is validated whole before anything starts: an unknown key, a value of
the wrong type or a rate outside 0..1 is refused with the file, the key and why.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from failfirst.errors import ConfigError


@dataclass(frozen=True)
class Scenario:
    name: str = "custom"
    description: str = ""
    orders: int = 200
    workers: int = 2
    # 0: one in-process supervisor runs `workers`. N: N independent `failfirst worker`
    # process groups (separate data directories) of `workers` each, killed whole.
    hosts: int = 0
    seed: int = 1
    deadline: float = 60.0
    stock: int = 100000
    duplicates: float = 0.0
    redeliver: float = 0.0
    placers: int = 4
    payment_fail: float = 0.5
    inventory_fail: float = 0.1
    insufficient_funds: float = 0.0
    ambiguous: float = 0.0
    hang: float = 0.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    call_timeout_ms: float = 500.0
    kill_workers: float = 0.0
    redis_outage: str = ""
    latency_storm: str = ""
    redis_flush: float = -1.0
    crash_at: tuple[str, ...] = ()
    crash_rate: float = 0.2
    attempts: int = 5
    backoff_base: float = 0.02
    backoff_cap: float = 0.5
    inner_attempts: int = 3
    lease_seconds: float = 2.0
    breaks: tuple[str, ...] = ()
    min_completed: float = 0.0
    max_dead_lettered: float = 1.0
    thresholds: dict[str, float] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


RATES = {
    "duplicates", "redeliver", "payment_fail", "inventory_fail", "insufficient_funds", "ambiguous", "hang",
    "crash_rate", "min_completed", "max_dead_lettered",
}
SECTIONS = ("load", "faults", "policies", "thresholds")
MAX_HOSTS = 16


def scenario_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent.parent
    return [here.parent / "scenarios", here / "_scenarios"]


def available() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in scenario_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise ConfigError(f"scenario file {path} does not exist")
        return path
    known = available()
    if name_or_path not in known:
        raise ConfigError(
            f"unknown scenario {name_or_path!r}; see `failfirst chaos list` ({', '.join(known)})"
        )
    return known[name_or_path]


def _coerce(path: Path, key: str, value: Any, kind: Any) -> Any:
    where = f"{path}: {key}"
    if kind in ("float",) or kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif kind in ("int",) or kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif kind in ("str",) or kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif "tuple" in str(kind):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        value = tuple(value)
    bare = key.split(".")[-1]
    if bare in RATES and not 0 <= value <= 1:
        raise ConfigError(f"{where}: rate {value} is outside 0..1")
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0 and bare != "redis_flush":
        raise ConfigError(f"{where}: {value} is negative")
    return value


def load(name_or_path: str) -> Scenario:
    path = resolve(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse(path, data)


def parse(path: Path, data: dict[str, Any]) -> Scenario:
    kinds = {f.name: f.type for f in fields(Scenario)}
    values: dict[str, Any] = {"name": path.stem}
    for top, value in data.items():
        if top == "description":
            if not isinstance(value, str):
                raise ConfigError(f"{path}: description: expected a string")
            values["description"] = value.strip()
            continue
        if top not in SECTIONS:
            raise ConfigError(f"{path}: unknown key {top!r}; expected description, {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: [{top}] must be a table")
        for key, item in value.items():
            if top == "thresholds" and key not in ("min_completed", "max_dead_lettered"):
                raise ConfigError(f"{path}: thresholds.{key}: unknown threshold")
            if key not in kinds or key in ("name", "description", "thresholds"):
                raise ConfigError(f"{path}: {top}.{key}: unknown key")
            values[key] = _coerce(path, f"{top}.{key}", item, kinds[key])
    scenario = Scenario(**values)
    validate(scenario, str(path))
    return scenario


def validate(s: Scenario, where: str = "flags") -> None:
    from failfirst.config import Breaks
    from failfirst.pipeline import CRASH_POINTS

    for point in s.crash_at:
        if point not in CRASH_POINTS:
            raise ConfigError(f"{where}: crash point {point!r} unknown; use {', '.join(CRASH_POINTS)}")
    for name in s.breaks:
        if name not in Breaks.NAMES:
            raise ConfigError(f"{where}: safeguard {name!r} unknown; use {', '.join(Breaks.NAMES)}")
    if s.redis_outage:
        parse_outage(s.redis_outage, where)
    if s.latency_storm:
        parse_storm(s.latency_storm, where)
    if s.orders < 1 or s.workers < 1:
        raise ConfigError(f"{where}: orders and workers must be at least 1")
    if s.hosts > MAX_HOSTS:
        raise ConfigError(f"{where}: hosts {s.hosts} is more than {MAX_HOSTS}; use 0 (one supervisor) to {MAX_HOSTS}")


def parse_outage(text: str, where: str = "flags") -> tuple[float, float]:
    try:
        seconds, at = text.split("@")
        return float(seconds), float(at)
    except ValueError:
        raise ConfigError(f"{where}: redis outage {text!r} must look like SECONDS@AT, e.g. 2@3") from None


def parse_storm(text: str, where: str = "flags") -> tuple[float, float, float]:
    """`MS@AT+SECONDS`: from AT seconds into the run, for SECONDS, every provider call takes MS more."""
    try:
        ms, rest = text.split("@")
        at, seconds = rest.split("+")
        parsed = float(ms), float(at), float(seconds)
    except ValueError:
        raise ConfigError(
            f"{where}: latency storm {text!r} must look like MS@AT+SECONDS, e.g. 300@4+3"
        ) from None
    if min(parsed) < 0:
        raise ConfigError(f"{where}: latency storm {text!r} has a negative part")
    return parsed


def override(s: Scenario, **changes: Any) -> Scenario:
    chosen = {k: v for k, v in changes.items() if v is not None}
    for key in chosen:
        if key in RATES and not 0 <= float(chosen[key]) <= 1:
            raise ConfigError(f"--{key.replace('_', '-')} {chosen[key]} is outside 0..1")
    out = replace(s, **chosen)
    validate(out)
    return out
