"""The Grafana dashboard for metapeft jobs, generated from code.

    python -m metapeft_dist.dashboard > monitoring/grafana/metapeft.json

The dashboard is plain dicts built by the small functions below, printed with sorted
keys so the checked-in JSON changes only when this file does (tests/monitoring checks
that it is up to date, and that every metric a query names exists). Queries read the
recording rules of monitoring/rules/recording.yml where one exists, else the metrics of
metapeft_dist/metrics.py directly. Two variables: ``datasource`` (any Prometheus) and
``job`` (the spec's name, from ``metapeft_job_running``).

Imports neither mlx nor ray: generating the dashboard needs neither.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from metapeft_dist.cost import RQ3_RATIO, RQ3_TASKS

Panel = dict[str, Any]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job=~"$job"'
WIDTH = 24  # Grafana's grid
TIMESERIES_HEIGHT = 8
STAT_HEIGHT = 4



# --- builders ---------------------------------------------------------------------------

def target(expr: str, legend: str = "") -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True}


def timeseries(title: str, description: str, targets: list[dict[str, Any]], unit: str,
               width: int = 12, minimum: float | None = 0, maximum: float | None = None,
               goal: float | None = None) -> Panel:
    """A graph over time; ``goal`` draws a dashed threshold line (red below, green at
    or above)."""
    defaults: dict[str, Any] = {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 0,
                                                        "spanNulls": False}}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if goal is not None:
        defaults["thresholds"] = goal_thresholds(goal)
        defaults["custom"]["thresholdsStyle"] = {"mode": "dashed"}
    return {
        "type": "timeseries", "title": title, "description": description,
        "datasource": DATASOURCE, "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom",
                               "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "_size": (width, TIMESERIES_HEIGHT),
    }


def stat(title: str, description: str, targets: list[dict[str, Any]], unit: str,
         width: int = 4, decimals: int | None = None,
         thresholds: dict[str, Any] | None = None,
         mappings: list[dict[str, Any]] | None = None) -> Panel:
    """The latest value of each series, large."""
    defaults: dict[str, Any] = {"unit": unit, "mappings": mappings or [],
                                "thresholds": thresholds or neutral_thresholds()}
    if decimals is not None:
        defaults["decimals"] = decimals
    for t in targets:
        t["range"], t["instant"] = False, True
    return {
        "type": "stat", "title": title, "description": description,
        "datasource": DATASOURCE, "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                      "values": False},
                    "colorMode": "value", "graphMode": "none", "justifyMode": "auto",
                    "orientation": "auto", "textMode": "value_and_name"},
        "_size": (width, STAT_HEIGHT),
    }


def neutral_thresholds() -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": "text", "value": None}]}


def goal_thresholds(goal: float) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                          {"color": "green", "value": goal}]}


def value_names(names: dict[str, str]) -> list[dict[str, Any]]:
    """Show a gauge's values as words (1 -> "running")."""
    return [{"type": "value",
             "options": {value: {"text": text, "index": i}
                         for i, (value, text) in enumerate(names.items())}}]


def layout(sections: list[tuple[str, list[Panel]]]) -> list[Panel]:
    """Rows of panels, placed left to right and wrapped at the grid's width, with ids."""
    panels: list[Panel] = []
    y = 0
    for title, members in sections:
        panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}})
        y += 1
        x = row_height = 0
        for panel in members:
            width, height = panel.pop("_size")
            if x + width > WIDTH:
                x, y, row_height = 0, y + row_height, 0
            panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
            panels.append(panel)
            x += width
            row_height = max(row_height, height)
        y += row_height
    for i, panel in enumerate(panels, start=1):
        panel["id"] = i
    return panels


def variables() -> list[dict[str, Any]]:
    job_query = "label_values(metapeft_job_running, job)"
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "includeAll": False,
         "multi": False, "options": [], "refresh": 1, "regex": ""},
        {"name": "job", "label": "Job", "type": "query", "datasource": DATASOURCE,
         "query": job_query, "definition": job_query, "current": {}, "hide": 0,
         "includeAll": True, "allValue": ".*", "multi": True, "options": [],
         "refresh": 2, "regex": "", "sort": 1},
    ]


# --- the panels -------------------------------------------------------------------------

def progress() -> list[Panel]:
    return [
        stat("State", "1 while the job meta-trains or evaluates, 0 once it ended",
             [target(f"max by (job) (metapeft_job_running{{{JOB}}})", "{{job}}")], "none",
             mappings=value_names({"1": "running", "0": "ended"})),
        stat("Meta-training done", "Meta-iterations completed over those planned",
             [target(f"max by (job) (metapeft_meta_iteration{{{JOB}}}) / on (job) "
                     f"max by (job) (metapeft_meta_iterations_planned{{{JOB}}})", "{{job}}")],
             "percentunit", decimals=1),
        stat("Tasks completed", "Task adaptations whose result reached the parameter "
             "server", [target(f"sum by (job) (metapeft_tasks_completed_total{{{JOB}}})",
                               "{{job}}")], "short"),
        stat("Tasks lost", "Task adaptations lost with their worker or node (each one is "
             "dispatched again)",
             [target(f"sum by (job) (metapeft_tasks_failed_total{{{JOB}}})", "{{job}}")],
             "short"),
        stat("Checkpoint age", "Seconds since the newest checkpoint was written (NaN before "
             "the first)",
             [target(f"max by (job) (metapeft_checkpoint_age_seconds{{{JOB}}})", "{{job}}")],
             "s"),
        stat("/metrics scraped", "Whether Prometheus reaches the driver's /metrics "
             "(monitoring/prometheus.yml, job `metapeft`)",
             [target('max by (instance) (up{job="metapeft"})', "{{instance}}")], "none",
             mappings=value_names({"1": "up", "0": "down"})),
    ]


def throughput() -> list[Panel]:
    return [
        timeseries("Throughput (tasks/s)", "Tasks adapted per second, over 1m: the job "
                   "and each node",
                   [target(f"metapeft:tasks_per_second:rate1m{{{JOB}}}", "{{job}} total"),
                    target(f"metapeft:node_tasks_per_second:rate1m{{{JOB}}}",
                           "{{job}} {{node}}")], "short", width=8),
        timeseries("Lost and retried tasks (tasks/s)", "Tasks lost with a worker or "
                   "node, per node, and tasks dispatched again",
                   [target(f"sum by (job, node) (rate(metapeft_tasks_failed_total{{{JOB}}}"
                           "[$__rate_interval]))", "{{job}} lost on {{node}}"),
                    target(f"sum by (job) (rate(metapeft_tasks_retried_total{{{JOB}}}"
                           "[$__rate_interval]))", "{{job}} retried")], "short", width=8),
        timeseries("Parameters on the wire", "Meta-parameter bytes per second sent to "
                   "and received from workers",
                   [target(f"sum by (job, direction) (rate(metapeft_wire_bytes_total{{{JOB}}}"
                           "[$__rate_interval]))", "{{job}} {{direction}}")], "Bps", width=8),
    ]


def workers() -> list[Panel]:
    return [
        timeseries("Worker utilization per node", "Busy worker-seconds per reserved "
                   "node-second over 1m: 100% is one worker never idle; a node with "
                   "several workers can exceed it",
                   [target(f"metapeft:worker_busy_ratio:rate1m{{{JOB}}}", "{{job}} {{node}}")],
                   "percentunit", width=8),
        timeseries("Workers", "Workers answering, those the job runs when all are up, "
                   "and those that could not build the job (their node lacks a package or "
                   "the model; see the run's log)",
                   [target(f"max by (job) (metapeft_workers{{{JOB}}})", "{{job}} answering"),
                    target(f"max by (job) (metapeft_workers_desired{{{JOB}}})",
                           "{{job}} desired"),
                    target(f"max by (job) (metapeft_workers_failed_to_start{{{JOB}}})",
                           "{{job}} could not start")], "short", width=8),
        timeseries("Ray nodes: CPU", "Ray's own per-node metrics (all Ray jobs on the "
                   "cluster, not only this one), through Ray's service discovery",
                   [target("avg by (ip) (ray_node_cpu_utilization)", "{{ip}}")], "percent",
                   width=8, maximum=100),
    ]


def latency() -> list[Panel]:
    def quantiles(rule: str) -> list[dict[str, Any]]:
        return [target(f"metapeft:{rule}:p50_rate5m{{{JOB}}}", "{{job}} p50"),
                target(f"metapeft:{rule}:p90_rate5m{{{JOB}}}", "{{job}} p90")]

    return [
        timeseries("Inner loop (per chunk)", "Inner-loop compute seconds per dispatched "
                   "chunk over 5m: the job's p50 and p90, and each node's p90",
                   quantiles("inner_loop_seconds")
                   + [target(f"metapeft:node_inner_loop_seconds:p90_rate5m{{{JOB}}}",
                             "{{job}} {{node}} p90")], "s", width=8),
        timeseries("Dispatch to result (per chunk)", "Seconds from dispatch to result seen "
                   "by the driver over 5m: compute plus transfer and queueing",
                   quantiles("dispatch_seconds"), "s", width=8),
        timeseries("Parameter-server update", "Outer-update latency over 5m",
                   quantiles("param_server_update_seconds"), "s", width=8),
    ]


def asynchrony() -> list[Panel]:
    return [
        timeseries("Async staleness (versions)", "Versions the meta-parameters moved while "
                   "a result was computed (applied and dropped), over 5m, against "
                   "runtime.staleness: results above the bound are dropped. Async jobs only",
                   [target(f"metapeft:async_staleness_versions:p50_rate5m{{{JOB}}}",
                           "{{job}} p50"),
                    target(f"metapeft:async_staleness_versions:p90_rate5m{{{JOB}}}",
                           "{{job}} p90"),
                    target(f"max by (job) (metapeft_async_staleness_bound_versions{{{JOB}}})",
                           "{{job}} bound")], "short", width=8),
        timeseries("Outer updates (per second)", "Outer updates the parameter server "
                   "applied, and async results it dropped as too stale",
                   [target(f"sum by (job) (rate(metapeft_outer_updates_total{{{JOB}}}"
                           "[$__rate_interval]))", "{{job}} applied"),
                    target(f"sum by (job) (rate(metapeft_outer_updates_dropped_total{{{JOB}}}"
                           "[$__rate_interval]))", "{{job}} dropped")], "short", width=8),
        timeseries("Dropped async results", "Fraction of async results dropped as staler "
                   "than runtime.staleness, over 5m (their compute is wasted)",
                   [target(f"metapeft:outer_updates_dropped_ratio:rate5m{{{JOB}}}",
                           "{{job}}")], "percentunit", width=8, maximum=1),
    ]


def meta_learning() -> list[Panel]:
    return [
        timeseries("Meta-validation and meta-train loss", "Query loss after adaptation: "
                   "on meta-validation tasks, and the last meta-iteration's training tasks",
                   [target(f"max by (job) (metapeft_meta_validation_loss{{{JOB}}})",
                           "{{job}} validation"),
                    target(f"max by (job) (metapeft_meta_train_loss{{{JOB}}})",
                           "{{job}} train")], "short", minimum=None),
        timeseries("Meta-validation accuracy", "Query accuracy after adaptation on "
                   "meta-validation tasks (classification jobs)",
                   [target(f"max by (job) (metapeft_meta_validation_accuracy{{{JOB}}})",
                           "{{job}}")], "percentunit", maximum=1),
    ]


def cost() -> list[Panel]:
    usd = "currencyUSD"
    goal = f"{RQ3_RATIO:g}"
    return [
        stat("Spend so far", "Meta-training spend: reserved seconds x node rate, summed "
             "over nodes",
             [target(f"max by (job) (metapeft_cost_meta_training_usd_total{{{JOB}}})",
                     "{{job}}")], usd, decimals=4),
        stat("Spend rate (usd/h)", "Meta-training spend per hour over 5m (0 once "
             "meta-training ended)",
             [target(f"metapeft:meta_training_usd_per_hour:rate5m{{{JOB}}}", "{{job}}")],
             usd, decimals=3),
        stat("Task cost: meta vs standard init", "Cost of adapting one held-out task to "
             "the target, from the meta-learned init and from a standard one (after "
             "evaluation; no value: that init never reached the target)",
             [target(f"max by (job, init) (metapeft_cost_task_adaptation_usd{{{JOB}}})",
                     "{{job}} {{init}}")], usd, width=6, decimals=5),
        stat(f"Amortized cost per task at {RQ3_TASKS} tasks", f"Spend / {RQ3_TASKS} + the "
             "meta-learned init's task cost",
             [target(f"metapeft:cost_amortized_usd_per_task:{RQ3_TASKS}{{{JOB}}}",
                     "{{job}}")], usd, decimals=5),
        stat(f"Saving at {RQ3_TASKS} tasks (RQ3 goal: {goal}x)", "Standard init's task cost "
             f"over the amortized cost at {RQ3_TASKS} tasks; green when it reaches the "
             f"seed's RQ3 goal of {goal}",
             [target(f"metapeft:cost_saving_ratio:{RQ3_TASKS}{{{JOB}}}", "{{job}}")], "suffix:x",
             width=6, decimals=2, thresholds=goal_thresholds(RQ3_RATIO)),
        timeseries("Spend and budget", "Meta-training spend so far, and cost.budget_usd "
                   "where the job sets one",
                   [target(f"max by (job) (metapeft_cost_meta_training_usd_total{{{JOB}}})",
                           "{{job}} spend"),
                    target(f"max by (job) (metapeft_cost_budget_usd{{{JOB}}})",
                           "{{job}} budget")], usd, width=8),
        timeseries("Node rates (usd/h)", "Each node's rate: hardware amortization plus "
                   "energy (measured watts where the node reports them)",
                   [target(f"3600 * max by (job, node) "
                           f"(metapeft_cost_node_rate_usd_per_second{{{JOB}}})",
                           "{{job}} {{node}}")], usd, width=8),
        stat("Break-even (tasks)", "Tasks served from the meta-learned init after which "
             "meta-training has paid for itself (Infinity: never)",
             [target(f"max by (job) (metapeft_cost_break_even_tasks{{{JOB}}})", "{{job}}")],
             "short", decimals=0),
        stat("Steps to target", "Adaptation steps to the target per init",
             [target(f"max by (job, init) (metapeft_cost_task_adaptation_steps{{{JOB}}})",
                     "{{job}} {{init}}")], "short", decimals=0),
    ]


def finished() -> list[Panel]:
    return [
        stat("Last run", "Outcome pushed to the Pushgateway at the end of a run "
             "(metrics.pushgateway); stays after the driver's /metrics is gone",
             [target(f"max by (job) (metapeft_job_succeeded{{{JOB}}})", "{{job}}")], "none",
             width=6, mappings=value_names({"1": "succeeded", "0": "failed"})),
        stat("Last run: duration", "Duration of the last run (Pushgateway)",
             [target(f"max by (job) (metapeft_job_duration_seconds{{{JOB}}})", "{{job}}")],
             "s", width=6),
        stat("Last run: spend", "Meta-training spend of the last run (Pushgateway)",
             [target(f"max by (job) (metapeft_job_meta_training_usd{{{JOB}}})", "{{job}}")],
             "currencyUSD", width=6, decimals=4),
        stat("Last run: tasks", "Tasks the last run completed (Pushgateway)",
             [target(f"max by (job) (metapeft_job_tasks_completed{{{JOB}}})", "{{job}}")],
             "short", width=6),
    ]


def build() -> dict[str, Any]:
    sections = [
        ("Progress", progress()),
        ("Throughput", throughput()),
        ("Workers", workers()),
        ("Latency", latency()),
        ("Async", asynchrony()),
        ("Meta-learning", meta_learning()),
        ("Cost", cost()),
        ("Finished runs (Pushgateway)", finished()),
    ]
    return {
        "title": "metapeft",
        "uid": "metapeft",
        "description": "Meta-training jobs: throughput, workers, latency, async "
                       "staleness, meta-validation, checkpoints and cost "
                       "(generated by metapeft_dist/dashboard.py)",
        "tags": ["metapeft"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "version": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": variables()},
        "panels": layout(sections),
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
