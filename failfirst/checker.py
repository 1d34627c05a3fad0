"""The invariant checker: proves the DESIGN.md invariants from the records alone.

It reads the audit log (order_events), the providers' ledgers (charges, refunds,
reservations, releases), stock, the outbox and the DLQ, never the code that wrote
them, so a bug in the pipeline cannot hide itself by also being in the checker.

Every check is one or a few set-based queries (GROUP BY, anti-joins, LAG/LEAD
window functions) that return only offending ids: a clean store of 100k orders
costs a handful of scans, not 100k round trips. Witnesses (the rows that show a
violation) are fetched only for the first `MAX_OFFENDERS` offenders.

All queries run in one read transaction so the verdicts describe one snapshot:
on SQLite a deferred BEGIN on a read-only engine (WAL gives a stable snapshot
without taking the writers' lock), on other databases REPEATABLE READ.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.sql.elements import ColumnElement

from failfirst import models
from failfirst.states import SETTLED, State, is_legal

MAX_OFFENDERS = 10
_SETTLED = sorted(s.value for s in SETTLED)
_DL = State.DEAD_LETTERED.value
_CANCELLED = State.CANCELLED.value


@dataclass(frozen=True)
class Offender:
    """One offending record: an order id (a SKU for invariant 3) and what shows it."""

    order_id: int | str
    witness: str

    def to_dict(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "witness": self.witness}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one invariant: how many records break it and the first few witnesses."""

    number: int
    name: str
    kind: str
    ok: bool
    count: int
    offenders: list[Offender] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "kind": self.kind,
            "ok": self.ok,
            "count": self.count,
            "offenders": [o.to_dict() for o in self.offenders],
        }


@dataclass(frozen=True)
class CheckReport:
    """The safety verdicts of one snapshot; liveness rides along but is not part of `ok`.

    Liveness depends on a deadline only the caller knows (a chaos run waits,
    `failfirst check` does not), so callers combine it themselves.
    """

    verdicts: list[Verdict]
    orders: int
    elapsed_ms: float
    liveness: Verdict | None = None

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "orders": self.orders,
            "elapsed_ms": round(self.elapsed_ms, 1),
            "verdicts": [v.to_dict() for v in self.verdicts],
            "liveness": self.liveness.to_dict() if self.liveness is not None else None,
        }


# ---------------------------------------------------------------- plumbing


def _read_engine(engine: Engine) -> Engine:
    """A read-only (deferred BEGIN) engine on the same SQLite file, so checking never blocks workers."""
    from failfirst import store

    url = engine.url.render_as_string(hide_password=False)
    if store.is_sqlite(url) and store.sqlite_path(url) is not None:
        return store.get_engine(url, readonly=True)
    return engine


def _snapshot(conn: Connection) -> Connection:
    """Ask non-SQLite databases for one snapshot across all the checker's statements."""
    if conn.dialect.name != "sqlite":
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    return conn


class _Collector:
    """Accumulates offending ids with witness text, keeping ids unique and sorted."""

    def __init__(self) -> None:
        self.found: dict[int | str, list[str]] = defaultdict(list)

    def add(self, key: int | str, text: str = "") -> None:
        notes = self.found[key]
        if text and len(notes) < 4:
            notes.append(text)

    def verdict(
        self, number: int, name: str, witness: Any = None, kind: str = "safety"
    ) -> Verdict:
        keys = sorted(self.found, key=lambda k: (isinstance(k, str), k))
        first = keys[:MAX_OFFENDERS]
        extra: dict[int | str, str] = witness(first) if witness is not None and first else {}
        offenders = []
        for k in first:
            parts = [*self.found[k]]
            if extra.get(k):
                parts.append(extra[k])
            offenders.append(Offender(k, "; ".join(parts)))
        return Verdict(number, name, kind, not keys, len(keys), offenders)


def _history(conn: Connection, order_ids: Sequence[int | str]) -> dict[int | str, str]:
    """Each order's event path, `v1 -> CREATED, v2 CREATED->PAYMENT_PENDING, ...`, as a witness."""
    ids = [i for i in order_ids if isinstance(i, int)]
    if not ids:
        return {}
    e = models.events
    rows = conn.execute(
        select(e.c.order_id, e.c.version, e.c.from_state, e.c.to_state)
        .where(e.c.order_id.in_(ids))
        .order_by(e.c.order_id, e.c.version, e.c.id)
    ).all()
    paths: dict[int | str, list[str]] = defaultdict(list)
    for r in rows:
        paths[r.order_id].append(f"v{r.version} {r.from_state or '-'}->{r.to_state}")
    out: dict[int | str, str] = {}
    for i in ids:
        steps = paths.get(i, [])
        shown = steps if len(steps) <= 12 else [*steps[:5], "...", *steps[-6:]]
        out[i] = "events: " + (", ".join(shown) if shown else "none")
    return out


# ---------------------------------------------------------------- invariants


def _inv1_no_order_lost(conn: Connection) -> Verdict:
    """An unsettled order with no outbox row is owed work nobody will ever do."""
    o, ob = models.orders, models.outbox
    rows = conn.execute(
        select(o.c.id, o.c.state, o.c.version)
        .select_from(o.outerjoin(ob, ob.c.order_id == o.c.id))
        .where(and_(o.c.state.not_in(_SETTLED), ob.c.order_id.is_(None)))
    ).all()
    c = _Collector()
    for r in rows:
        c.add(r.id, f"state {r.state} v{r.version} with no outbox row")
    return c.verdict(1, "no order lost", lambda ids: _history(conn, ids))


def _unrefunded_cancelled(conn: Connection) -> list[Any]:
    """Charges of CANCELLED orders that have no refund: compensation that never happened."""
    o, ch, rf = models.orders, models.charges, models.refunds
    return conn.execute(
        select(ch.c.order_id, ch.c.id, ch.c.amount_cents)
        .select_from(
            ch.join(o, o.c.id == ch.c.order_id).outerjoin(rf, rf.c.charge_id == ch.c.id)
        )
        .where(and_(o.c.state == _CANCELLED, rf.c.id.is_(None)))
    ).all()


def _charges_witness(conn: Connection, ids: Sequence[int | str]) -> dict[int | str, str]:
    ch, rf = models.charges, models.refunds
    rows = conn.execute(
        select(ch.c.order_id, ch.c.id, ch.c.provider_key, ch.c.amount_cents, rf.c.id.label("refund"))
        .select_from(ch.outerjoin(rf, rf.c.charge_id == ch.c.id))
        .where(ch.c.order_id.in_([i for i in ids if isinstance(i, int)]))
        .order_by(ch.c.order_id, ch.c.id)
    ).all()
    out: dict[int | str, list[str]] = defaultdict(list)
    for r in rows:
        refund = f"refund #{r.refund}" if r.refund is not None else "no refund"
        out[r.order_id].append(f"charge #{r.id} {r.provider_key} {r.amount_cents}c ({refund})")
    return {k: "charges: " + ", ".join(v) for k, v in out.items()}


def _inv2_charged_once(conn: Connection) -> Verdict:
    """Double charges are the costliest bug a retrying pipeline can have; refunds undo cancellations."""
    ch = models.charges
    c = _Collector()
    for r in conn.execute(
        select(ch.c.order_id, func.count().label("n")).group_by(ch.c.order_id).having(func.count() > 1)
    ):
        c.add(r.order_id, f"{r.n} charges")
    for r in _unrefunded_cancelled(conn):
        c.add(r.order_id, f"CANCELLED but charge #{r.id} not refunded")
    return c.verdict(2, "charged at most once, refunded if cancelled", lambda ids: _charges_witness(conn, ids))


def _inv3_stock_conserved(conn: Connection) -> Verdict:
    """Stock is conserved: what is on the shelf plus what live reservations hold is the baseline."""
    p, rs, rl = models.products, models.reservations, models.releases
    held = (
        select(rs.c.sku, func.sum(rs.c.quantity).label("held"))
        .select_from(rs.outerjoin(rl, rl.c.order_id == rs.c.order_id))
        .where(rl.c.id.is_(None))
        .group_by(rs.c.sku)
        .subquery()
    )
    held_q = func.coalesce(held.c.held, 0)
    rows = conn.execute(
        select(p.c.sku, p.c.stock, p.c.baseline, held_q.label("held"))
        .select_from(p.outerjoin(held, held.c.sku == p.c.sku))
        .where(or_(p.c.stock < 0, p.c.stock + held_q != p.c.baseline))
    ).all()
    c = _Collector()
    for r in rows:
        why = "negative stock; " if r.stock < 0 else ""
        c.add(
            r.sku,
            f"SKU {r.sku}: {why}stock {r.stock} + held {r.held} = {r.stock + r.held}, "
            f"baseline {r.baseline}",
        )
    return c.verdict(3, "stock never negative and conserved")


def _inv4_legal_history(conn: Connection) -> Verdict:
    """The event log must be a legal walk of the state machine that ends where the order row is.

    Cost matters here (events outnumber orders several times), so the work is:
    one scan for the distinct (from, to) pairs, judged in Python by
    `states.is_legal` (the one definition of the machine; there are only a few
    pairs); one LAG pass over the events that returns only suspect rows (broken
    first event, gap or duplicate version, broken chain, an illegal pair, or a
    replay out of DEAD_LETTERED, whose legality depends on where it was parked:
    the from_state of the event before it); and one index join of each order
    row with its last event.
    """
    e, o = models.events, models.orders
    c = _Collector()

    pairs = conn.execute(
        select(e.c.from_state, e.c.to_state).where(e.c.from_state.is_not(None)).distinct()
    ).all()
    bad_pairs = [(f, t) for f, t in pairs if f != _DL and not is_legal(f, t)]

    win = {"partition_by": e.c.order_id, "order_by": e.c.version}
    w = select(
        e.c.order_id,
        e.c.version,
        e.c.from_state,
        e.c.to_state,
        func.lag(e.c.to_state).over(**win).label("prev_to"),
        func.lag(e.c.version).over(**win).label("prev_version"),
        func.lag(e.c.from_state).over(**win).label("prev_from"),
    ).cte("ev")
    first = w.c.prev_version.is_(None)
    suspect: list[ColumnElement[bool]] = [
        and_(
            first,
            or_(w.c.from_state.is_not(None), w.c.to_state != State.CREATED.value, w.c.version != 1),
        ),
        and_(
            ~first,
            or_(
                w.c.version != w.c.prev_version + 1,
                w.c.from_state.is_(None),
                w.c.from_state != w.c.prev_to,
            ),
        ),
        w.c.from_state == _DL,
    ]
    if bad_pairs:
        suspect.append(tuple_(w.c.from_state, w.c.to_state).in_(bad_pairs))
    for r in conn.execute(
        select(w).where(or_(*suspect)).order_by(w.c.order_id, w.c.version)
    ):
        if r.prev_version is None:
            if r.from_state is not None or r.to_state != State.CREATED.value or r.version != 1:
                c.add(r.order_id, f"first event v{r.version} {r.from_state or '-'}->{r.to_state}")
            continue
        if r.version != r.prev_version + 1:
            c.add(r.order_id, f"version {r.prev_version} then {r.version}")
        if r.from_state != r.prev_to:
            c.add(r.order_id, f"v{r.version} from {r.from_state or '-'} but previous event ended in {r.prev_to}")
        if r.from_state is None:
            continue
        if r.from_state == _DL:
            # A replay must return where it was parked; with no parked state, only CANCELLED is safe.
            parked = r.prev_from if r.prev_to == _DL else None
            legal = is_legal(r.from_state, r.to_state, parked) and (
                parked is not None or r.to_state == _CANCELLED
            )
            if not legal:
                c.add(
                    r.order_id,
                    f"illegal v{r.version} {r.from_state}->{r.to_state} (parked from {parked or '?'})",
                )
        elif (r.from_state, r.to_state) in bad_pairs:
            c.add(r.order_id, f"illegal v{r.version} {r.from_state}->{r.to_state}")

    # The order row must be where its last event left it.
    last_v = (
        select(e.c.order_id, func.max(e.c.version).label("v")).group_by(e.c.order_id).subquery()
    )
    for r in conn.execute(
        select(o.c.id, o.c.state, o.c.version, e.c.to_state, e.c.version.label("ev_version"))
        .select_from(
            o.join(last_v, last_v.c.order_id == o.c.id).join(
                e, and_(e.c.order_id == last_v.c.order_id, e.c.version == last_v.c.v)
            )
        )
        .where(or_(o.c.state != e.c.to_state, o.c.version != e.c.version))
    ):
        c.add(r.id, f"order is {r.state} v{r.version} but last event is {r.to_state} v{r.ev_version}")
    # An order without events has no history; events without an order have no subject.
    for r in conn.execute(
        select(o.c.id).select_from(o.outerjoin(last_v, last_v.c.order_id == o.c.id)).where(
            last_v.c.order_id.is_(None)
        )
    ):
        c.add(r.id, "order has no events")
    for r in conn.execute(
        select(last_v.c.order_id)
        .select_from(last_v.outerjoin(o, o.c.id == last_v.c.order_id))
        .where(o.c.id.is_(None))
    ):
        c.add(r.order_id, "events for an order that does not exist")
    return c.verdict(4, "event history is a legal path", lambda ids: _history(conn, ids))


def _inv5_one_order_per_key(conn: Connection) -> Verdict:
    """Two orders for one (customer, key) mean a retried request was placed twice."""
    o = models.orders
    dup = (
        select(o.c.customer, o.c.idempotency_key)
        .group_by(o.c.customer, o.c.idempotency_key)
        .having(func.count() > 1)
        .subquery()
    )
    rows = conn.execute(
        select(o.c.id, o.c.customer, o.c.idempotency_key)
        .select_from(
            o.join(dup, and_(dup.c.customer == o.c.customer, dup.c.idempotency_key == o.c.idempotency_key))
        )
        .order_by(o.c.customer, o.c.idempotency_key, o.c.id)
    ).all()
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        groups[(r.customer, r.idempotency_key)].append(r.id)
    c = _Collector()
    for (customer, key), ids in groups.items():
        for i in ids:
            others = ", ".join(str(x) for x in ids if x != i)
            c.add(i, f"customer {customer} key {key} also placed order(s) {others}")
    return c.verdict(5, "one order per idempotency key")


def _inv6_dlq_matches(conn: Connection) -> Verdict:
    """The DLQ table is the operator's to-do list: it must list exactly the dead letters."""
    o, d = models.orders, models.dlq
    open_rows = (
        select(d.c.order_id, func.count().label("n"))
        .where(d.c.resolved_at.is_(None))
        .group_by(d.c.order_id)
        .subquery()
    )
    n = func.coalesce(open_rows.c.n, 0)
    c = _Collector()
    for r in conn.execute(
        select(o.c.id, n.label("n"))
        .select_from(o.outerjoin(open_rows, open_rows.c.order_id == o.c.id))
        .where(and_(o.c.state == _DL, n != 1))
    ):
        c.add(r.id, f"DEAD_LETTERED with {r.n} open DLQ rows")
    for r in conn.execute(
        select(d.c.order_id, d.c.id, o.c.state)
        .select_from(d.outerjoin(o, o.c.id == d.c.order_id))
        .where(and_(d.c.resolved_at.is_(None), or_(o.c.id.is_(None), o.c.state != _DL)))
    ):
        state = r.state if r.state is not None else "missing"
        c.add(r.order_id, f"open DLQ row #{r.id} but order is {state}")
    return c.verdict(6, "DLQ holds exactly the dead letters", lambda ids: _history(conn, ids))


def _inv7_ledgers_consistent(conn: Connection) -> Verdict:
    """The providers' books must agree with the orders: no orphan charges, no half compensation."""
    o, ch, rs, rl = models.orders, models.charges, models.reservations, models.releases
    c = _Collector()
    for r in conn.execute(
        select(ch.c.order_id, ch.c.id)
        .select_from(ch.outerjoin(o, o.c.id == ch.c.order_id))
        .where(o.c.id.is_(None))
    ):
        c.add(r.order_id, f"charge #{r.id} for an order that does not exist")
    for r in conn.execute(
        select(rs.c.order_id, rs.c.sku, rs.c.quantity)
        .select_from(rs.join(o, o.c.id == rs.c.order_id).outerjoin(rl, rl.c.order_id == rs.c.order_id))
        .where(and_(o.c.state == _CANCELLED, rl.c.id.is_(None)))
    ):
        c.add(r.order_id, f"CANCELLED but reservation of {r.quantity} x {r.sku} not released")
    for r in _unrefunded_cancelled(conn):
        c.add(r.order_id, f"CANCELLED but charge #{r.id} ({r.amount_cents}c) not refunded")
    return c.verdict(7, "ledgers match orders, compensation complete", lambda ids: _charges_witness(conn, ids))


def _liveness(conn: Connection) -> Verdict:
    o = models.orders
    now = time.time()
    c = _Collector()
    for r in conn.execute(
        select(o.c.id, o.c.state, o.c.created_at).where(o.c.state.not_in(_SETTLED)).order_by(o.c.id)
    ):
        c.add(r.id, f"still {r.state} after {now - r.created_at:.1f}s")
    return c.verdict(0, "every order settled", kind="liveness")


CHECKS = (
    _inv1_no_order_lost,
    _inv2_charged_once,
    _inv3_stock_conserved,
    _inv4_legal_history,
    _inv5_one_order_per_key,
    _inv6_dlq_matches,
    _inv7_ledgers_consistent,
)


# ---------------------------------------------------------------- public API


def check_store(engine: Engine) -> CheckReport:
    """Check invariants 1-7 over one snapshot of the store; liveness is attached, not counted."""
    started = time.perf_counter()
    with _read_engine(engine).connect() as raw:
        conn = _snapshot(raw)
        with conn.begin():
            orders = conn.execute(select(func.count()).select_from(models.orders)).scalar_one()
            verdicts = [check(conn) for check in CHECKS]
            live = _liveness(conn)
    return CheckReport(verdicts, orders, (time.perf_counter() - started) * 1000, live)


def liveness(engine: Engine) -> Verdict:
    """Orders not yet COMPLETED, CANCELLED or DEAD_LETTERED; whether that is a failure is the caller's call."""
    with _read_engine(engine).connect() as conn, conn.begin():
        return _liveness(conn)


def render_report(report: CheckReport) -> Any:
    """A Rich table of the verdicts with witnesses, for `failfirst check` without --json."""
    from rich.console import Group
    from rich.table import Table

    table = Table("#", "invariant", "verdict", "violations", "witnesses", title="Invariants")
    rows = [*report.verdicts]
    if report.liveness is not None:
        rows.append(report.liveness)
    for v in rows:
        mark = "[green]ok[/]" if v.ok else "[red]FAIL[/]"
        if v.kind == "liveness":
            mark = "[green]ok[/]" if v.ok else "[yellow]pending[/]"
        witnesses = "\n".join(f"{o.order_id}: {o.witness}"[:160] for o in v.offenders[:3])
        table.add_row(
            "L" if v.kind == "liveness" else str(v.number), v.name, mark, str(v.count), witnesses
        )
    summary = (
        "[bold green]ALL INVARIANTS HOLD[/]" if report.ok else "[bold red]VIOLATIONS FOUND[/]"
    )
    return Group(
        table,
        f"{summary}  ({report.orders} orders checked in {report.elapsed_ms:.0f} ms; "
        "liveness is informational)",
    )
