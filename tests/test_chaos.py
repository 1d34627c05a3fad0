"""The chaos lab: scenarios are validated, runs pass, safeguards removed make them fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from failfirst.chaos import scenario as sc
from failfirst.chaos.report import render
from failfirst.errors import ConfigError


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env=dict(os.environ), capture_output=True, text=True, timeout=timeout,
    )


def final_states(report: dict) -> dict[str, str]:
    """Kept in the run directory: on PostgreSQL the run's schema is gone by now."""
    return json.loads((Path(report["run_dir"]) / "final-states.json").read_text())


def test_every_shipped_scenario_loads_and_documents_itself() -> None:
    names = sc.available()
    for required in ("demo", "ambiguous-timeouts", "worker-crashes", "redis-outage", "redis-flush",
                     "duplicate-storm", "stock-crunch", "black-friday", "crash-points",
                     "break-idempotency", "break-locking", "break-outbox", "break-compensation",
                     "break-payment-keys"):
        assert required in names
        assert sc.load(required).description


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[faults]\nbogus = 1\n", "faults.bogus: unknown key"),
        ("[faults]\npayment_fail = 1.5\n", "outside 0..1"),
        ("[load]\norders = \"many\"\n", "expected an integer"),
        ("[nonsense]\nx = 1\n", "unknown key 'nonsense'"),
        ("[faults\n", "not valid TOML"),
    ],
)
def test_malformed_scenario_is_rejected_with_file_key_and_reason(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        sc.load(str(path))
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_malformed_scenario_via_cli_is_one_line_and_exit_2(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[faults]\ninventory_fail = -1\n")
    out = run_cli("chaos", "run", str(path))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--latency-storm", "300@four+3"), "MS@AT+SECONDS"),
        (("--latency-storm", "-5@1+1"), "negative"),
        (("--redis-outage", "2at3"), "SECONDS@AT"),
        (("--hosts", "40"), "hosts 40"),
        (("--break", "everything"), "safeguard 'everything' unknown"),
    ],
)
def test_malformed_fault_flags_are_one_line_and_exit_2(home: Path, flags: tuple[str, ...], needle: str) -> None:
    out = run_cli("chaos", "run", "demo", *flags)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and needle in out.stderr, out.stderr
    assert not (home / "runs").exists(), "rejected before anything starts"


def test_demo_run_passes_every_invariant_and_reports_json_and_text(home: Path) -> None:
    out = run_cli("chaos", "run", "demo", "--orders", "120", "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0, report["invariants"]
    assert report["orders"] == 120
    assert sum(report["final_states"].values()) == 120
    assert all(v["ok"] for v in report["invariants"]["verdicts"])
    assert report["latency_ms"]["p50"] is not None
    console = Console(record=True, width=100)
    console.print(render(report))
    text = console.export_text()
    assert Path(report["run_dir"]).name in text
    backend = "SQLite (run.db)" if report["store"].startswith("sqlite") else "search_path"
    assert backend in text
    assert "ALL INVARIANTS HOLD" in text and "reproduce: failfirst chaos run demo --seed" in text


def test_same_seed_gives_same_final_state_per_key_with_one_or_three_workers(home: Path) -> None:
    one = json.loads(run_cli("chaos", "run", "demo", "--orders", "80", "--workers", "1", "--json").stdout)
    three = json.loads(run_cli("chaos", "run", "demo", "--orders", "80", "--workers", "3", "--json").stdout)
    assert final_states(one) == final_states(three)
    assert len(final_states(one)) == 80


@pytest.mark.parametrize(
    ("name", "invariant"),
    [
        ("compensation", 7),
        ("payment-keys", 2),
        ("idempotency", 5),
        ("outbox", 1),
        ("locking", 4),
    ],
)
def test_each_break_scenario_passes_intact_and_fails_with_its_safeguard_removed(
    home: Path, name: str, invariant: int
) -> None:
    intact = run_cli("chaos", "run", f"break-{name}", "--json")
    intact_report = json.loads(intact.stdout)
    assert intact.returncode == 0, intact_report["invariants"]
    broken = run_cli("chaos", "run", f"break-{name}", "--break", name, "--json")
    report = json.loads(broken.stdout)
    assert broken.returncode == 1
    verdict = next(v for v in report["invariants"]["verdicts"] if v["number"] == invariant)
    assert not verdict["ok"]
    assert verdict["offenders"], "the report must name the orders that show the violation"
