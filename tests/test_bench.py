"""`failfirst bench` at toy sizes: the harness runs every case and its figures come from real runs.

Timings are never asserted: the machine is shared and noisy. What is asserted is
that every figure was measured (positive, one raw sample per repeat), that each
ratio is the failfirst figure over its baseline, that targets are judged, and
that the document carries the machine it ran on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from failfirst import bench

pytestmark = pytest.mark.timeout(120)

TINY = bench.Sizes(
    pipeline=20, placement=30, latency=10, latency_rate=50.0, scaling=(10, 20), check=50, watch=50,
    events_per_order=6,
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "failfirst", *args],
        env=os.environ.copy(), capture_output=True, text=True, timeout=60,
    )


def assert_rows_measured(case: dict[str, Any]) -> None:
    assert case["rows"]
    for row in case["rows"]:
        assert row["failfirst"] is not None
        if row["ratio"] is not None:
            assert row["failfirst"] > 0 and row["baseline"] > 0
            assert row["ratio"] == pytest.approx(row["failfirst"] / row["baseline"])
        if row["target"] is not None:
            assert isinstance(row["met"], bool)


def assert_document(doc: dict[str, Any], cases: list[str]) -> None:
    machine = doc["machine"]
    for key in ("cpu_count", "python", "redis_server", "sqlite", "failfirst"):
        assert machine[key], key
    assert doc["date"]
    assert doc["errors"] == {}
    assert list(doc["cases"]) == cases
    assert json.loads(json.dumps(doc)) == doc


def leftovers(root: Path) -> list[int]:
    """Live processes whose command line or environment mentions `root`: a bench must leave none."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if str(root).encode() in text and state != "Z":
            found.append(int(proc.name))
    return found


def test_pipeline_latency_and_scaling_figures_are_computed_from_their_raw_runs(tmp_path: Path) -> None:
    doc = bench.run(["scaling", "pipeline", "latency"], 1, sizes=TINY, workdir=tmp_path / "bench")
    assert leftovers(tmp_path / "bench") == []
    assert_document(doc, ["pipeline", "latency", "scaling"])
    for case in doc["cases"].values():
        assert_rows_measured(case)

    pipeline = doc["cases"]["pipeline"]
    assert len(pipeline["raw"]["runs"]) == 1
    run = pipeline["raw"]["runs"][0]
    assert run["orders"] == 20 and run["failfirst_s"] > 0 and run["rq_s"] > 0
    assert pipeline["rows"][0]["failfirst"] == pytest.approx(20 / run["failfirst_s"])
    assert pipeline["rows"][0]["baseline"] == pytest.approx(20 / run["rq_s"])

    latency = doc["cases"]["latency"]
    assert [len(r) for r in latency["raw"]["failfirst_ms"]] == [10]
    assert [len(r) for r in latency["raw"]["rq_ms"]] == [10]
    assert all(v > 0 for v in latency["raw"]["failfirst_ms"][0])
    assert latency["rows"][0]["failfirst"] == bench.percentile(latency["raw"]["failfirst_ms"][0], 0.5)

    scaling = doc["cases"]["scaling"]
    assert set(scaling["raw"]["runs"]) == {"10", "20"}
    # The short run is repeated (medians compared); the largest runs as often as asked.
    assert [len(scaling["raw"]["runs"][n]) for n in ("10", "20")] == [bench.SMALL_SIZE_RUNS, 1]
    wall, wall_growth, settled, settled_growth = (
        scaling["rows"][:2], scaling["rows"][2], scaling["rows"][3:5], scaling["rows"][5]
    )
    assert wall_growth["ratio"] is None and wall_growth["target"] is None
    assert wall_growth["failfirst"] == pytest.approx(bench.growth(wall[0]["failfirst"], wall[1]["failfirst"]))
    assert isinstance(settled_growth["met"], bool)
    assert settled_growth["failfirst"] == pytest.approx(
        bench.growth(settled[0]["failfirst"], settled[1]["failfirst"])
    )
    span = scaling["raw"]["runs"]["20"][0]["failfirst_settle_span_s"]
    assert 0 < span < scaling["raw"]["runs"]["20"][0]["failfirst_s"]
    assert settled[1]["failfirst"] == pytest.approx(span / 20 * 1000)


def test_placement_and_cli_report_medians_of_every_repeat(tmp_path: Path) -> None:
    doc = bench.run(["placement", "cli"], 2, sizes=TINY, workdir=tmp_path / "bench")
    assert leftovers(tmp_path / "bench") == []
    assert_document(doc, ["placement", "cli"])
    placement, cli_case = doc["cases"]["placement"], doc["cases"]["cli"]
    for case in (placement, cli_case):
        assert case["repeat"] == 2
        assert_rows_measured(case)
    for key in ("failfirst_one_per_s", "rq_one_per_s", "failfirst_loop_per_s", "rq_batch_per_s"):
        assert len(placement["raw"][key]) == 2 and all(v > 0 for v in placement["raw"][key])
    assert placement["rows"][0]["failfirst"] == pytest.approx(
        bench.median(placement["raw"]["failfirst_one_per_s"])
    )
    for key in ("help_ms", "place_ms", "import_typer_ms", "import_sqlmodel_rq_ms"):
        assert len(cli_case["raw"][key]) == 2
    assert cli_case["rows"][0]["baseline"] == pytest.approx(bench.median(cli_case["raw"]["import_typer_ms"]))


def test_check_case_times_a_clean_checker_run_over_a_filled_store(tmp_path: Path) -> None:
    doc = bench.run(["check"], 2, sizes=TINY, workdir=tmp_path / "bench")
    assert_document(doc, ["check"])
    check = doc["cases"]["check"]
    assert_rows_measured(check)
    assert len(check["raw"]["check_s"]) == 2 and len(check["raw"]["scan_s"]) == 2
    assert check["raw"]["report_ok"] == [True, True]


def test_watch_case_times_frames_over_a_filled_store(tmp_path: Path) -> None:
    doc = bench.run(["watch"], 2, sizes=TINY, workdir=tmp_path / "bench")
    assert_document(doc, ["watch"])
    watch = doc["cases"]["watch"]
    assert_rows_measured(watch)
    assert len(watch["raw"]["frame_ms"]) == 2 and watch["raw"]["first_frame_ms"] > 0
    assert watch["raw"]["frame_orders"] == TINY.watch


def test_targets_are_met_or_missed_in_their_own_direction() -> None:
    rate = bench.Row("x", 7.0, 10.0, bench.Target("ratio", ">=", 0.7))
    assert rate.ratio == pytest.approx(0.7) and rate.to_dict()["met"] is True
    slow = bench.Row("x", 30.0, 5.0, bench.Target("failfirst", "<", 25))
    assert slow.to_dict()["met"] is False
    assert bench.Row("x", 1.0, 0.0).ratio is None
    assert bench.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert bench.percentile([float(v) for v in range(1, 101)], 0.99) == 99.0


def test_unknown_case_is_one_line_usage_error() -> None:
    out = cli("bench", "pipline")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pipline" in lines[0] and "pipeline" in lines[0]
    assert out.stdout == ""


def test_from_renders_a_saved_document(tmp_path: Path) -> None:
    doc = {
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_count": 2, "python": "3.11", "redis_server": "6.2", "sqlite": "3.40", "failfirst": "0.1.0"},
        "cases": {
            "pipeline": {
                "rows": [bench.Row("orders/s | no-op jobs/s", 80.0, 100.0, bench.Target("ratio", ">=", 0.7)).to_dict()]
            }
        },
    }
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(doc))
    out = cli("bench", "--from", str(saved))
    assert out.returncode == 0, out.stderr
    assert "pipeline" in out.stdout and "0.80" in out.stdout and "yes" in out.stdout
    saved.write_text("{}")
    bad = cli("bench", "--from", str(saved))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_failing_case_is_recorded_and_the_rest_still_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(_ws: bench.Workspace, _repeat: int) -> bench.Case:
        raise bench.BenchError("workers exited with 1")

    def tiny(_ws: bench.Workspace, repeat: int) -> bench.Case:
        return bench.Case("placement", repeat, rows=[bench.Row("x", 2.0, 4.0)])

    monkeypatch.setitem(bench.RUNNERS, "pipeline", broken)
    monkeypatch.setitem(bench.RUNNERS, "placement", tiny)
    doc = bench.run(["pipeline", "placement"], 1, workdir=tmp_path)
    assert doc["errors"] == {"pipeline": "workers exited with 1"}
    assert doc["all_met"] is False
    assert doc["cases"]["placement"]["rows"][0]["ratio"] == 0.5
