"""The cost model's arithmetic, with known answers."""


import pytest

from metapeft_dist import cost
from metapeft_dist.cost import PowerTracker, SpendMeter

NODES = {
    # 35,040 usd over 4 years (35,040 h) = 1 usd/h; 1 kW at 0.5 usd/kWh = 0.5 usd/h
    "big": {"price_usd": 35040.0, "service_life_years": 4.0, "watts": 1000.0},
    "default": {"price_usd": 8760.0, "service_life_years": 1.0, "watts": 0.0},  # 1 usd/h
}


def test_hourly_rate_is_amortization_plus_energy():
    assert cost.hourly_rate(35040.0, 4.0, 1000.0, 0.5) == pytest.approx(1.5)
    assert cost.hourly_rate(0.0, 1.0, 40.0, 0.30) == pytest.approx(0.012)


def test_spend_is_reserved_seconds_times_rate_summed_over_nodes():
    meter = SpendMeter(NODES, energy_usd_per_kwh=0.5)
    meter.reserve("big", at=0.0)
    meter.reserve("other", at=1800.0)  # not named: the default's 1 usd/h
    meter.release("big", at=3600.0)
    assert meter.reserved_seconds(now=5400.0) == {"big": 3600.0, "other": 3600.0}
    assert meter.spend_usd(now=5400.0) == pytest.approx(1.5 + 1.0)
    # a released node stops costing; a node reserved again adds a new span
    meter.reserve("big", at=7200.0)
    meter.release_all(at=9000.0)
    assert meter.reserved_seconds(now=99999.0) == {"big": 5400.0, "other": 7200.0}
    assert meter.spend_usd(now=99999.0) == pytest.approx(1.5 * 1.5 + 2.0)


def test_spend_meter_finds_a_node_by_alias_and_restores_earlier_sessions():
    meter = SpendMeter({**NODES, "10.0.0.7": NODES["big"]}, energy_usd_per_kwh=0.5)
    meter.add_node("mac-studio", aliases=["10.0.0.7"])
    assert meter.rate_usd_per_hour("mac-studio") == pytest.approx(1.5)
    meter.restore({"mac-studio": 3600.0})
    assert meter.spend_usd(now=0.0) == pytest.approx(1.5)
    summary = meter.summary(now=0.0)
    assert summary["nodes"]["mac-studio"]["watts_source"] == "declared"
    assert summary["spend_usd"] == pytest.approx(1.5)


def test_measured_power_replaces_the_declared_watts():
    meter = SpendMeter(NODES, energy_usd_per_kwh=0.5)
    meter.power_reading("big", 1000.0, at=100.0)
    meter.power_reading("big", 1000.0 + 500.0 * 10, at=110.0)  # 500 W for 10 s
    assert meter.watts("big") == (pytest.approx(500.0), "measured")
    assert meter.rate_usd_per_hour("big") == pytest.approx(1.0 + 0.25)
    meter.power_reading("other", None, at=0.0)  # no reading on this platform
    assert meter.watts("other") == (0.0, "declared")


def test_power_tracker_skips_a_counter_wrap():
    tracker = PowerTracker()
    tracker.add(100.0, 0.0)
    tracker.add(200.0, 1.0)   # 100 W
    tracker.add(50.0, 2.0)    # wrapped: this span is not counted
    tracker.add(150.0, 3.0)   # 100 W
    assert tracker.watts() == pytest.approx(100.0)
    assert PowerTracker().watts() is None


def test_read_energy_sums_packages_only(tmp_path):
    for name, uj in (("intel-rapl:0", 2_000_000), ("intel-rapl:1", 3_000_000),
                     ("intel-rapl:0:0", 9_000_000)):  # a sub-domain, inside package 0
        (tmp_path / name).mkdir()
        (tmp_path / name / "energy_uj").write_text(f"{uj}\n")
    assert cost.read_energy_joules(str(tmp_path)) == pytest.approx(5.0)
    assert cost.read_energy_joules(str(tmp_path / "absent")) is None


def test_break_even_and_amortized_cost():
    # spend 10 usd; a task costs 0.1 usd from the meta-learned init, 0.6 from a standard
    # one: the saving of 0.5 per task pays 10 usd back after 20 tasks.
    assert cost.break_even_tasks(10.0, 0.1, 0.6) == pytest.approx(20.0)
    assert cost.amortized_usd_per_task(10.0, 0.1, 50) == pytest.approx(0.3)
    assert cost.break_even_tasks(10.0, 0.6, 0.6) is None   # saves nothing
    assert cost.break_even_tasks(10.0, None, 0.6) is None  # never reaches the target


def test_cost_summary_computes_rq3_from_the_measurements():
    # 3600 usd/h = 1 usd/s; 0.01 s per step: 2 steps = 0.02 usd, 20 steps = 0.2 usd
    summary = cost.cost_summary(spend_usd=0.9, step_seconds=0.01, rate_usd_per_hour=3600.0,
                                steps_meta=2, steps_standard=20, target=0.7, shots=1)
    assert summary["per_task"]["meta"]["usd"] == pytest.approx(0.02)
    assert summary["per_task"]["standard"]["usd"] == pytest.approx(0.2)
    assert summary["break_even_tasks"] == pytest.approx(5.0)
    at50 = next(p for p in summary["amortized"] if p["tasks"] == 50)
    assert at50["amortized_usd_per_task"] == pytest.approx(0.9 / 50 + 0.02)
    assert summary["rq3"]["ratio"] == pytest.approx(0.2 / 0.038)
    assert summary["rq3"]["met"] is True  # 5.26x >= 5x
    costly = cost.cost_summary(90.0, 0.01, 3600.0, 2, 20, 0.7, 1)
    assert costly["rq3"]["met"] is False and costly["rq3"]["ratio"] < 1
    never = cost.cost_summary(0.9, 0.01, 3600.0, None, 20, 0.7, 1)
    assert never["break_even_tasks"] is None and never["amortized"] == []
    assert never["rq3"]["ratio"] is None and not never["rq3"]["met"]


def test_a_standard_init_short_of_the_target_is_charged_its_budget_as_a_bound():
    from metapeft_dist.results import cost_line

    # 1 usd/s; the meta-learned init 2 steps of 0.01 s; the standard init fine-tuned with
    # its own 0.02 s steps, 200 of them without reaching the target: at least 4 usd
    summary = cost.cost_summary(0.9, 0.01, 3600.0, 2, None, 0.7, 5,
                                standard_step_seconds=0.02, standard_budget=200,
                                standard_how="Adam")
    standard = summary["per_task"]["standard"]
    assert standard == {"steps_to_target": None, "usd": pytest.approx(4.0), "reached": False,
                        "steps_charged": 200, "step_seconds": 0.02, "how": "Adam"}
    assert summary["bounds"] and summary["rq3"]["lower_bound"]
    assert summary["break_even_tasks"] == pytest.approx(0.9 / (4.0 - 0.02))
    assert summary["rq3"]["ratio"] == pytest.approx(4.0 / (0.9 / 50 + 0.02))
    line = cost_line(summary)
    assert "at least 4 USD (not reached in 200 steps) from a standard init" in line
    assert "break-even after at most 0 tasks" in line and "at least 105x cheaper" in line
    reached = cost.cost_summary(0.9, 0.01, 3600.0, 2, 50, 0.7, 5,
                                standard_step_seconds=0.02, standard_budget=200)
    assert reached["per_task"]["standard"]["usd"] == pytest.approx(1.0)
    assert not reached["bounds"] and not reached["rq3"]["lower_bound"]


def test_served_grid_includes_the_rq3_point():
    grid = cost.served_grid(1000)
    assert grid[:6] == [1, 2, 5, 10, 20, 50] and grid[-1] == 1000
    assert all(a < b for a, b in zip(grid, grid[1:], strict=False))
