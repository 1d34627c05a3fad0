"""Chaos scenarios end to end: retry statistics, report files, crash points, kills, Redis faults."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_embedded_redis

Z99 = 2.576


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env=dict(os.environ), capture_output=True, text=True, timeout=timeout,
    )


def run_json(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = run_cli("chaos", "run", *args, "--json", timeout=timeout)
    assert out.stdout.strip(), out.stderr
    return out, json.loads(out.stdout)


def assert_share(observed: int, n: int, expected: float, what: str) -> None:
    half = Z99 * math.sqrt(expected * (1 - expected) / n)
    share = observed / n
    assert abs(share - expected) <= half, f"{what}: {share:.4f} vs {expected} +/- {half:.4f} (n={n})"


def failed_verdicts(report: dict) -> list[dict]:
    bad = [v for v in report["invariants"]["verdicts"] if not v["ok"]]
    if not report["liveness"].get("ok", True):
        bad.append(report["liveness"])
    return bad + [t for t in report["thresholds"] if not t["ok"]]


GEOMETRIC = """\
[load]
orders = 2000
workers = 2
seed = 3
deadline = 120

[faults]
payment_fail = 0.5
inventory_fail = 0.1

[policies]
attempts = 3
inner_attempts = 1
backoff_base = 0.005
backoff_cap = 0.02
"""


def test_retry_statistics_match_geometric_law_within_99_percent_interval(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "geometric.toml"
    path.write_text(GEOMETRIC)
    out, report = run_json(str(path), timeout=300)
    assert out.returncode == 0, failed_verdicts(report)
    n = report["orders"]
    assert n == 2000
    p, k = 0.5, 3
    hist = {int(a): c for a, c in report["attempts_histogram"].items()}
    states = report["final_states"]
    assert sum(hist.values()) == n
    assert set(hist) <= {1, 2, 3}
    dead = states.get("DEAD_LETTERED", 0)
    assert_share(dead, n, p**k, "dead-lettered share")
    for j in (1, 2):
        assert_share(hist.get(j, 0), n, (1 - p) * p ** (j - 1), f"share with exactly {j} attempts")
    assert_share(hist.get(k, 0), n, p ** (k - 1), f"share with {k} attempts")
    charged = n - dead
    assert_share(states.get("CANCELLED", 0), charged, 0.1, "cancelled share of charged orders")


def test_report_file_is_written_as_html_and_svg_with_state_chart(home: Path, tmp_path: Path) -> None:
    html = tmp_path / "run.html"
    out = run_cli("chaos", "run", "demo", "--orders", "60", "--json", "--report", str(html))
    assert out.returncode == 0, out.stderr
    assert html.exists()
    text = html.read_text()
    assert "State over time" in text
    assert "COMPLETED" in text
    svg = tmp_path / "run.svg"
    out = run_cli("chaos", "run", "demo", "--orders", "60", "--json", "--report", str(svg))
    assert out.returncode == 0, out.stderr
    assert svg.exists()
    assert svg.read_text().lstrip().startswith("<svg")


def test_crash_points_scenario_recovers_with_no_second_side_effect(home: Path) -> None:
    out, report = run_json("crash-points", "--orders", "60")
    assert out.returncode == 0, failed_verdicts(report)
    assert report["invariants"]["verdicts"]
    assert not failed_verdicts(report)
    points = {f["kind"] for f in report["faults"] if f["kind"].startswith("crash:")}
    assert len(points) >= 3, points


def test_worker_crashes_scenario_survives_kills(home: Path) -> None:
    out, report = run_json("worker-crashes", "--orders", "150")
    assert out.returncode == 0, failed_verdicts(report)
    assert report["worker_kills"] > 0
    assert report["kill_recovery_ms"]


def test_redis_flush_scenario_passes(home: Path) -> None:
    out, report = run_json("redis-flush", "--orders", "100")
    assert out.returncode == 0, failed_verdicts(report)
    assert "redis-flush" in {f["kind"] for f in report["faults"]}
    assert report["faults_not_reached"] == []


def test_faults_due_after_the_run_settled_are_reported_as_not_reached(home: Path) -> None:
    late = ("demo", "--orders", "20", "--redis-flush", "300", "--latency-storm", "50@300+1",
            "--kill-workers", "0.001")
    out, report = run_json(*late)
    assert out.returncode == 0, failed_verdicts(report)
    missed = {f["kind"]: f["due_s"] for f in report["faults_not_reached"]}
    assert set(missed) == {"redis-flush", "latency-storm", "kill-worker"}, missed
    assert missed["redis-flush"] == missed["latency-storm"] == 300
    assert missed["kill-worker"] > report["elapsed_s"] and report["worker_kills"] == 0
    text = run_cli("chaos", "run", *late)
    assert text.returncode == 0, text.stderr
    assert "not reached" in text.stdout and "redis-flush due at 300s" in text.stdout


@needs_embedded_redis  # failfirst never stops a server it did not start
def test_redis_outage_at_the_first_instant_holds_for_its_whole_window(home: Path) -> None:
    out, report = run_json(
        "demo", "--orders", "30", "--payment-fail", "0", "--inventory-fail", "0", "--redis-outage", "1.5@0"
    )
    assert out.returncode == 0, failed_verdicts(report)
    times = {f["kind"]: f["t"] for f in report["faults"]}
    assert times["redis-up"] - times["redis-down"] >= 1.5
    # Faults start with the run, before the workers are up; no worker can take a job
    # while Redis is down, so nothing settles before it is back.
    settled_early = [
        row for row in report["timeline"]
        if row["t"] < times["redis-up"] and any(row.get(s) for s in ("COMPLETED", "CANCELLED", "DEAD_LETTERED"))
    ]
    assert not settled_early, settled_early[0]


@needs_embedded_redis  # failfirst never stops a server it did not start
def test_redis_outage_and_flush_scenarios_pass(home: Path) -> None:
    out, report = run_json("redis-outage", "--orders", "100")
    assert out.returncode == 0, failed_verdicts(report)
    kinds = {f["kind"] for f in report["faults"]}
    assert {"redis-down", "redis-up"} <= kinds, kinds
    out, report = run_json("redis-flush", "--orders", "100")
    assert out.returncode == 0, failed_verdicts(report)
    kinds = {f["kind"] for f in report["faults"]}
    assert "redis-flush" in kinds, kinds


def test_latency_storm_slows_provider_calls_and_is_logged_with_its_window(home: Path) -> None:
    args = ("demo", "--orders", "80", "--payment-fail", "0", "--inventory-fail", "0", "--seed", "9")
    calm_out, calm = run_json(*args)
    out, report = run_json(*args, "--latency-storm", "200@0+1.5")
    assert calm_out.returncode == 0 and out.returncode == 0, failed_verdicts(report)
    kinds = [f["kind"] for f in report["faults"]]
    assert kinds.index("latency-storm") < kinds.index("latency-storm-end")
    # Logged at the window's edges, on the same clock as every other fault.
    times = {f["kind"]: f["t"] for f in report["faults"]}
    assert (times["latency-storm"], times["latency-storm-end"]) == (0.0, 1.5)
    assert "latency-storm" not in [f["kind"] for f in calm["faults"]]
    # An order charged during the storm waited 200 ms on each of its two provider calls.
    assert report["latency_ms"]["max"] >= 400
    assert calm["latency_ms"]["p50"] < report["latency_ms"]["p50"]


def test_failing_run_prints_a_replay_command_with_every_override(home: Path) -> None:
    out, report = run_json(
        "break-locking", "--orders", "40", "--payment-fail", "0.2", "--inner-attempts", "1",
        "--break", "locking",
    )
    assert out.returncode == 1
    replay = report["replay"]
    for part in ("break-locking", "--seed", "--orders 40", "--payment-fail 0.2", "--inner-attempts 1",
                 "--break locking"):
        assert part in replay, replay
