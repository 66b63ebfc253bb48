"""Every metric metapeft exports to Prometheus, in one place.

Names are ``metapeft_<subsystem>_<name>_<unit>`` in base units (seconds, bytes, usd),
``_total`` on counters. Labels are few and bounded: ``job``, ``algorithm``, ``node`` (one
value per machine), and two small enumerations (``direction``, ``init``); never a task id.
The scrape config must keep them (``honor_labels: true``, monitoring/prometheus.yml),
since Prometheus' own ``job`` label would otherwise rename ours to ``exported_job``.

How per-node figures reach Prometheus: each worker returns its timings (inner-loop
seconds, bytes, host) with every chunk result, and the driver records them here; the
driver's one /metrics endpoint serves them all. Not Ray's ``ray.util.metrics`` through
each node's agent, because

- a figure recorded by the driver is counted exactly when the parameter server counts
  the result: a chunk lost with its node is a failed task, never a completed one, and
  the exported totals equal the run's results.json (the end-to-end test checks this);
- one scrape target per job, on 127.0.0.1 by default, instead of an open metrics port
  on every Mac; the figures survive a worker restart (a restarted actor's counters
  would start again from zero);
- the same code records the in-process ``runtime.mode: local``, where there is no Ray.

Ray's own per-node system metrics (CPU, memory, object store, actor states) still come
from Ray's agents: monitoring/prometheus.yml scrapes them through the service-discovery
file Ray writes on the head node.

A :class:`JobMetrics` takes a registry, so a test builds a fresh one and reads values
back; :class:`NoMetrics` is the same interface recording nothing (``metrics.enabled:
false``). Spend is not recorded here: the executors keep it on the cost meter
(cost.SpendMeter) they are given, and a JobMetrics given that meter exports it, computed
at scrape time.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, Info, push_to_gateway, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from metapeft_dist.cost import SpendMeter

# Per-chunk inner-loop seconds: from sub-millisecond toy tasks to minutes of LM work.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20)


class JobMetrics:
    """The metrics of one job, recorded by the driver (or the in-process trainer) and
    the runner; with ``spend``, the meter's reserved seconds, rates and spend too."""

    def __init__(self, job: str, algorithm: str, registry: CollectorRegistry | None = None,
                 spend: SpendMeter | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.job, self.algorithm = job, algorithm
        self._declare_job()
        self._declare_work()
        self._declare_workers()
        self._declare_quality()
        self._declare_cost()
        if spend is not None:
            self.registry.register(_SpendCollector(job, spend))
        self._lock = threading.Lock()

    def _declare_job(self) -> None:
        """The job: what it is, when it ran, how far it got."""
        r = self.registry
        self._info = Info("metapeft_job", "The job: algorithm, task family, runtime mode",
                          ("job",), registry=r)
        self._running = Gauge("metapeft_job_running",
                              "1 while the job meta-trains or evaluates, 0 once it ended",
                              ("job",), registry=r)
        self._started = Gauge("metapeft_job_start_timestamp_seconds",
                              "When the job started (Unix time)", ("job",), registry=r)
        self._ended = Gauge("metapeft_job_end_timestamp_seconds",
                            "When the job ended (Unix time); absent while it runs",
                            ("job", "status"), registry=r)
        self._iterations_planned = Gauge("metapeft_meta_iterations_planned",
                                         "Meta-iterations the job will run", ("job",),
                                         registry=r)
        self._iteration = Gauge("metapeft_meta_iteration",
                                "Meta-iterations completed", ("job",), registry=r)

    def _declare_work(self) -> None:
        """Tasks, inner steps, outer updates, times and bytes per chunk."""
        r = self.registry
        ja = ("job", "algorithm")
        jn = ("job", "node")
        self._tasks = Counter("metapeft_tasks_completed_total",
                              "Task adaptations whose result reached the parameter server",
                              ("job", "algorithm", "node"), registry=r)
        self._failed = Counter("metapeft_tasks_failed_total",
                               "Task adaptations lost with their worker or node",
                               jn, registry=r)
        self._retried = Counter("metapeft_tasks_retried_total",
                                "Task adaptations dispatched again after a loss",
                                ("job",), registry=r)
        self._inner_steps = Counter("metapeft_inner_steps_total",
                                    "Inner-loop (adaptation) steps completed", ja, registry=r)
        self._tokens = Counter("metapeft_tokens_total",
                               "Tokens processed by inner loops (language-model jobs)",
                               ("job",), registry=r)
        self._updates = Counter("metapeft_outer_updates_total",
                                "Outer (meta) updates applied by the parameter server",
                                ja, registry=r)
        self._dropped = Counter("metapeft_outer_updates_dropped_total",
                                "Async results dropped as staler than runtime.staleness",
                                ("job",), registry=r)
        self._version = Gauge("metapeft_meta_version",
                              "Meta-parameter version (outer updates applied)", ("job",),
                              registry=r)
        self._inner_seconds = Histogram("metapeft_inner_loop_seconds",
                                        "Inner-loop compute seconds per dispatched chunk",
                                        jn, buckets=SECONDS_BUCKETS, registry=r)
        self._dispatch = Histogram("metapeft_dispatch_seconds",
                                   "Dispatch to result, per chunk, seen by the driver",
                                   ("job",), buckets=SECONDS_BUCKETS, registry=r)
        self._ps_update = Histogram("metapeft_param_server_update_seconds",
                                    "Parameter-server outer-update latency", ("job",),
                                    buckets=SECONDS_BUCKETS, registry=r)
        self._staleness = Histogram("metapeft_async_staleness_versions",
                                    "Async: versions the meta-parameters moved while a "
                                    "result was computed (applied and dropped ones)",
                                    ("job",), buckets=STALENESS_BUCKETS, registry=r)
        self._staleness_bound = Gauge("metapeft_async_staleness_bound_versions",
                                      "Async: runtime.staleness, the most versions a "
                                      "result may lag and still be applied", ("job",),
                                      registry=r)
        self._busy = Counter("metapeft_worker_busy_seconds_total",
                             "Seconds workers spent on chunks (decode, sample, compute, "
                             "encode)", jn, registry=r)
        self._wire = Counter("metapeft_wire_bytes_total",
                             "Parameter bytes on the wire: to_workers, from_workers",
                             ("job", "direction"), registry=r)

    def _declare_workers(self) -> None:
        """Workers answering, desired, unable to start."""
        r = self.registry
        self._workers = Gauge("metapeft_workers", "Workers answering", ("job",), registry=r)
        self._workers_failed = Gauge("metapeft_workers_failed_to_start",
                                     "Workers that could not build the job (their node "
                                     "lacks a package, a model.path ...); not retried",
                                     ("job",), registry=r)
        self._workers_desired = Gauge("metapeft_workers_desired",
                                      "Workers the job runs when all are up", ("job",),
                                      registry=r)

    def _declare_quality(self) -> None:
        """Training and meta-validation losses, checkpoints."""
        r = self.registry
        job = self.job
        self._train_loss = Gauge("metapeft_meta_train_loss",
                                 "Mean query loss after adaptation, last meta-iteration",
                                 ("job",), registry=r)
        self._val_loss = Gauge("metapeft_meta_validation_loss",
                               "Meta-validation query loss after adaptation", ("job",),
                               registry=r)
        self._val_accuracy = Gauge("metapeft_meta_validation_accuracy",
                                   "Meta-validation query accuracy after adaptation "
                                   "(classification), a fraction", ("job",), registry=r)
        self._checkpoint = Gauge("metapeft_checkpoint_last_timestamp_seconds",
                                 "When the newest checkpoint was written (Unix time)",
                                 ("job",), registry=r)
        self._checkpoint_time: float | None = None
        age = Gauge("metapeft_checkpoint_age_seconds",
                    "Seconds since the newest checkpoint was written (NaN before the first)",
                    ("job",), registry=r)
        age.labels(job).set_function(
            lambda: time.time() - self._checkpoint_time if self._checkpoint_time else math.nan)

    def _declare_cost(self) -> None:
        """The cost figures of the finished job (cost.cost_summary)."""
        r = self.registry
        self._budget = Gauge("metapeft_cost_budget_usd",
                             "cost.budget: meta-training spend that should not be exceeded",
                             ("job",), registry=r)
        self._task_cost = Gauge("metapeft_cost_task_adaptation_usd",
                                "Cost of adapting one held-out task to the target: "
                                "steps-to-target x seconds per step x node rate, per init "
                                "(meta: the meta-learned one; standard: a standard init)",
                                ("job", "init"), registry=r)
        self._task_steps = Gauge("metapeft_cost_task_adaptation_steps",
                                 "Adaptation steps to reach the target, per init",
                                 ("job", "init"), registry=r)
        self._step_seconds = Gauge("metapeft_cost_adaptation_step_seconds",
                                   "Measured seconds per adaptation step of one task",
                                   ("job",), registry=r)
        self._break_even = Gauge("metapeft_cost_break_even_tasks",
                                 "Tasks served after which meta-training has paid for "
                                 "itself (+Inf: never)", ("job",), registry=r)

    # --- the job ------------------------------------------------------------------------

    def job_started(self, family: str, mode: str, iterations: int, workers_desired: int,
                    staleness: int | None, budget_usd: float | None) -> None:
        job = self.job
        self._info.labels(job).info({"algorithm": self.algorithm, "family": family,
                                     "mode": mode})
        self._running.labels(job).set(1)
        self._started.labels(job).set(time.time())
        self._iterations_planned.labels(job).set(iterations)
        self._iteration.labels(job).set(0)
        self._workers_desired.labels(job).set(workers_desired)
        self._workers_failed.labels(job).set(0)
        if staleness is not None:
            self._staleness_bound.labels(job).set(staleness)
        if budget_usd is not None:
            self._budget.labels(job).set(budget_usd)
        # Counters a query expects to exist before the first event.
        self._updates.labels(job, self.algorithm)
        self._inner_steps.labels(job, self.algorithm)
        self._retried.labels(job)
        self._dropped.labels(job)
        for direction in ("to_workers", "from_workers"):
            self._wire.labels(job, direction)

    def job_ended(self, status: str) -> None:
        self._running.labels(self.job).set(0)
        self._workers.labels(self.job).set(0)
        self._ended.labels(self.job, status).set(time.time())

    # --- workers and chunks (the executors) ---------------------------------------------

    def workers(self, live: int, failed_to_start: int = 0) -> None:
        self._workers.labels(self.job).set(live)
        self._workers_failed.labels(self.job).set(failed_to_start)

    def chunk_done(self, node: str, tasks: int, inner_steps: int, compute_seconds: float,
                   busy_seconds: float, dispatch_seconds: float | None, bytes_to_workers: int,
                   bytes_from_workers: int, tokens: int = 0) -> None:
        job = self.job
        self._tasks.labels(job, self.algorithm, node).inc(tasks)
        self._inner_steps.labels(job, self.algorithm).inc(inner_steps * tasks)
        self._inner_seconds.labels(job, node).observe(compute_seconds)
        self._busy.labels(job, node).inc(busy_seconds)
        if dispatch_seconds is not None:
            self._dispatch.labels(job).observe(dispatch_seconds)
        self._wire.labels(job, "to_workers").inc(bytes_to_workers)
        self._wire.labels(job, "from_workers").inc(bytes_from_workers)
        if tokens:
            self._tokens.labels(job).inc(tokens)

    def chunk_lost(self, node: str | None, tasks: int) -> None:
        self._failed.labels(self.job, node or "unknown").inc(tasks)
        self._retried.labels(self.job).inc(tasks)

    def update_applied(self, version: int, seconds: float | None,
                       staleness: int | None = None) -> None:
        self._updates.labels(self.job, self.algorithm).inc()
        self._version.labels(self.job).set(version)
        if seconds is not None:
            self._ps_update.labels(self.job).observe(seconds)
        if staleness is not None:
            self._staleness.labels(self.job).observe(staleness)

    def update_dropped(self, staleness: int) -> None:
        self._dropped.labels(self.job).inc()
        self._staleness.labels(self.job).observe(staleness)

    # --- meta-training (the runner) -----------------------------------------------------

    def iteration_done(self, iteration: int, loss: float) -> None:
        self._iteration.labels(self.job).set(iteration)
        self._train_loss.labels(self.job).set(loss)

    def validated(self, loss: float, accuracy: float | None) -> None:
        self._val_loss.labels(self.job).set(loss)
        if accuracy is not None:
            self._val_accuracy.labels(self.job).set(accuracy)

    def checkpointed(self, when: float | None = None) -> None:
        self._checkpoint_time = time.time() if when is None else when
        self._checkpoint.labels(self.job).set(self._checkpoint_time)

    def costs(self, summary: dict[str, Any]) -> None:
        """The per-task adaptation costs and break-even point (cost.cost_summary)."""
        job = self.job
        self._step_seconds.labels(job).set(summary["step_seconds"])
        for init, entry in summary["per_task"].items():
            steps = entry["steps_to_target"]
            self._task_steps.labels(job, init).set(math.nan if steps is None else steps)
            usd = entry["usd"]
            self._task_cost.labels(job, init).set(math.nan if usd is None else usd)
        break_even = summary["break_even_tasks"]
        self._break_even.labels(job).set(math.inf if break_even is None else break_even)


class NoMetrics(JobMetrics):
    """``metrics.enabled: false``: the same calls, nothing recorded or served."""

    def __init__(self, job: str = "", algorithm: str = "", registry=None):
        self.registry = CollectorRegistry()
        self.job, self.algorithm = job, algorithm

    def job_started(self, *args, **kwargs) -> None: pass
    def job_ended(self, *args, **kwargs) -> None: pass
    def workers(self, *args, **kwargs) -> None: pass
    def chunk_done(self, *args, **kwargs) -> None: pass
    def chunk_lost(self, *args, **kwargs) -> None: pass
    def update_applied(self, *args, **kwargs) -> None: pass
    def update_dropped(self, *args, **kwargs) -> None: pass
    def iteration_done(self, *args, **kwargs) -> None: pass
    def validated(self, *args, **kwargs) -> None: pass
    def checkpointed(self, *args, **kwargs) -> None: pass
    def costs(self, *args, **kwargs) -> None: pass


class _SpendCollector(Collector):
    """Spend and reserved seconds computed at scrape time from the spend meter, so the
    exported counter is exactly reserved seconds x node rate at that moment."""

    def __init__(self, job: str, meter: SpendMeter):
        self.job, self.meter = job, meter

    def collect(self):
        meter, job = self.meter, self.job
        now = time.time()
        reserved = CounterMetricFamily(
            "metapeft_node_reserved_seconds",
            "Seconds each node was held by the job (from its first worker up to the end "
            "of meta-training or its loss)", labels=["job", "node"])
        rate = GaugeMetricFamily(
            "metapeft_cost_node_rate_usd_per_second",
            "Node cost rate: hardware amortization plus energy", labels=["job", "node"])
        for node, seconds in meter.reserved_seconds(now).items():
            reserved.add_metric([job, node], seconds)
            rate.add_metric([job, node], meter.rate_usd_per_second(node))
        spend = CounterMetricFamily(
            "metapeft_cost_meta_training_usd",
            "Meta-training spend so far: reserved seconds x node rate, summed over nodes",
            labels=["job"])
        spend.add_metric([job], meter.spend_usd(now))
        yield reserved
        yield rate
        yield spend


class MetricsServer:
    """The driver's read-only /metrics endpoint (prometheus-client's HTTP server on a
    daemon thread)."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int,
                 log: Callable[[str], None] = lambda message: None):
        from metapeft_dist.config import ConfigError

        try:
            self.server, self.thread = start_http_server(port, addr=address, registry=registry)
        except OSError as err:
            if port == 0 or err.errno != errno.EADDRINUSE:
                raise ConfigError([("metrics", f"cannot serve /metrics on {address}:{port}: "
                                               f"{err.strerror or err}")]) from None
            self.server, self.thread = start_http_server(0, addr=address, registry=registry)
            log(f"port {port} is busy; /metrics is on port {self.server.server_port} instead")
        host = f"[{address}]" if ":" in address else address
        self.url = f"http://{host}:{self.server.server_port}/metrics"

    def stop(self, linger: float = 0.0) -> None:
        """Stop serving, after ``linger`` seconds (a last scrape sees the final values)."""
        if linger > 0:
            time.sleep(linger)
        self.server.shutdown()
        self.server.server_close()


def push_outcome(gateway: str, job: str, outcome: dict[str, Any]) -> None:
    """Push a finished job's outcome to a Prometheus Pushgateway (grouped by job), so it
    stays queryable after the driver's /metrics is gone. Raises OSError when the
    gateway cannot be reached."""
    registry = CollectorRegistry()

    def gauge(name: str, text: str, value: float | None) -> None:
        if value is not None:
            Gauge(name, text, registry=registry).set(value)

    succeeded = outcome["status"] == "succeeded"
    totals = outcome.get("totals", {})
    gauge("metapeft_job_succeeded", "1 if the job's last run succeeded, else 0",
          1.0 if succeeded else 0.0)
    gauge("metapeft_job_last_end_timestamp_seconds", "When the job's last run ended",
          outcome["finished_timestamp"])
    gauge("metapeft_job_last_success_timestamp_seconds", "When the job last succeeded",
          outcome["finished_timestamp"] if succeeded else None)
    gauge("metapeft_job_duration_seconds", "Duration of the job's last run",
          outcome["duration_seconds"])
    gauge("metapeft_job_tasks_completed", "Tasks the last run completed",
          totals.get("tasks_completed"))
    gauge("metapeft_job_outer_updates", "Outer updates the last run applied",
          totals.get("outer_updates"))
    gauge("metapeft_job_meta_training_usd", "Meta-training spend of the job",
          totals.get("spend_usd"))
    push_to_gateway(gateway, job=job, registry=registry, timeout=10)
