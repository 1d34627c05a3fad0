"""Order placement: idempotency (Stripe semantics), rate limit, validation, outbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select, update

from failfirst import config, models, store
from failfirst.connections import get_redis
from failfirst.errors import (
    IdempotencyConflict,
    RateLimited,
    RequestInProgress,
    ValidationError,
)
from failfirst.gateway import ClaimLost, Gateway, PlaceRequest


def count(engine: Engine, table) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def counts(engine: Engine) -> tuple[int, int, int]:
    return count(engine, models.orders), count(engine, models.idem_keys), count(engine, models.outbox)


@pytest.fixture
def engine(home: Path) -> Engine:
    return store.open_store(config.load().database_url)


@pytest.fixture
def gw(engine: Engine) -> Gateway:
    return Gateway(config.load(), engine, None)


def test_same_key_same_body_replays_the_original(gw: Gateway, engine: Engine) -> None:
    req = PlaceRequest("c1", "KB-101", 2, "k-1")
    first = gw.place(req)
    second = gw.place(req)
    assert first.replayed is False
    assert second.replayed is True
    assert second.order_id == first.order_id
    assert {**second.to_dict(), "replayed": False} == first.to_dict()
    assert counts(engine) == (1, 1, 1)


def test_same_key_different_body_is_a_conflict(gw: Gateway, engine: Engine) -> None:
    gw.place(PlaceRequest("c1", "KB-101", 2, "k-1"))
    with pytest.raises(IdempotencyConflict, match="different request"):
        gw.place(PlaceRequest("c1", "KB-101", 3, "k-1"))
    with pytest.raises(IdempotencyConflict):
        gw.place(PlaceRequest("c1", "MS-202", 2, "k-1"))
    assert counts(engine) == (1, 1, 1)


def test_keys_are_scoped_per_customer(gw: Gateway, engine: Engine) -> None:
    a = gw.place(PlaceRequest("c1", "KB-101", 1, "shared"))
    b = gw.place(PlaceRequest("c2", "KB-101", 1, "shared"))
    assert not a.replayed and not b.replayed
    assert a.order_id != b.order_id
    assert counts(engine) == (2, 2, 2)


def _crashed_claim(engine: Engine, req: PlaceRequest, locked_until: float) -> None:
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            insert(models.idem_keys).values(
                customer=req.customer, key=req.key, fingerprint=req.fingerprint(),
                status="in_progress", locked_until=locked_until,
                expires_at=now + 3600, created_at=now,
            )
        )


def test_in_progress_key_answers_in_progress_then_lock_expires(gw: Gateway, engine: Engine) -> None:
    req = PlaceRequest("c1", "KB-101", 1, "crashed")
    _crashed_claim(engine, req, time.time() + 3600)
    with pytest.raises(RequestInProgress):
        gw.place(req, wait=0)
    assert count(engine, models.orders) == 0
    with engine.begin() as conn:
        conn.execute(update(models.idem_keys).values(locked_until=time.time() - 1))
    result = gw.place(req, wait=0)
    assert result.replayed is False
    assert counts(engine) == (1, 1, 1)
    assert gw.place(req, wait=0).order_id == result.order_id
    assert counts(engine) == (1, 1, 1)


def test_short_idempotency_lock_lets_a_retry_take_over(
    home: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAILFIRST_IDEMPOTENCY_LOCK", "0.3")
    settings = config.load()
    gw = Gateway(settings, engine, None)
    req = PlaceRequest("c1", "KB-101", 1, "crashed")
    _crashed_claim(engine, req, time.time() + settings.idempotency_lock)
    with pytest.raises(RequestInProgress):
        gw.place(req, wait=0)
    result = gw.place(req, wait=10)
    assert result.replayed is False
    assert counts(engine) == (1, 1, 1)


def test_claim_taken_over_after_its_lock_expired_cannot_finish_the_key(gw: Gateway, engine: Engine) -> None:
    req = PlaceRequest("c1", "KB-101", 1, "slow")
    lock, replay = gw._claim(req)
    assert lock is not None and replay is None
    # The first request stalls past its lock; a retry takes the key over.
    with engine.begin() as conn:
        conn.execute(update(models.idem_keys).values(locked_until=time.time() - 1))
    taker, _ = gw._claim(req)
    assert taker is not None and taker != lock
    with pytest.raises(ClaimLost):
        gw._create(req, gw.price(req.sku), lock)
    assert count(engine, models.orders) == 0, "the stalled request's order rolled back"
    won = gw._create(req, gw.price(req.sku), taker)
    assert counts(engine) == (1, 1, 1)
    assert gw.place(req, wait=0).order_id == won.order_id


def test_expired_key_is_reusable(gw: Gateway, engine: Engine) -> None:
    first = gw.place(PlaceRequest("c1", "KB-101", 1, "old"))
    with engine.begin() as conn:
        conn.execute(update(models.idem_keys).values(expires_at=time.time() - 1))
    again = gw.place(PlaceRequest("c1", "KB-101", 5, "old"))
    assert again.replayed is False
    assert again.order_id != first.order_id
    assert count(engine, models.orders) == 2
    assert count(engine, models.idem_keys) == 1


def test_twenty_concurrent_processes_with_one_key_make_one_order(home: Path, engine: Engine) -> None:
    settings = config.load()
    redis = get_redis(settings)  # start the embedded server once, before the stampede
    cmd = [sys.executable, "-m", "failfirst", "order", "place", "-c", "c1", "-s", "KB-101",
           "-q", "1", "-k", "same", "--json"]
    procs = [
        subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(20)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outputs.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    ids = {o["order_id"] for o in outputs}
    assert len(outputs) == 20
    assert len(ids) == 1
    assert sum(1 for o in outputs if not o["replayed"]) == 1
    assert counts(engine) == (1, 1, 1)
    assert redis.llen("rq:queue:orders") == 1


def test_rate_limit_refuses_the_third_quick_placement(
    home: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAILFIRST_RATE_PER_SECOND", "1")
    monkeypatch.setenv("FAILFIRST_RATE_BURST", "2")
    settings = config.load()
    gw = Gateway(settings, engine, get_redis(settings))
    gw.place(PlaceRequest("c1", "KB-101", 1, "r1"))
    gw.place(PlaceRequest("c1", "KB-101", 1, "r2"))
    with pytest.raises(RateLimited, match="retry in") as info:
        gw.place(PlaceRequest("c1", "KB-101", 1, "r3"))
    assert 0 < info.value.retry_after <= 1.0
    assert counts(engine) == (2, 2, 2)


@pytest.mark.parametrize(
    "req",
    [
        PlaceRequest("c1", "NOPE-1", 1, "v"),
        PlaceRequest("c1", "KB-101", 0, "v"),
        PlaceRequest("c1", "KB-101", -1, "v"),
        PlaceRequest("c1", "KB-101", 1001, "v"),
        PlaceRequest("", "KB-101", 1, "v"),
        PlaceRequest("c1", "KB-101", 1, "k" * 256),
        PlaceRequest("c1", "KB-101", 1, "a\nb"),
    ],
    ids=["unknown-sku", "qty-0", "qty-neg", "qty-1001", "empty-customer", "key-256", "key-newline"],
)
def test_invalid_requests_raise_and_write_nothing(gw: Gateway, engine: Engine, req: PlaceRequest) -> None:
    with pytest.raises(ValidationError):
        gw.place(req)
    assert counts(engine) == (0, 0, 0)


def test_transient_failure_releases_the_claim_so_a_retry_succeeds(
    gw: Gateway, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_a: object, **_k: object) -> int:
        raise RuntimeError("database hiccup")

    req = PlaceRequest("c1", "KB-101", 1, "flaky")
    with monkeypatch.context() as m:
        m.setattr(Gateway, "_insert_order", boom)
        with pytest.raises(RuntimeError, match="hiccup"):
            gw.place(req)
    assert counts(engine) == (0, 0, 0)
    result = gw.place(req, wait=0)
    assert result.replayed is False
    assert counts(engine) == (1, 1, 1)
