"""The metrics module: names, labels, recorded values, the /metrics server."""

import inspect
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from metapeft_dist.cost import SpendMeter
from metapeft_dist.metrics import JobMetrics, MetricsServer, NoMetrics
from metapeft_dist.throughput import Throughput

ALLOWED_LABELS = {"job", "algorithm", "node", "direction", "init", "status", "le",
                  "family", "mode"}  # family and mode: the job's info metric only


def _metrics(spend=None):
    m = JobMetrics("j1", "maml", CollectorRegistry(), spend)
    m.job_started("digits", "async", iterations=10, workers_desired=2, staleness=1,
                  budget_usd=5.0)
    return m


def _value(m, name, **labels):
    return m.registry.get_sample_value(name, labels)


def test_recorded_values_read_back():
    m = _metrics()
    m.chunk_done("mac-1", tasks=4, inner_steps=3, compute_seconds=0.2, busy_seconds=0.25,
                 dispatch_seconds=0.3, bytes_to_workers=1000, bytes_from_workers=500)
    m.chunk_done("mac-2", tasks=2, inner_steps=3, compute_seconds=0.1, busy_seconds=0.1,
                 dispatch_seconds=None, bytes_to_workers=0, bytes_from_workers=250, tokens=7)
    m.chunk_lost("mac-2", 2)
    m.update_applied(1, 0.01, staleness=0)
    m.update_dropped(staleness=3)
    m.validated(0.5, 0.8)
    m.iteration_done(1, 0.7)
    assert _value(m, "metapeft_tasks_completed_total", job="j1", algorithm="maml",
                  node="mac-1") == 4
    assert _value(m, "metapeft_inner_steps_total", job="j1", algorithm="maml") == 18
    assert _value(m, "metapeft_tokens_total", job="j1") == 7
    assert _value(m, "metapeft_tasks_failed_total", job="j1", node="mac-2") == 2
    assert _value(m, "metapeft_tasks_retried_total", job="j1") == 2
    assert _value(m, "metapeft_worker_busy_seconds_total", job="j1", node="mac-1") == 0.25
    assert _value(m, "metapeft_inner_loop_seconds_count", job="j1", node="mac-2") == 1
    assert _value(m, "metapeft_dispatch_seconds_count", job="j1") == 1
    assert _value(m, "metapeft_wire_bytes_total", job="j1", direction="to_workers") == 1000
    assert _value(m, "metapeft_wire_bytes_total", job="j1", direction="from_workers") == 750
    assert _value(m, "metapeft_outer_updates_total", job="j1", algorithm="maml") == 1
    assert _value(m, "metapeft_outer_updates_dropped_total", job="j1") == 1
    # staleness of applied (0) and dropped (3) results both land in the histogram
    assert _value(m, "metapeft_async_staleness_versions_count", job="j1") == 2
    assert _value(m, "metapeft_async_staleness_versions_bucket", job="j1", le="0.0") == 1
    assert _value(m, "metapeft_async_staleness_bound_versions", job="j1") == 1
    assert _value(m, "metapeft_meta_validation_accuracy", job="j1") == 0.8
    assert _value(m, "metapeft_cost_budget_usd", job="j1") == 5.0
    assert _value(m, "metapeft_job_running", job="j1") == 1
    assert _value(m, "metapeft_workers_failed_to_start", job="j1") == 0
    m.workers(3, failed_to_start=1)
    assert _value(m, "metapeft_workers", job="j1") == 3
    assert _value(m, "metapeft_workers_failed_to_start", job="j1") == 1
    m.job_ended("succeeded")
    assert _value(m, "metapeft_job_running", job="j1") == 0


def test_exported_spend_is_reserved_seconds_times_rate():
    spend = SpendMeter({"default": {"price_usd": 8760.0, "service_life_years": 1.0,
                                    "watts": 0.0}})  # 1 usd/h
    m = _metrics(spend)
    spend.reserve("a", at=0.0)
    spend.reserve("b", at=0.0)
    spend.release("a", at=1800.0)
    spend.release("b", at=3600.0)
    assert _value(m, "metapeft_node_reserved_seconds_total", job="j1", node="b") == 3600.0
    assert _value(m, "metapeft_cost_node_rate_usd_per_second", job="j1",
                  node="a") == pytest.approx(1 / 3600)
    assert _value(m, "metapeft_cost_meta_training_usd_total", job="j1") == pytest.approx(1.5)


def test_names_units_and_labels_follow_the_conventions():
    m = _metrics()
    m.chunk_done("n", 1, 1, 0.1, 0.1, 0.1, 1, 1)
    m.checkpointed()
    m.costs({"step_seconds": 0.1, "break_even_tasks": None,
             "per_task": {"meta": {"steps_to_target": 1, "usd": 0.1},
                          "standard": {"steps_to_target": None, "usd": None}}})
    families = list(m.registry.collect())
    assert len(families) >= 30
    for family in families:
        assert family.name.startswith("metapeft_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
        if family.type == "counter" and family.samples:  # labelled ones: after a first event
            assert any(s.name.endswith("_total") for s in family.samples), family.name
    assert _value(m, "metapeft_cost_break_even_tasks", job="j1") == float("inf")
    assert 0 <= _value(m, "metapeft_checkpoint_age_seconds", job="j1") < 60


def test_no_metrics_offers_every_recording_method():
    public = {name for name, _ in inspect.getmembers(JobMetrics, inspect.isfunction)
              if not name.startswith("_")}
    overridden = {name for name in vars(NoMetrics) if not name.startswith("_")}
    assert public == overridden
    off = NoMetrics("j", "maml")
    off.job_started("digits", "sync", 1, 1, None, None)
    off.chunk_done("n", 1, 1, 0.1, 0.1, 0.1, 1, 1)
    assert list(off.registry.collect()) == []


def test_spend_is_the_cost_meters_and_only_exported_here():
    """The executors hold nodes on the meter they are given; metrics neither carries it
    (``metrics.enabled: false`` leaves cost alone) nor imports cost.py to run."""
    assert not hasattr(NoMetrics("j", "maml"), "spend")
    assert not hasattr(_metrics(SpendMeter({})), "spend")
    assert _value(_metrics(), "metapeft_cost_meta_training_usd_total", job="j1") is None
    assert _value(_metrics(SpendMeter({})), "metapeft_cost_meta_training_usd_total",
                  job="j1") == 0.0
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, metapeft_dist.metrics; "
                               "print('metapeft_dist.cost' in sys.modules)"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


def test_server_serves_metrics_and_falls_back_from_a_busy_port():
    m = _metrics()
    m.chunk_done("n", 3, 1, 0.1, 0.1, 0.1, 1, 1)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    messages = []
    server = MetricsServer(m.registry, "127.0.0.1", busy.getsockname()[1], messages.append)
    try:
        assert server.server.server_port != busy.getsockname()[1]
        assert len(messages) == 1 and "busy" in messages[0]
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert 'metapeft_tasks_completed_total{algorithm="maml",job="j1",node="n"} 3.0' in body
    finally:
        server.stop()
        busy.close()


def test_the_metrics_endpoint_is_read_only():
    """Only GET (and OPTIONS) are served; a write is refused and changes nothing."""
    m = _metrics()
    m.chunk_done("n", 3, 1, 0.1, 0.1, 0.1, 1, 1)
    server = MetricsServer(m.registry, "127.0.0.1", 0)
    line = 'metapeft_tasks_completed_total{algorithm="maml",job="j1",node="n"} 3.0'
    try:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            request = urllib.request.Request(server.url, data=b"x 1\n", method=method)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5)
            assert refused.value.code == 405, method
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert line in body
    finally:
        server.stop()


def test_throughput_bins_coarsen_and_keep_totals():
    t = Throughput(bin_seconds=1.0, start=0.0)
    t.add("a", 0.5, 2)
    t.add("a", 3.2, 1)
    t.add("b", 1.0, 4)
    assert t.summary()["nodes"] == {"a": [2, 0, 0, 1], "b": [0, 4]}
    t.add("a", Throughput.MAX_BINS + 0.5, 5)  # past the last bin: bins double
    s = t.summary()
    assert s["bin_seconds"] == 2.0
    assert s["nodes"]["a"][:2] == [2, 1] and sum(s["nodes"]["a"]) == 8
    assert s["nodes"]["b"] == [4]
