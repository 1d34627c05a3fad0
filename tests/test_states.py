"""The order state machine on a real SQLite store: legality, audit log, optimistic locking."""

from __future__ import annotations

import itertools
import multiprocessing
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import Engine, func, select, update

from failfirst import config, models, store
from failfirst.gateway import Gateway, PlaceRequest
from failfirst.states import (
    ALL_STATES,
    IllegalTransition,
    StaleVersion,
    State,
    load,
    transition,
)

S = State
# Written from DESIGN.md, independently of failfirst.states.TRANSITIONS.
SPEC: dict[State, set[State]] = {
    S.CREATED: {S.PAYMENT_PENDING, S.CANCELLED, S.DEAD_LETTERED},
    S.PAYMENT_PENDING: {S.PAYMENT_SUCCESS, S.PAYMENT_FAILED, S.CANCELLED, S.DEAD_LETTERED},
    S.PAYMENT_FAILED: {S.PAYMENT_PENDING, S.CANCELLED, S.DEAD_LETTERED},
    S.PAYMENT_SUCCESS: {S.INVENTORY_RESERVED, S.CANCELLED, S.DEAD_LETTERED},
    S.INVENTORY_RESERVED: {S.COMPLETED, S.CANCELLED, S.DEAD_LETTERED},
    S.COMPLETED: set(),
    S.CANCELLED: set(),
}
PARKED_FROM = S.PAYMENT_FAILED  # where a forced DEAD_LETTERED order claims to come from


def spec_legal(frm: str, to: str, parked_from: str | None) -> bool:
    if frm == S.DEAD_LETTERED:
        return to == S.CANCELLED or (parked_from is not None and to == parked_from)
    return State(to) in SPEC[State(frm)]


def engine_for_home() -> Engine:
    return store.open_store(config.load().database_url)


def place(engine: Engine, customer: str = "c1") -> int:
    gw = Gateway(config.load(), engine, None)
    return gw.place(PlaceRequest(customer, "KB-101", 1, uuid.uuid4().hex)).order_id


def force_state(engine: Engine, order_id: int, state: str, parked_from: str | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(models.orders)
            .where(models.orders.c.id == order_id)
            .values(state=state, parked_from=parked_from)
        )


def events_of(engine: Engine, order_id: int) -> list[Any]:
    e = models.events
    with engine.connect() as conn:
        return conn.execute(
            select(e).where(e.c.order_id == order_id).order_by(e.c.id)
        ).all()


def snapshot(engine: Engine, order_id: int):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return load(conn, order_id)


def test_every_pair_of_states_is_legal_or_refused_without_writing(home: Path) -> None:
    engine = engine_for_home()
    checked = 0
    for frm, to in itertools.product(ALL_STATES, ALL_STATES):
        order_id = place(engine)
        parked = PARKED_FROM.value if frm == S.DEAD_LETTERED else None
        force_state(engine, order_id, frm.value, parked)
        before = snapshot(engine, order_id)
        events_before = events_of(engine, order_id)
        assert before is not None and before.state == frm
        legal = spec_legal(frm, to, parked)
        if legal:
            with engine.begin() as conn:
                after = transition(conn, before, to, "test")
            assert after.state == to
            assert after.version == before.version + 1
            stored = snapshot(engine, order_id)
            assert stored.state == to and stored.version == before.version + 1
            evs = events_of(engine, order_id)
            assert len(evs) == len(events_before) + 1
            last = evs[-1]
            assert (last.from_state, last.to_state, last.version) == (
                frm.value, to.value, before.version + 1,
            )
        else:
            with pytest.raises(IllegalTransition), engine.begin() as conn:
                transition(conn, before, to, "test")
            stored = snapshot(engine, order_id)
            assert stored.state == frm and stored.version == before.version
            assert events_of(engine, order_id) == events_before
        checked += 1
    assert checked == len(ALL_STATES) ** 2


def assert_legal_path(evs: list[Any]) -> None:
    assert evs, "an order always has its creation event"
    assert evs[0].from_state is None and evs[0].to_state == S.CREATED and evs[0].version == 1
    parked: str | None = None
    for prev, ev in itertools.pairwise(evs):
        assert ev.version > prev.version, "versions must strictly increase"
        assert ev.version == prev.version + 1
        assert ev.from_state == prev.to_state, "each event starts where the last one ended"
        assert spec_legal(ev.from_state, ev.to_state, parked), (ev.from_state, ev.to_state)
        if ev.to_state == S.DEAD_LETTERED:
            parked = ev.from_state


def test_random_transitions_always_leave_a_legal_event_log(home: Path) -> None:
    engine = engine_for_home()

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.order_id = place(engine)
            self.parked: str | None = None

        @rule(to=st.sampled_from(ALL_STATES))
        def move(self, to: State) -> None:
            current = snapshot(engine, self.order_id)
            before_events = len(events_of(engine, self.order_id))
            if spec_legal(current.state, to, self.parked):
                with engine.begin() as conn:
                    new = transition(conn, current, to, "random")
                assert new.state == to and new.version == current.version + 1
                if to == S.DEAD_LETTERED:
                    self.parked = current.state
                assert len(events_of(engine, self.order_id)) == before_events + 1
            else:
                with pytest.raises(IllegalTransition), engine.begin() as conn:
                    transition(conn, current, to, "random")
                again = snapshot(engine, self.order_id)
                assert (again.state, again.version) == (current.state, current.version)
                assert len(events_of(engine, self.order_id)) == before_events

        @invariant()
        def log_is_a_legal_path(self) -> None:
            evs = events_of(engine, self.order_id)
            assert_legal_path(evs)
            current = snapshot(engine, self.order_id)
            assert current.version == evs[-1].version
            assert current.state == evs[-1].to_state

    run_state_machine_as_test(
        Machine,
        settings=hyp_settings(
            max_examples=25,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_stale_snapshot_raises_stale_version_and_writes_nothing(home: Path) -> None:
    engine = engine_for_home()
    order_id = place(engine)
    old = snapshot(engine, order_id)
    with engine.begin() as conn:
        transition(conn, old, S.PAYMENT_PENDING, "first")
    current = snapshot(engine, order_id)
    events_before = events_of(engine, order_id)
    with pytest.raises(StaleVersion), engine.begin() as conn:
        transition(conn, old, S.CANCELLED, "stale")
    after = snapshot(engine, order_id)
    assert (after.state, after.version) == (current.state, current.version)
    assert after.state == S.PAYMENT_PENDING and after.version == 2
    assert events_of(engine, order_id) == events_before


def _racer(url: str, order_id: int, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: load, meet the other racer, then try the same move."""
    engine = store.open_store(url)
    with engine.connect() as conn:
        order = load(conn, order_id)
    loaded_version = order.version
    barrier.wait(timeout=60)
    try:
        with engine.begin() as conn:
            transition(conn, order, S.PAYMENT_PENDING, "race")
        results.put(("won", loaded_version, None))
    except StaleVersion:
        with engine.connect() as conn:
            seen = load(conn, order_id)
        results.put(("stale", loaded_version, (seen.state, seen.version)))


def test_two_processes_racing_on_one_version_exactly_one_wins(home: Path) -> None:
    url = config.load().database_url
    engine = engine_for_home()
    order_id = place(engine)
    store.dispose_all()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(url, order_id, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    kinds = sorted(o[0] for o in outcomes)
    assert kinds == ["stale", "won"]
    assert all(o[1] == 1 for o in outcomes), "both loaded the same version"
    loser = next(o for o in outcomes if o[0] == "stale")
    assert loser[2] == (S.PAYMENT_PENDING.value, 2)
    engine = engine_for_home()
    evs = events_of(engine, order_id)
    assert len(evs) == 2
    assert_legal_path(evs)
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(models.events)).scalar_one()
    assert n == 2
