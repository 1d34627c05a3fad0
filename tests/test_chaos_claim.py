"""A chaos run against REDIS_URL empties that database, so it takes only one it may empty."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import wait_until
from redis import Redis

from failfirst import config, connections
from failfirst.chaos import claim
from failfirst.processes import terminate


def lab_redis() -> tuple[str, Redis]:
    """The suite's Redis as a REDIS_URL (the embedded server, started here, unless the suite runs on one)."""
    settings = config.load()
    client = connections.get_redis(settings)
    return connections.redis_url(settings, start=False), client


def chaos(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "failfirst", "chaos", "run", "demo", *args],
        env={**os.environ, "REDIS_URL": url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        terminate([proc], group=True)
    return proc.returncode, err


def test_run_refuses_a_database_holding_keys_no_run_wrote_and_leaves_them(home: Path) -> None:
    url, redis = lab_redis()
    redis.set("shop:cart:42", "3 items")
    code, err = finish(chaos(url, "--orders", "5"))
    assert code == 2
    assert err.strip().count("\n") == 0 and "holds 1 key that no chaos run wrote" in err, err
    assert redis.get("shop:cart:42") == b"3 items"
    assert not redis.exists(claim.LIVE)


def test_second_run_on_a_database_in_use_is_refused_and_the_first_is_undisturbed(home: Path) -> None:
    url, redis = lab_redis()
    first = chaos(url, "--orders", "200", "--latency-ms", "20")
    try:
        wait_until(lambda: redis.exists(claim.LIVE), timeout=60)
        code, err = finish(chaos(url, "--orders", "5"))
        assert code == 2 and "in use by chaos run" in err, err
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first_code, first_err = finish(first)
    assert first_code == 0, first_err
    assert redis.dbsize() == 0, "a run leaves its database empty"
    code, err = finish(chaos(url, "--orders", "5"))
    assert code == 0, err


def test_run_that_died_leaves_a_claim_that_expires_and_leftovers_the_next_run_clears(home: Path) -> None:
    url, redis = lab_redis()
    dead = chaos(url, "--orders", "200", "--latency-ms", "20")
    try:
        wait_until(lambda: redis.exists(claim.LIVE), timeout=60)
        wait_until(lambda: redis.dbsize() > 2, timeout=60)  # jobs queued by the run
        os.killpg(dead.pid, signal.SIGKILL)
    finally:
        finish(dead)
    assert 0 < redis.ttl(claim.LIVE) <= claim.LIVE_TTL
    wait_until(lambda: not redis.exists(claim.LIVE), timeout=claim.LIVE_TTL * 3)
    assert redis.exists(claim.OWNER) and redis.dbsize() > 1
    code, err = finish(chaos(url, "--orders", "5"))
    assert code == 0, err
    assert redis.dbsize() == 0
