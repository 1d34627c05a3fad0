"""Rendering a chaos report: Rich for the terminal, HTML or SVG for sharing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATE_ORDER = (
    "CREATED", "PAYMENT_PENDING", "PAYMENT_FAILED", "PAYMENT_SUCCESS",
    "INVENTORY_RESERVED", "COMPLETED", "CANCELLED", "DEAD_LETTERED",
)


def _mark(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]FAIL[/]"


def _backend(report: dict[str, Any]) -> str:
    """Where the run's records live, briefly: the run's own row names its directory."""
    store, redis = str(report.get("store", "?")), str(report.get("redis", "?"))
    db = "SQLite (run.db)" if store.startswith("sqlite") else store
    queue = "embedded Redis" if redis.startswith("embedded") else f"Redis {redis}"
    return f"{db} + {queue}"


def render(report: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_row("scenario", f"{report['scenario']}: {report['description']}")
    head.add_row("seed", str(report["seed"]))
    p = report["parameters"]
    head.add_row("run", f"{Path(report['run_dir']).name} (under runs/ in the data directory)")
    head.add_row("backend", _backend(report))
    workers = f"{p.get('hosts')} hosts x {p['workers']} workers" if p.get("hosts") else f"{p['workers']} workers"
    head.add_row(
        "load",
        f"{report['orders']} orders ({report['keys_submitted']} keys), {workers}, "
        f"{report['elapsed_s']}s, {report['throughput_per_s']} orders/s",
    )
    head.add_row(
        "faults",
        f"payment {p['payment_fail']:g}, inventory {p['inventory_fail']:g}, ambiguous {p['ambiguous']:g}, "
        f"latency {p['latency_ms']:g}+{p['jitter_ms']:g} ms, kills {report['worker_kills']}, "
        f"breaks {', '.join(p['breaks']) or 'none'}",
    )
    lat = report["latency_ms"]
    head.add_row("latency", f"p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms")
    if report["kill_recovery_ms"]:
        rec = sorted(report["kill_recovery_ms"])
        head.add_row("recovery", f"worker replaced in median {rec[len(rec) // 2]} ms after a kill")
    if report.get("faults_not_reached"):
        due = ", ".join(f"{f['kind']} due at {f['due_s']:g}s" for f in report["faults_not_reached"])
        head.add_row("not reached", f"[yellow]{due}: the run ended at {report['elapsed_s']}s, before them[/]")

    states = Table("final state", "orders", title="Final states")
    for s in STATE_ORDER:
        if report["final_states"].get(s):
            states.add_row(s, str(report["final_states"][s]))
    hist = Table("attempts", "orders", title="Payment attempts")
    for k, v in report["attempts_histogram"].items():
        hist.add_row(k, str(v))

    verdicts = Table("#", "check", "verdict", "violations", "witnesses", title="Verdicts")
    for v in report["invariants"]["verdicts"]:
        witness = "; ".join(f"order {o['order_id']}: {o['witness']}" for o in v["offenders"][:3])
        verdicts.add_row(str(v["number"]), v["name"], _mark(v["ok"]), str(v["count"]), witness[:120])
    live = report["liveness"]
    verdicts.add_row("L", "every order settled by the deadline", _mark(live["ok"]), str(live.get("count", 0)), "")
    for t in report["thresholds"]:
        verdicts.add_row("T", t["name"], _mark(t["ok"]), str(t["value"]), "")

    faults = Table("t (s)", "fault", "detail", title="Faults injected (first 15)")
    for f in report["faults"][:15]:
        faults.add_row(str(f["t"]), f["kind"], f["detail"])
    parts: list[Any] = [head, states, hist, verdicts]
    if report["faults"]:
        parts.append(faults)
    if report["dlq"]:
        dlq = Table("order", "parked from", "attempts", "error", title="DLQ (first 20)")
        for d in report["dlq"]:
            dlq.add_row(str(d["order_id"]), d["parked_from"], str(d["attempts"]), d["error"][:60])
        parts.append(dlq)
    verdict = "[bold green]ALL INVARIANTS HOLD[/]" if report["ok"] else "[bold red]VIOLATIONS FOUND[/]"
    parts.append(f"{verdict}   reproduce: {report['replay']}")
    return Group(*parts)


def chart(report: dict[str, Any], width: int = 60) -> Any:
    """Orders per state over time, as stacked text bars (one row per sample)."""
    from rich.table import Table
    from rich.text import Text

    colours = {"COMPLETED": "green", "CANCELLED": "yellow", "DEAD_LETTERED": "red"}
    table = Table("t (s)", "orders per state over time", title="State over time")
    samples = report["timeline"]
    step = max(1, len(samples) // 20)
    total = max(report["orders"], 1)
    for sample in samples[::step]:
        line = Text()
        for s in STATE_ORDER:
            n = sample.get(s, 0)
            if n:
                line.append("█" * max(1, round(n / total * width)), style=colours.get(s, "cyan"))
        table.add_row(str(sample["t"]), line)
    return table


def write(report: dict[str, Any], path: Path) -> None:
    from rich.console import Console

    console = Console(record=True, width=120, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(report))
    console.print(chart(report))
    if path.suffix.lower() == ".svg":
        path.write_text(console.export_svg(title=f"failfirst chaos run {report['scenario']}"))
    else:
        path.write_text(console.export_html())
