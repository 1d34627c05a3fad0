"""The command line: parse, call the layer below, print. No logic lives here.

Heavy libraries (SQLAlchemy, RQ, Rich) are imported inside the commands that
need them, so `failfirst --help` costs little more than importing Typer.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer

from failfirst.errors import FailfirstError
from failfirst.processes import exit_without_collecting

app = typer.Typer(
    help="failfirst: a chaos lab for a resilient order pipeline.",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
)
order_app = typer.Typer(help="Place and inspect orders.", no_args_is_help=True, rich_markup_mode=None)
stock_app = typer.Typer(help="Inspect and set per-SKU stock.", no_args_is_help=True, rich_markup_mode=None)
dlq_app = typer.Typer(help="The dead-letter queue.", no_args_is_help=True, rich_markup_mode=None)
chaos_app = typer.Typer(help="Chaos experiments.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(order_app, name="order")
app.add_typer(stock_app, name="stock")
app.add_typer(dlq_app, name="dlq")
app.add_typer(chaos_app, name="chaos")

JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(highlight=False)


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    from datetime import datetime

    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def money(cents: int) -> str:
    return f"{cents / 100:,.2f}"


# ---------------------------------------------------------------- embedded Redis


@app.command()
def up() -> None:
    """Start the embedded Redis (reused if it already runs)."""
    from failfirst import config
    from failfirst.embedded import EmbeddedRedis

    settings = config.load()
    if settings.redis_url:
        from failfirst.connections import describe_redis

        typer.echo(f"REDIS_URL is set ({describe_redis(settings)}); nothing to start")
        return
    server = EmbeddedRedis(settings.home)
    started = server.start()
    verb = "started" if started else "already running"
    typer.echo(f"embedded redis {verb}: pid {server.pid()}, socket {server.socket}")


@app.command()
def down() -> None:
    """Stop the embedded Redis and remove its socket."""
    from failfirst import config
    from failfirst.embedded import EmbeddedRedis

    settings = config.load()
    if settings.redis_url:
        typer.echo("REDIS_URL is set; failfirst never stops a server it did not start")
        return
    stopped = EmbeddedRedis(settings.home).stop()
    typer.echo("embedded redis stopped" if stopped else "embedded redis was not running")


@app.command()
def status(as_json: bool = JsonOpt) -> None:
    """Show Redis and the database: where, whether they answer, and counts."""
    from failfirst.status import collect

    doc = collect()
    if as_json:
        emit_json(doc)
        return
    r, d = doc["redis"], doc["database"]
    typer.echo(f"redis     {r['where']}: {r['state']}")
    if r.get("note"):
        typer.echo(f"          {r['note']}")
    if r.get("queue") is not None:
        q = r["queue"]
        typer.echo(
            f"          queue {q['name']}: {q['queued']} queued, {q['scheduled']} scheduled, "
            f"{q['started']} started, {q['workers']} workers"
        )
    typer.echo(f"database  {d['url']}: {d['state']}")
    if d.get("orders") is not None:
        counts = ", ".join(f"{k} {v}" for k, v in d["orders"].items()) or "no orders"
        typer.echo(f"          orders: {counts}")
        typer.echo(f"          dlq: {d['dlq']} open")


# ---------------------------------------------------------------- orders


@order_app.command("place")
def order_place(
    customer: str = typer.Option(..., "--customer", "-c", help="Customer id."),
    sku: str = typer.Option(..., "--sku", "-s", help="Product SKU (see `failfirst stock list`)."),
    qty: str = typer.Option(..., "--qty", "-q", help="Quantity, 1..1000."),
    key: str | None = typer.Option(None, "--key", "-k", help="Idempotency key (generated if omitted)."),
    wait: float = typer.Option(5.0, "--wait", help="Seconds to wait on a key whose first request is in flight."),
    as_json: bool = JsonOpt,
) -> None:
    """Place an order (idempotent per customer and key)."""
    from failfirst.gateway import Gateway, PlaceRequest, parse_quantity, validate
    from failfirst.runtime import open_runtime

    request = PlaceRequest(customer, sku, parse_quantity(qty), key)
    validate(request)
    rt = open_runtime()
    result = Gateway(rt.settings, rt.engine, rt.redis).place(request, wait=wait)
    if as_json:
        emit_json(result.to_dict())
        return
    if key is None:
        typer.echo(f"idempotency key: {result.idempotency_key}")
    what = "replayed" if result.replayed else "placed"
    queued = "" if result.replayed or result.enqueued else " (not queued yet: the reconciler will)"
    typer.echo(
        f"order {result.order_id} {what}: {result.quantity} x {result.sku} for {result.customer}, "
        f"{money(result.amount_cents)}, state {result.state}{queued}"
    )


@order_app.command("show")
def order_show(order_id: int = typer.Argument(..., help="Order id."), as_json: bool = JsonOpt) -> None:
    """Show one order with its full event history."""
    from failfirst.records import order_detail
    from failfirst.runtime import open_runtime

    detail = order_detail(open_runtime(redis=False).engine, order_id)
    if as_json:
        emit_json(detail)
        return
    from rich.table import Table

    c = console()
    c.print(
        f"order {detail['id']}  {detail['state']}  v{detail['version']}  "
        f"{detail['quantity']} x {detail['sku']}  {money(detail['amount_cents'])}  "
        f"customer {detail['customer']}  key {detail['idempotency_key']}"
    )
    c.print(
        f"attempts {detail['attempts']}  replays {detail['replays']}  charges {detail['charges']}  "
        f"refunds {detail['refunds']}  last error: {detail['last_error'] or '-'}"
    )
    table = Table("v", "from", "to", "attempt", "reason", "worker", "at")
    for ev in detail["events"]:
        table.add_row(
            str(ev["version"]), ev["from_state"] or "-", ev["to_state"], str(ev["attempt"]),
            ev["reason"], ev["worker"], when(ev["at"]),
        )
    c.print(table)


@order_app.command("list")
def order_list(
    state: str | None = typer.Option(None, "--state", help="Only orders in this state."),
    limit: int = typer.Option(20, "--limit", help="At most this many, newest first."),
    as_json: bool = JsonOpt,
) -> None:
    """List orders, newest first."""
    from failfirst.records import list_orders
    from failfirst.runtime import open_runtime

    rows = list_orders(open_runtime(redis=False).engine, state, limit)
    if as_json:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table("id", "customer", "sku", "qty", "amount", "state", "v", "attempts", "last error")
    for r in rows:
        table.add_row(
            str(r["id"]), r["customer"], r["sku"], str(r["quantity"]), money(r["amount_cents"]),
            r["state"], str(r["version"]), str(r["attempts"]), (r["last_error"] or "")[:40],
        )
    console().print(table)


# ---------------------------------------------------------------- stock


@stock_app.command("list")
def stock_list(as_json: bool = JsonOpt) -> None:
    """Show the catalogue with stock on hand."""
    from failfirst.records import list_stock
    from failfirst.runtime import open_runtime

    rows = list_stock(open_runtime(redis=False).engine)
    if as_json:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table("sku", "name", "price", "stock")
    for r in rows:
        table.add_row(r["sku"], r["name"], money(r["price_cents"]), str(r["stock"]))
    console().print(table)


@stock_app.command("set")
def stock_set(
    sku: str = typer.Argument(..., help="SKU."),
    quantity: int = typer.Argument(..., help="New stock on hand."),
) -> None:
    """Set a SKU's stock on hand."""
    from failfirst.records import set_stock
    from failfirst.runtime import open_runtime

    row = set_stock(open_runtime(redis=False).engine, sku, quantity)
    typer.echo(f"{row['sku']}: stock {row['stock']}")


# ---------------------------------------------------------------- workers


@app.command()
def worker(
    n: int = typer.Option(2, "-n", "--workers", min=1, max=64, help="Worker processes."),
    burst: bool = typer.Option(False, "--burst", help="Exit once every order is settled."),
    quiet: bool = typer.Option(False, "--quiet", help="Print nothing but errors."),
) -> None:
    """Run supervised RQ workers with the scheduler and the reconciler."""
    import signal
    import time

    from failfirst import config
    from failfirst.supervisor import Supervisor, WorkerEvent

    settings = config.load()

    def show(event: WorkerEvent) -> None:
        if not quiet:
            typer.echo(f"{when(event.at)} worker {event.kind} {event.pid or ''} {event.detail}".rstrip())

    sup = Supervisor(settings, count=n, burst=burst, on_event=show)

    def _stop(_signum: int, _frame: object) -> None:
        sup.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    started = time.monotonic()
    sup.start()
    try:
        sup.wait()
    finally:
        sup.stop()
    if not quiet:
        typer.echo(f"workers stopped after {time.monotonic() - started:.1f}s")


# ---------------------------------------------------------------- checker and DLQ


@app.command()
def check(as_json: bool = JsonOpt) -> None:
    """Check the invariants over the current store; exit 1 if any fails."""
    from failfirst.checker import check_store, render_report
    from failfirst.runtime import open_runtime

    report = check_store(open_runtime(redis=False).engine)
    if as_json:
        emit_json(report.to_dict())
    else:
        console().print(render_report(report))
    if not report.ok:
        raise typer.Exit(1)


@dlq_app.command("list")
def dlq_list(as_json: bool = JsonOpt) -> None:
    """List dead-lettered orders."""
    from failfirst.dlq import list_entries, render_entries
    from failfirst.runtime import open_runtime

    rows = list_entries(open_runtime(redis=False).engine)
    if as_json:
        emit_json(rows)
    else:
        console().print(render_entries(rows))


@dlq_app.command("show")
def dlq_show(order_id: int = typer.Argument(..., help="Order id."), as_json: bool = JsonOpt) -> None:
    """Show one dead-lettered order with its error and history."""
    from failfirst.dlq import show_entry
    from failfirst.runtime import open_runtime

    doc = show_entry(open_runtime(redis=False).engine, order_id)
    if as_json:
        emit_json(doc)
    else:
        for k, v in doc.items():
            if k != "events":
                typer.echo(f"{k:>12}: {v}")
        for ev in doc.get("events", []):
            typer.echo(f"  v{ev['version']} {ev['from_state'] or '-'} -> {ev['to_state']}: {ev['reason']}")


@dlq_app.command("replay")
def dlq_replay(
    order_id: int | None = typer.Argument(None, help="Order id (or --all)."),
    all_: bool = typer.Option(False, "--all", help="Replay every open entry."),
) -> None:
    """Re-drive dead letters with a fresh retry budget (idempotent)."""
    from failfirst.dlq import replay
    from failfirst.errors import UsageError
    from failfirst.runtime import open_runtime

    if (order_id is None) == (not all_):
        raise UsageError("give one order id or --all")
    rt = open_runtime()
    for line in replay(rt, None if all_ else order_id):
        typer.echo(line)


@dlq_app.command("cancel")
def dlq_cancel(
    order_id: int | None = typer.Argument(None, help="Order id (or --all)."),
    all_: bool = typer.Option(False, "--all", help="Cancel every open entry."),
) -> None:
    """Compensate (refund, release) and cancel dead letters (idempotent)."""
    from failfirst.dlq import cancel
    from failfirst.errors import UsageError
    from failfirst.runtime import open_runtime

    if (order_id is None) == (not all_):
        raise UsageError("give one order id or --all")
    rt = open_runtime(redis=False)
    for line in cancel(rt, None if all_ else order_id):
        typer.echo(line)


# ---------------------------------------------------------------- watch


@app.command()
def watch(
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between frames."),
    run: str | None = typer.Option(
        None, "--run", help="Watch a chaos run (directory name, unique prefix or `latest`) instead of the store."
    ),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print one frame as JSON on stdout and exit."),
) -> None:
    """A live view of the lab: orders per state, transitions, DLQ, RQ and workers, throughput."""
    from failfirst.dashboard import live, render
    from failfirst.errors import UsageError
    from failfirst.snapshot import resolve, take

    source = resolve(run)
    if once or as_json:
        engine, redis = source.connect()
        try:
            snap = take(engine, redis, queue_name=source.queue)
        finally:
            redis.close()
        if as_json:
            emit_json({"source": source.label, **snap.to_dict()})
        else:
            out = console()
            out.print(render(snap, None, out.width, title=source.label))
        return
    out = console()
    if not out.is_terminal:
        raise UsageError("the live view needs a terminal; use --once or --json for scripts")
    live(source, interval=interval, console=out)


# ---------------------------------------------------------------- chaos


@chaos_app.command("list")
def chaos_list() -> None:
    """List the shipped scenarios."""
    from failfirst.chaos.scenario import available, load

    for name in available():
        typer.echo(f"{name:<22} {load(name).description}")


@chaos_app.command("run")
def chaos_run(
    scenario: str = typer.Argument("demo", help="Scenario name or TOML path."),
    orders: int | None = typer.Option(None, "--orders", min=1),
    workers: int | None = typer.Option(None, "--workers", min=1, max=32),
    hosts: int | None = typer.Option(
        None, "--hosts", min=0, help="Run workers as N independent `failfirst worker` groups (0: one supervisor)."
    ),
    seed: int | None = typer.Option(None, "--seed"),
    payment_fail: float | None = typer.Option(None, "--payment-fail"),
    inventory_fail: float | None = typer.Option(None, "--inventory-fail"),
    ambiguous: float | None = typer.Option(None, "--ambiguous"),
    latency_ms: float | None = typer.Option(None, "--latency-ms", min=0),
    jitter_ms: float | None = typer.Option(None, "--jitter-ms", min=0),
    latency_storm: str | None = typer.Option(
        None, "--latency-storm", help="MS@AT+SECONDS: calls take MS more from AT, for SECONDS."
    ),
    kill_workers: float | None = typer.Option(None, "--kill-workers", min=0, help="SIGKILLs per second."),
    redis_outage: str | None = typer.Option(None, "--redis-outage", help="SECONDS@AT"),
    redis_flush: float | None = typer.Option(None, "--redis-flush", help="AT seconds"),
    duplicates: float | None = typer.Option(None, "--duplicates"),
    crash_at: list[str] = typer.Option([], "--crash-at", help="Crash point (repeatable)."),
    inner_attempts: int | None = typer.Option(
        None, "--inner-attempts", min=1, help="Tenacity attempts inside one delivery."
    ),
    deadline: float | None = typer.Option(None, "--deadline", min=1),
    breaks: list[str] = typer.Option([], "--break", help="Remove one safeguard (repeatable)."),
    as_json: bool = JsonOpt,
    report_file: str | None = typer.Option(None, "--report", help="Write HTML or SVG here."),
) -> None:
    """Run a chaos experiment and prove the invariants from the records."""
    from pathlib import Path

    from failfirst.chaos import scenario as sc
    from failfirst.chaos.report import render, write
    from failfirst.chaos.runner import ChaosRun

    scn = sc.override(
        sc.load(scenario),
        orders=orders, workers=workers, hosts=hosts, seed=seed, payment_fail=payment_fail,
        inventory_fail=inventory_fail, ambiguous=ambiguous, latency_ms=latency_ms,
        jitter_ms=jitter_ms, latency_storm=latency_storm, kill_workers=kill_workers,
        redis_outage=redis_outage, redis_flush=redis_flush, duplicates=duplicates,
        inner_attempts=inner_attempts, deadline=deadline,
        crash_at=tuple(crash_at) or None, breaks=tuple(breaks) or None,
    )
    progress = None
    live = None
    if not as_json and sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
        live.start()

        def progress(counts: dict[str, int], faults: list[Any], elapsed: float) -> None:
            text = "  ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            live.update(f"[{elapsed:5.1f}s] {text}   faults {len(faults)}")

    try:
        report = ChaosRun(scn, scenario, progress=progress).execute()
    finally:
        if live is not None:
            live.stop()
    if report_file:
        write(report, Path(report_file))
    if as_json:
        emit_json(report)
    else:
        console().print(render(report))
    if not report["ok"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------- bench


@app.command()
def bench(
    cases: list[str] = typer.Argument(
        None, help="Cases to run (all by default): pipeline placement latency scaling cli check watch."
    ),
    repeat: int | None = typer.Option(
        None, "--repeat", min=1, help="Runs per case, medians reported (default: 5 for cli and watch, 3 for pipeline and placement, else 1; scaling runs its smaller sizes at least 3 times)."
    ),
    from_file: str | None = typer.Option(None, "--from", help="Render a saved --json document instead of running."),
    as_json: bool = JsonOpt,
) -> None:
    """Measure throughput, latency, scaling and start-up, each against a baseline run beside it."""
    from failfirst import bench as bench_mod
    from failfirst.errors import UsageError

    if from_file is not None:
        from pathlib import Path

        try:
            doc = json.loads(Path(from_file).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read bench document {from_file}: {exc}") from None
    else:
        doc = bench_mod.run(cases or [], repeat, say=lambda msg: sys.stderr.write(f"bench: {msg}\n"))
    if as_json:
        emit_json(doc)
    else:
        out = console()
        if not out.is_terminal:
            out.width = 120  # a file or pipe has no width; keep each row on one line
        out.print(bench_mod.render(doc))
    if doc.get("errors"):
        raise typer.Exit(1)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: expected failures are one line on stderr; bugs keep their traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    exit_without_collecting()
    debug = "--debug" in args or os.environ.get("FAILFIRST_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        code = app(args, prog_name="failfirst", standalone_mode=False)
    except FailfirstError as exc:
        _fail(str(exc), exc.exit_code)
    except typer.TyperException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except Exception as exc:
        translated = _translate(exc)
        if translated is None or debug:
            raise
        _fail(str(translated), translated.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _translate(exc: Exception) -> FailfirstError | None:
    """Map infrastructure errors met mid-command to the one-line form."""
    from failfirst import config

    module = type(exc).__module__
    if module.startswith("redis"):
        from failfirst.connections import unavailable

        return unavailable(config.load(), exc)
    if module.startswith("sqlalchemy"):
        from failfirst import store

        return store.translate(config.load().database_url, exc)
    return None


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"failfirst: error: {message}\n")
    sys.exit(code)
