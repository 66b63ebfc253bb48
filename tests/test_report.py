"""report.py: every plot a real run has data for is a readable PNG, a plot whose data is
absent is skipped with its reason, the helpers give known answers, and `metapeft report`
turns a bad RUN_DIR into one line and exit 2."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from metapeft_dist import api
from metapeft_dist.cli import main
from metapeft_dist.config import parse_spec
from metapeft_dist.cost import cost_summary
from metapeft_dist.report import (
    ReportError,
    break_even_point,
    load_results,
    metric_scale,
    node_rates,
    ratio_text,
    shot_series,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL = ["training.png", "shots.png", "cost.png", "throughput.png"]

TINY = """
family: {name: sinusoid, shots: 5, query: 5}
algorithm: {name: maml, meta_batch: 4, iterations: 20}
runtime: {mode: local}
eval: {tasks: 20, shots: [5, 10], steps: 3, every: 10, val_tasks: 10}
checkpoint: {every: 0}
metrics: {enabled: false}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run (a few seconds, local mode), written under run.out_dir."""
    out = tmp_path_factory.mktemp("runs")
    spec = parse_spec(TINY, "tiny", overrides=[f"run.out_dir={out}"])
    results = api.run(spec)
    directory = Path(results["run_dir"])
    assert directory.parent == out
    return directory


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _copy_run(run_dir: Path, tmp_path: Path, results: dict) -> Path:
    """A run directory holding ``results`` as its results.json."""
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(run_dir / "spec.yaml", copy_dir / "spec.yaml")
    (copy_dir / "results.json").write_text(json.dumps(results))
    return copy_dir


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert height >= 300 and width >= 500
    assert pixels.std() > 0.01  # more than a blank canvas


# --- a real run -------------------------------------------------------------------------

def test_report_of_a_real_run_writes_every_plot(run_dir):
    results = _results(run_dir)
    assert "cost" in results and "throughput" in results["runtime"]
    report = write_report(run_dir)
    assert report["skipped"] == {}
    assert report["written"] == [str(run_dir / "report" / name) for name in ALL]
    for path in report["written"]:
        assert_png(Path(path))


def test_missing_sections_are_skipped_with_a_reason(run_dir, tmp_path):
    results = _results(run_dir)
    del results["cost"]
    del results["runtime"]["throughput"]
    del results["evaluation"]
    copy_dir = _copy_run(run_dir, tmp_path, results)
    report = write_report(copy_dir, tmp_path / "plots")
    assert report["written"] == [str(tmp_path / "plots" / "training.png")]
    assert set(report["skipped"]) == {"shots.png", "cost.png", "throughput.png"}
    assert "cost" in report["skipped"]["cost.png"]
    assert "throughput" in report["skipped"]["throughput.png"]
    assert "evaluation" in report["skipped"]["shots.png"]
    assert not (tmp_path / "plots" / "cost.png").exists()
    assert_png(tmp_path / "plots" / "training.png")


def test_cost_without_a_curve_is_skipped_and_never_breaking_even_is_drawn(run_dir, tmp_path):
    results = _results(run_dir)
    never = copy.deepcopy(results)
    never["cost"]["break_even_tasks"] = None
    never["cost"]["per_task"]["standard"] = {"steps_to_target": None, "usd": None}
    for point in never["cost"]["amortized"]:
        point["ratio"] = None
    never["cost"]["rq3"].update(ratio=None, met=False)
    report = write_report(_copy_run(run_dir, tmp_path, never), tmp_path / "never")
    assert "cost.png" not in report["skipped"]
    assert_png(tmp_path / "never" / "cost.png")

    results["cost"]["amortized"] = []
    results["cost"]["per_task"]["meta"] = {"steps_to_target": None, "usd": None}
    (tmp_path / "copy" / "results.json").write_text(json.dumps(results))
    report = write_report(tmp_path / "copy", tmp_path / "none")
    assert "never reached the target" in report["skipped"]["cost.png"]


def test_throughput_of_several_nodes_over_a_long_run(run_dir, tmp_path):
    results = _results(run_dir)
    results["runtime"]["throughput"] = {
        "bin_seconds": 8.0, "start": 1.7e9,
        "nodes": {"head": [40, 48, 44, 50] * 30, "worker-1": [0, 20, 24, 22] * 25}}
    report = write_report(_copy_run(run_dir, tmp_path, results), tmp_path / "plots")
    assert "throughput.png" not in report["skipped"]
    assert_png(tmp_path / "plots" / "throughput.png")


def test_a_section_in_an_unexpected_shape_costs_only_its_plot(run_dir, tmp_path):
    results = _results(run_dir)
    results["cost"] = {"spend_usd": 1.0}
    report = write_report(_copy_run(run_dir, tmp_path, results), tmp_path / "plots")
    assert "unexpected shape" in report["skipped"]["cost.png"]
    assert len(report["written"]) == 3


# --- helpers with known answers ---------------------------------------------------------

def test_break_even_point_lies_on_the_amortized_curve_and_the_standard_line():
    # 36 USD/h at 1 s per step: 0.01 USD per step; meta 1 step, standard 11 steps, so
    # each task saves 0.10 USD and 10 USD of meta-training pays off after 100 tasks.
    cost = cost_summary(spend_usd=10.0, step_seconds=1.0, rate_usd_per_hour=36.0,
                        steps_meta=1, steps_standard=11, target=0.5, shots=5)
    tasks, usd = break_even_point(cost)
    assert tasks == pytest.approx(100.0)
    assert usd == pytest.approx(0.11)
    at_100 = next(p for p in cost["amortized"] if p["tasks"] == 100)
    assert at_100["amortized_usd_per_task"] == pytest.approx(usd)


def test_break_even_point_is_none_when_meta_training_never_pays():
    dearer = cost_summary(spend_usd=10.0, step_seconds=1.0, rate_usd_per_hour=36.0,
                          steps_meta=5, steps_standard=3, target=0.5, shots=5)
    assert break_even_point(dearer) is None
    unreached = cost_summary(spend_usd=10.0, step_seconds=1.0, rate_usd_per_hour=36.0,
                             steps_meta=1, steps_standard=None, target=0.5, shots=5)
    assert break_even_point(unreached) is None


def test_ratio_text_against_the_rq3_goal():
    assert ratio_text({"tasks": 50, "goal_ratio": 5.0, "ratio": 8.0, "met": True}) == (
        "at 50 tasks: 8x cheaper than the standard init\nRQ3 goal (5x cheaper): met")
    assert ratio_text({"tasks": 50, "goal_ratio": 5.0, "ratio": 0.25, "met": False}) == (
        "at 50 tasks: 4x the standard init's cost\nRQ3 goal (5x cheaper): not met")
    assert "no ratio" in ratio_text({"tasks": 50, "goal_ratio": 5.0, "ratio": None,
                                     "met": False})


def test_shot_series_picks_the_step_and_orders_shots_numerically():
    entry = {"mean": [0.1, 0.2, 0.3], "ci95": [0.01, 0.02, 0.03]}
    later = {"mean": [0.4, 0.5, 0.6], "ci95": [0.04, 0.05, 0.06]}
    evaluation = {"shots": {"10": {"inits": {"meta": later}},
                            "5": {"inits": {"meta": entry, "random": later}}}}
    assert shot_series(evaluation, 2) == {"meta": [(5, 0.3, 0.03), (10, 0.6, 0.06)],
                                          "random": [(5, 0.6, 0.06)]}


def test_node_rates_are_tasks_per_second_on_bin_edges():
    rates = node_rates({"bin_seconds": 2.0, "start": 0.0, "nodes": {"a": [4, 6], "b": [1]}})
    assert rates == {"a": ([0.0, 2.0, 4.0], [2.0, 3.0]), "b": ([0.0, 2.0], [0.5])}
    # the record's end cuts the run's last bin: 6 tasks in its first 0.5 s = 12 tasks/s
    cut = node_rates({"bin_seconds": 2.0, "start": 10.0, "end": 12.5,
                      "nodes": {"a": [4, 6], "b": [1]}})
    assert cut == {"a": ([0.0, 2.0, 2.5], [2.0, 12.0]), "b": ([0.0, 2.0], [0.5])}


def test_accuracy_is_shown_in_percent():
    assert metric_scale("accuracy")[0] == 100.0
    assert metric_scale("mse")[0] == 1.0


def test_load_results_names_the_problem(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_results(tmp_path / "missing")
    with pytest.raises(ReportError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="JSON object"):
        load_results(tmp_path)


# --- the command ------------------------------------------------------------------------

def test_cli_prints_the_paths_written(run_dir, tmp_path):
    out = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == [str(tmp_path / "r" / name) for name in ALL]
    assert out.stderr == ""


def test_cli_json_and_skipped_plots(run_dir, tmp_path):
    results = _results(run_dir)
    del results["cost"]
    copy_dir = _copy_run(run_dir, tmp_path, results)
    out = CliRunner().invoke(main, ["report", str(copy_dir), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["written"] == [str(copy_dir / "report" / name)
                                 for name in ALL if name != "cost.png"]
    assert list(report["skipped"]) == ["cost.png"]

    out = CliRunner().invoke(main, ["report", str(copy_dir)])
    assert out.exit_code == 0
    assert out.stderr.splitlines() == [f"skipped cost.png: {report['skipped']['cost.png']}"]


@pytest.mark.parametrize("case", ["missing", "no_results", "not_json"])
def test_cli_bad_run_dir_one_line_exit_2(tmp_path, case):
    directory = tmp_path / "run"
    if case != "missing":
        directory.mkdir()
    if case == "not_json":
        (directory / "results.json").write_text('{"job": "cut off')
    out = CliRunner().invoke(main, ["report", str(directory)])
    assert out.exit_code == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert str(directory) in lines[0]
    assert {"missing": "does not exist", "no_results": "no results.json",
            "not_json": "not valid JSON"}[case] in lines[0]
    assert "Traceback" not in out.output and out.stdout == ""
    assert not (directory / "report").exists()


def test_cli_module_does_not_import_matplotlib():
    code = ("import sys\nimport metapeft_dist.cli\n"
            "assert 'matplotlib' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
