"""How `failfirst watch` draws a frame, and the loop that redraws it.

`render` is a pure function of two snapshots and the terminal size, so tests
render it into a recording console and read the text. The layout is chosen by
width rather than left to wrap: a line that wraps in a live view breaks every
line under it, so a narrow terminal gets fewer panels instead.

- 110 columns and more: orders per state beside throughput and RQ with its
  workers; the DLQ and the transition feed under them;
- 80 to 109: orders per state, then throughput and RQ in two lines (workers
  counted, not listed), the DLQ and the feed with fewer columns;
- under 80: the header, orders per state and one line each for throughput,
  RQ and the DLQ.

Every cell is cut with an ellipsis instead of wrapping.
"""

from __future__ import annotations

import io
import time
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from failfirst.snapshot import Snapshot, Source, take
from failfirst.states import ALL_STATES

WIDE = 110
NARROW = 80
BARS_FROM = 50

STYLE = {
    "CREATED": "white",
    "PAYMENT_PENDING": "blue",
    "PAYMENT_FAILED": "red",
    "PAYMENT_SUCCESS": "cyan",
    "INVENTORY_RESERVED": "cyan",
    "COMPLETED": "green",
    "CANCELLED": "yellow",
    "DEAD_LETTERED": "bold red",
}


def render(
    snapshot: Snapshot,
    previous: Snapshot | None,
    width: int,
    *,
    height: int | None = None,
    title: str = "",
) -> RenderableType:
    """One frame for a terminal `width` columns wide.

    `height`, when known, is shared out between the DLQ and the feed so the
    frame fits the screen; `title` names what is watched.
    """
    header = _header(snapshot, width, title)
    if width < NARROW:
        return Group(
            header,
            _states(snapshot, previous, width, bars=width >= BARS_FROM),
            _line(_rates_text(snapshot), width),
            _line(_rq_text(snapshot), width),
            _line(_dlq_text(snapshot), width),
        )
    wide = width >= WIDE
    if wide:
        left = width * 11 // 20
        right = Group(_rates(snapshot, width - left), _rq(snapshot, width - left))
        parts: list[RenderableType] = [
            header, _side_by_side(_states(snapshot, previous, left), right, left, width)
        ]
    else:
        summary = Group(_line(_rates_text(snapshot), width - 4), _line(_rq_text(snapshot), width - 4))
        parts = [
            header,
            _states(snapshot, previous, width),
            Panel(summary, title="throughput and RQ", title_align="left", width=width),
        ]
    # What is left of the screen goes a third to the DLQ, the rest to the feed.
    dlq_rows, feed_rows = len(snapshot.dlq), len(snapshot.transitions)
    if height is not None:
        left_over = height - _height(Group(*parts), width)
        dlq_rows = min(dlq_rows, max(1, left_over // 3 - 3))
        feed_rows = min(feed_rows, left_over - 3 - (3 + dlq_rows if snapshot.dlq else 3))
    parts.append(_dlq(snapshot, width, dlq_rows, wide=wide))
    if feed_rows > 0:
        parts.append(_feed(snapshot, feed_rows, wide=wide))
    return Group(*parts)


# ---------------------------------------------------------------- panels


def _header(snap: Snapshot, width: int, title: str) -> Text:
    clock = datetime.fromtimestamp(snap.taken_at).strftime("%H:%M:%S")
    first = Text.assemble(
        ("failfirst watch", "bold"),
        f"  {title}" if title else "",
        f"  {clock}  frame {snap.elapsed_ms:.0f} ms",
    )
    second = Text.assemble(
        f"orders {snap.total}  settled {snap.settled}  ", _db_status(snap), "  ", _redis_status(snap)
    )
    return Text("\n").join(_line(line, width) for line in (first, second))


def _db_status(snap: Snapshot) -> Text:
    if snap.database_error is None:
        return Text("db ok", "green")
    status = Text(f"db unavailable: {snap.database_error}", "bold red")
    if snap.database_as_of is not None:
        stamp = datetime.fromtimestamp(snap.database_as_of).strftime("%H:%M:%S")
        status.append(f" (showing {stamp})", "red")
    return status


def _redis_status(snap: Snapshot) -> Text:
    if snap.redis_up:
        return Text("redis up", "green")
    return Text(f"redis DOWN: {snap.redis_error}", "bold red")


def _states(snap: Snapshot, previous: Snapshot | None, width: int, *, bars: bool = True) -> Panel:
    table = Table.grid(padding=(0, 1))
    table.add_column("state", no_wrap=True, overflow="ellipsis")
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("delta", justify="right", no_wrap=True, width=6)
    bar_width = max(0, width - 4 - 18 - 8 - 6 - 3) if bars else 0
    if bar_width:
        table.add_column("bar", no_wrap=True, width=bar_width)
    total = snap.total
    for state in (s.value for s in ALL_STATES):
        count = snap.states.get(state, 0)
        before = previous.states.get(state, 0) if previous else None
        cells: list[RenderableType] = [Text(state, STYLE[state]), str(count), _delta(count, before)]
        if bar_width:
            cells.append(Text("█" * round(bar_width * count / total) if total else "", STYLE[state]))
        table.add_row(*cells)
    return Panel(table, title="orders by state", title_align="left", width=width)


def _delta(now: int, before: int | None) -> Text:
    if before is None or now == before:
        return Text("")
    change = now - before
    return Text(f"{change:+d}", "green" if change > 0 else "magenta")


def _rates_text(snap: Snapshot) -> str:
    return (
        f"{snap.throughput:.1f} settled/s over {snap.window_s:.0f}s  "
        f"p50 {_ms(snap.p50_ms)}  p99 {_ms(snap.p99_ms)}"
    )


def _rates(snap: Snapshot, width: int) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_row("settled / s", f"{snap.throughput:.1f}")
    table.add_row("settled in window", str(snap.settled_in_window))
    table.add_row("p50 settlement", _ms(snap.p50_ms))
    table.add_row("p99 settlement", _ms(snap.p99_ms))
    table.add_row("DLQ open", Text(str(snap.dlq_open), "bold red" if snap.dlq_open else ""))
    return Panel(table, title=f"last {snap.window_s:.0f} s", title_align="left", width=width)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.0f} ms"


def _rq_text(snap: Snapshot) -> Text:
    if not snap.redis_up:
        return Text(f"RQ: redis DOWN ({snap.redis_error})", "bold red")
    busy = sum(1 for w in snap.workers if w.job_id)
    return Text(
        f"RQ {snap.queue}: {snap.queued} queued  {snap.scheduled} scheduled  {snap.started} started  "
        f"{snap.failed} failed  workers {len(snap.workers)} ({busy} busy)"
    )


def _rq(snap: Snapshot, width: int) -> Panel:
    title = f"RQ queue {snap.queue}"
    if not snap.redis_up:
        body = Text.assemble(
            ("Redis DOWN", "bold red"), f"  {snap.redis_error}\n",
            ("orders, DLQ and transitions still come from the database; RQ returns with Redis", "dim"),
        )
        return Panel(body, title=title, title_align="left", width=width)
    counts = Table.grid(padding=(0, 2))
    for _ in range(4):
        counts.add_column(justify="right", no_wrap=True)
    counts.add_row("queued", "scheduled", "started", "failed")
    counts.add_row(*(str(v) for v in (snap.queued, snap.scheduled, snap.started, snap.failed)))
    parts: list[RenderableType] = [counts]
    if not snap.workers:
        parts.append(Text("no live workers", "dim"))
    else:
        table = Table("worker", "state", "doing", box=None, padding=(0, 1), show_edge=False)
        for col in table.columns:
            col.no_wrap = True
            col.overflow = "ellipsis"
        table.columns[0].max_width = max(8, width // 4)
        table.columns[1].min_width = 4
        for w in snap.workers:
            doing = Text("idle", "dim")
            if w.job_id:
                doing = Text(f"order {w.order_id} " if w.order_id is not None else f"{w.job_id} ")
                if w.order_state:
                    doing.append(w.order_state, STYLE.get(w.order_state, ""))
            table.add_row(w.name, w.state, doing)
        parts.append(table)
    return Panel(Group(*parts), title=title, title_align="left", width=width)


def _dlq_text(snap: Snapshot) -> Text:
    return Text(f"DLQ: {snap.dlq_open} open", "bold red" if snap.dlq_open else "")


def _dlq(snap: Snapshot, width: int, rows: int, *, wide: bool) -> Panel:
    title = f"DLQ ({snap.dlq_open} open)"
    if not snap.dlq:
        return Panel(Text("empty", "dim"), title=title, title_align="left", width=width)
    columns = ["order", "parked from", "last error", *(["att"] if wide else []), "age"]
    table = Table(*columns, box=None, padding=(0, 1), show_edge=False)
    for col in table.columns:
        col.no_wrap = True
        col.overflow = "ellipsis"
    table.columns[2].ratio = 1
    table.expand = True
    for d in snap.dlq[:rows]:
        cells = [str(d.order_id), Text(d.parked_from, STYLE.get(d.parked_from, "")), d.error]
        if wide:
            cells.append(str(d.attempts))
        cells.append(_age(snap.taken_at - d.created_at))
        table.add_row(*cells)
    return Panel(table, title=title, title_align="left", width=width)


def _feed(snap: Snapshot, rows: int, *, wide: bool) -> Panel:
    columns = ["age", "order", "transition", "att", "reason"] + (["worker"] if wide else [])
    table = Table(*columns, box=None, padding=(0, 1), show_edge=False, expand=True)
    for col in table.columns:
        col.no_wrap = True
        col.overflow = "ellipsis"
    table.columns[4].ratio = 2
    if wide:
        table.columns[5].ratio = 1
    for t in snap.transitions[:rows]:
        style = STYLE.get(t.to_state, "")
        cells: list[RenderableType] = [
            _age(snap.taken_at - t.at), str(t.order_id),
            Text.assemble(
                (t.from_state or "-", STYLE.get(t.from_state or "", "dim")), " → ", (t.to_state, style)
            ),
            str(t.attempt), Text(t.reason, style),
        ]
        if wide:
            cells.append(Text(t.worker, "dim"))
        table.add_row(*cells)
    return Panel(table, title="latest transitions (newest first)", title_align="left")


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


# ---------------------------------------------------------------- layout helpers


def _line(text: str | Text, width: int) -> Text:
    line = text if isinstance(text, Text) else Text(text)
    line.no_wrap = True
    line.overflow = "ellipsis"
    line.truncate(width, overflow="ellipsis")
    return line


def _side_by_side(left: RenderableType, right: RenderableType, left_width: int, width: int) -> Table:
    grid = Table.grid(expand=False)
    grid.add_column(width=left_width, no_wrap=True)
    grid.add_column(width=width - left_width, no_wrap=True)
    grid.add_row(left, right)
    return grid


def _height(renderable: RenderableType, width: int) -> int:
    """Lines `renderable` takes at `width` (rendered off-screen, to size the feed to what is left)."""
    probe = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    return len(probe.render_lines(renderable, probe.options, pad=False))


# ---------------------------------------------------------------- the live view


def live(source: Source, *, interval: float, console: Console | None = None) -> None:
    """Redraw a frame every `interval` seconds until Ctrl-C, in the alternate screen.

    Ctrl-C ends the loop wherever it lands (a query, Redis, the sleep); leaving
    the `Live` context restores the screen and the cursor, and the command
    exits 0. A frame whose database read failed keeps the last good database
    side on screen, marked stale, instead of blanking the counts.
    """
    console = console or Console(highlight=False)
    engine, redis = source.connect()
    previous: Snapshot | None = None
    good: Snapshot | None = None
    try:
        with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                  redirect_stderr=False) as view:
            while True:
                started = time.monotonic()
                snap = take(engine, redis, queue_name=source.queue)
                if snap.database_error is None:
                    good = snap
                elif good is not None:
                    snap = snap.with_database_of(good)
                view.update(
                    render(snap, previous, console.width, height=console.height, title=source.label),
                    refresh=True,
                )
                previous = snap
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return
    finally:
        redis.close()
