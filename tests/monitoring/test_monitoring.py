"""monitoring/: the Prometheus config, rules and promtool tests pass promtool; every
alert has a firing and a quiet test case; the Grafana JSON is what
metapeft_dist/dashboard.py generates; and every metric a rule or a dashboard query
names is one metapeft exports, a recording rule, or Prometheus' / Ray's own."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from metapeft_dist import dashboard, metrics
from metapeft_dist.cost import SpendMeter, cost_summary

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
CONFIG = MONITORING / "prometheus.yml"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
PROMTOOL_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
DASHBOARD_JSON = MONITORING / "grafana" / "metapeft.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian/Ubuntu: apt-get install prometheus, "
                    "which scripts/setup.sh does; macOS: brew install prometheus)")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    out = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def rules(kind: str) -> list[dict]:
    """Every rule of that kind ("record" or "alert") in monitoring/rules/."""
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend(rule for rule in group["rules"] if kind in rule)
    return found


def promtool_tests() -> list[dict]:
    return [test for path in PROMTOOL_TESTS
            for test in yaml.safe_load(path.read_text())["tests"]]


def dashboard_queries() -> list[str]:
    """The PromQL of every panel, and the metric each query variable reads its values
    from (``label_values(metric, label)``)."""
    built = dashboard.build()
    queries = [t["expr"] for panel in built["panels"] for t in panel.get("targets", [])]
    for variable in built["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"])
            assert metric, variable["query"]
            queries.append(metric.group(1))
    return queries


# --- promtool -----------------------------------------------------------------------------

def test_files_are_there():
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert len(PROMTOOL_TESTS) >= 2
    loaded = yaml.safe_load(CONFIG.read_text())
    assert sorted(loaded["rule_files"]) == ["rules/alerts.yml", "rules/recording.yml"]


def test_prometheus_config_is_valid(promtool):
    out = run_promtool(promtool, "check", "config", str(CONFIG))
    assert "2 rule files found" in out


def test_scrape_config_keeps_the_jobs_own_labels():
    scrapes = {s["job_name"]: s for s in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}
    assert scrapes["metapeft"]["honor_labels"] is True
    assert scrapes["metapeft"]["static_configs"] == [{"targets": ["127.0.0.1:9450"]}]
    assert scrapes["pushgateway"]["honor_labels"] is True
    assert scrapes["ray"]["file_sd_configs"][0]["files"] == [
        "/tmp/ray/prom_metrics_service_discovery.json"]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_is_valid(promtool, path):
    count = len(rules("alert")) if path.name == "alerts.yml" else len(rules("record"))
    out = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {count} rules found" in out


def test_promtool_unit_tests_pass(promtool):
    run_promtool(promtool, "test", "rules", *map(str, PROMTOOL_TESTS))


def test_every_dashboard_query_parses(promtool, tmp_path):
    """promtool has no query checker, so the queries go in as recording rules (with
    Grafana's variables given values)."""
    queries = [q.replace("$__rate_interval", "1m").replace("$job", ".*")
               for q in dashboard_queries()]
    group = {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": q}
                                            for i, q in enumerate(queries)]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    out = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(queries)} rules found" in out


# --- test coverage of the rules -------------------------------------------------------------

def test_every_alert_has_a_firing_and_a_quiet_case():
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in promtool_tests():
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in rules("alert")}
    assert alerts == {"MetapeftJobStalled", "MetapeftWorkerLost", "MetapeftWorkerCannotStart",
                      "MetapeftStalenessTooHigh", "MetapeftCostBudgetExceeded",
                      "MetapeftMetaValidationLossDiverging"}
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (fires | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_and_annotations():
    for rule in rules("alert"):
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_every_recording_rule_is_tested_with_known_values():
    tested = " ".join(case["expr"] for test in promtool_tests()
                      for case in test.get("promql_expr_test", []))
    untested = {rule["record"] for rule in rules("record")
                if not re.search(re.escape(rule["record"]) + r"(?![\w:])", tested)}
    assert untested == set()


# --- the dashboard ----------------------------------------------------------------------------

def test_dashboard_json_is_up_to_date():
    assert DASHBOARD_JSON.read_text() == dashboard.render(), (
        "regenerate: python -m metapeft_dist.dashboard > monitoring/grafana/metapeft.json")


def test_dashboard_layout():
    built = dashboard.build()
    panels = built["panels"]
    assert [p["id"] for p in panels] == list(range(1, len(panels) + 1))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for t in panel["targets"]:
                assert t["datasource"] == panel["datasource"]
    variables = {v["name"]: v for v in built["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["query"] == "label_values(metapeft_job_running, job)"


def test_dashboard_queries_select_the_job():
    """Every metapeft series a panel reads is filtered by the `job` variable."""
    built = dashboard.build()
    for panel in built["panels"]:
        for query in (t["expr"] for t in panel.get("targets", [])):
            for name in metric_names(query):
                if name.startswith("metapeft"):
                    selector = re.escape(name) + r'\{[^}]*job=~"\$job"'
                    assert re.search(selector, query), f"{panel['title']}: {query}"


def test_dashboard_imports_neither_mlx_nor_ray():
    code = ("import sys, metapeft_dist.dashboard as d; d.build(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# --- metric names -------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
          "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of each selector with matchers in a query."""
    return re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL query reads: identifiers that are not functions,
    aggregations, keywords, label names, strings, numbers or durations."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\boffset\s+\S+", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?", " ", s)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", s):
        if s[match.end():].lstrip().startswith("(") or match.group(0).lower() in _WORDS:
            continue
        names.add(match.group(0))
    return names


def test_metric_names_finds_exactly_the_metrics():
    expr = ('histogram_quantile(0.9, sum by (job, le) (rate(a_bucket{job=~"$job", '
            'le!="x y"}[5m]))) > on (job) max by (job) (b) or c unless d offset 5m '
            '+ 1.5 * min_over_time(rec:e:rate1m[1h]) and sum(f) without (node) '
            '/ rate(g[$__rate_interval]) > bool 3e-2')
    assert metric_names(expr) == {"a_bucket", "b", "c", "d", "rec:e:rate1m", "f", "g"}


def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, of everything a JobMetrics registry exposes once
    every recording call was made, and of what push_outcome pushes."""
    spend = SpendMeter({})
    m = metrics.JobMetrics("j", "maml", spend=spend)
    m.job_started("digits", "async", iterations=10, workers_desired=2, staleness=2,
                  budget_usd=1.0)
    spend.add_node("mac-1")
    spend.reserve("mac-1")
    m.workers(2)
    m.chunk_done("mac-1", tasks=4, inner_steps=3, compute_seconds=0.2, busy_seconds=0.25,
                 dispatch_seconds=0.3, bytes_to_workers=100, bytes_from_workers=100, tokens=7)
    m.chunk_lost("mac-1", 4)
    m.update_applied(1, 0.01, staleness=1)
    m.update_dropped(3)
    m.iteration_done(1, 0.5)
    m.validated(0.4, 0.9)
    m.checkpointed()
    m.costs(cost_summary(spend_usd=1.0, step_seconds=0.1, rate_usd_per_hour=0.5,
                         steps_meta=3, steps_standard=30, target=0.9, shots=5))
    m.job_ended("succeeded")
    series: dict[str, set[str]] = {}
    registries = [m.registry]

    def push(gateway, job, registry, **kwargs):
        registries.append(registry)

    with mock.patch.object(metrics, "push_to_gateway", push):
        metrics.push_outcome("127.0.0.1:9091", "j", {
            "status": "succeeded", "finished_timestamp": 1.0, "duration_seconds": 2.0,
            "totals": {"tasks_completed": 4, "outer_updates": 1, "spend_usd": 0.1}})
    assert len(registries) == 2
    for registry in registries:
        for family in registry.collect():
            for sample in family.samples:
                labels = set(sample.labels)
                if registry is not m.registry:
                    labels.add("job")  # the Pushgateway's grouping key
                series.setdefault(sample.name, set()).update(labels)
    return series


def test_every_referenced_metric_exists():
    series = exported_series()
    recorded = {rule["record"] for rule in rules("record")}
    queries = ([rule["expr"] for rule in rules("record") + rules("alert")]
               + dashboard_queries())
    unknown = {}
    for query in queries:
        names = metric_names(query)
        missing = {n for n in names
                   if n not in series and n not in recorded and n != "up"
                   and not n.startswith("ray_")}
        if missing:
            unknown[query] = missing
    assert unknown == {}
    # The exported series the test relies on are really there (not vacuous).
    for name in ("metapeft_tasks_completed_total", "metapeft_inner_loop_seconds_bucket",
                 "metapeft_cost_meta_training_usd_total", "metapeft_node_reserved_seconds_total",
                 "metapeft_cost_task_adaptation_usd", "metapeft_job_succeeded"):
        assert name in series


def test_every_label_matcher_names_a_real_label():
    series = exported_series()
    queries = [rule["expr"] for rule in rules("record") + rules("alert")] + dashboard_queries()
    for query in queries:
        for name, matchers in selectors(_STRING.sub('""', query)):
            if name in series:
                labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
                assert labels <= series[name], f"{name}: {labels - series[name]} in {query}"
