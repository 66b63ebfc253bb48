"""End to end with a real Prometheus server: a short job on the embedded Ray is scraped
through monitoring/prometheus.yml (intervals shortened, the driver's port swapped in),
and what Prometheus stored agrees with the job's own results.json.

Needs the `prometheus` binary (Debian package `prometheus`, installed by `make test`;
`brew install prometheus` on macOS) and, for the outcome push, `prometheus-pushgateway`.
"""

import itertools
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from metapeft_dist import api
from metapeft_dist.config import parse_spec

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROMETHEUS = shutil.which("prometheus")
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
SCRAPE_SECONDS = 0.5

NODE_COST = {"price_usd": 2000.0, "service_life_years": 3.0, "watts": 50.0}
ENERGY = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


def _wait_ready(url: str, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            _get(url, timeout=1.0)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {seconds} s")


def _prometheus_config(tmp_path: Path, driver_port: int) -> Path:
    """The shipped config with test-speed intervals and the driver's port."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{int(SCRAPE_SECONDS * 1000)}ms",
                            evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    metapeft = next(c for c in config["scrape_configs"] if c["job_name"] == "metapeft")
    assert metapeft["honor_labels"] is True
    metapeft.update(scrape_interval=f"{int(SCRAPE_SECONDS * 1000)}ms", scrape_timeout="400ms")
    metapeft["static_configs"] = [{"targets": [f"127.0.0.1:{driver_port}"]}]
    config["scrape_configs"] = [metapeft]  # Ray's and the Pushgateway's targets: not here
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, tmp_path: Path, driver_port: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={_prometheus_config(tmp_path, driver_port)}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_ready(f"{self.url}/-/ready", self.proc)

    def query(self, expr: str, at: float) -> list[dict]:
        params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        body = json.loads(_get(f"{self.url}/api/v1/query?{params}"))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, expr: str, at: float) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def range(self, expr: str, start: float, end: float, step: float) -> list[tuple[float, float]]:
        params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}",
                                         "end": f"{end:.3f}", "step": f"{step}"})
        body = json.loads(_get(f"{self.url}/api/v1/query_range?{params}"))
        assert body["status"] == "success", body
        if not body["data"]["result"]:
            return []
        return [(float(t), float(v)) for t, v in body["data"]["result"][0]["values"]]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: apt "
                    "install prometheus, which make test does; macOS: brew install prometheus)")
def test_prometheus_scrapes_a_job_and_agrees_with_its_results(tmp_path):
    driver_port = _free_port()
    prometheus = Prometheus(tmp_path, driver_port)
    spec = parse_spec(f"""
name: e2e
family: {{name: digits, ways: 5, shots: 1, query: 5}}
model: {{kind: mlp, hidden: [32]}}
algorithm: {{name: maml, meta_batch: 8, iterations: 300}}
runtime: {{mode: sync, workers: 2, chunk: 4}}
inner: {{steps: 2, lr: 0.4}}
eval: {{tasks: 40, shots: [1], steps: 5, every: 0, select: last, baselines: [random],
       target: 0.45}}
checkpoint: {{every: 100}}
metrics: {{port: {driver_port}, linger: {6 * SCRAPE_SECONDS}}}
cost: {{energy_usd_per_kwh: {ENERGY}, nodes: {{default: {json.dumps(NODE_COST)}}}}}
run: {{out_dir: {tmp_path}}}
""")
    try:
        results = api.run(spec, tmp_path / "run")
        ended = results["outcome"]["finished_timestamp"]
        at = ended + 3 * SCRAPE_SECONDS  # scraped after the job ended, before /metrics went
        time.sleep(2)  # let the TSDB head take the last samples
        job = '{job="e2e"}'

        # counters: exactly the job's own totals
        tasks = results["runtime"]["tasks_completed"]
        assert tasks == 300 * 8
        assert prometheus.scalar(f"sum(metapeft_tasks_completed_total{job})", at) == tasks
        assert prometheus.scalar(f"metapeft_outer_updates_total{job}", at) == 300
        assert prometheus.scalar(f"metapeft_meta_iteration{job}", at) == 300
        assert prometheus.scalar(f"metapeft_job_running{job}", at) == 0

        # cost: the exported spend is the results' spend, and reconciles with reserved
        # seconds x node rate, both as Prometheus has them and from the declared figures
        cost = results["cost"]
        spend = prometheus.scalar(f"metapeft_cost_meta_training_usd_total{job}", at)
        assert spend > 0
        assert spend == pytest.approx(cost["spend_usd"], rel=0.01)
        reserved_x_rate = prometheus.scalar(
            f"sum(metapeft_node_reserved_seconds_total{job} "
            f"* on(job, node) metapeft_cost_node_rate_usd_per_second{job})", at)
        assert spend == pytest.approx(reserved_x_rate, rel=0.01)
        declared_rate = (NODE_COST["price_usd"] / (NODE_COST["service_life_years"] * 8760)
                         + NODE_COST["watts"] / 1000 * ENERGY) / 3600
        by_hand = sum(n["reserved_seconds"] * (declared_rate if n["watts_source"] == "declared"
                                               else n["rate_usd_per_hour"] / 3600)
                      for n in cost["nodes"].values())
        assert spend == pytest.approx(by_hand, rel=0.01)
        assert sum(n["reserved_seconds"] for n in cost["nodes"].values()) <= results["seconds"]
        for init in ("meta", "standard"):
            usd = cost["per_task"][init]["usd"]
            assert usd is not None, cost["per_task"]  # both inits reach 45% in 5 steps
            exported = prometheus.scalar(
                f'metapeft_cost_task_adaptation_usd{{job="e2e",init="{init}"}}', at)
            assert exported == pytest.approx(usd, rel=1e-6)
        assert prometheus.scalar(f"metapeft_cost_break_even_tasks{job}", at) == pytest.approx(
            cost["break_even_tasks"] if cost["break_even_tasks"] is not None else float("inf"))
        amortized = prometheus.scalar(f"metapeft:cost_amortized_usd_per_task:50{job}", at)
        at50 = next(p for p in cost["amortized"] if p["tasks"] == 50)
        assert amortized == pytest.approx(at50["amortized_usd_per_task"], rel=0.01)

        # throughput: the recording rule has the series, and every scraped value of the
        # task counter agrees with the job's own record of when chunks completed
        # (tasks per node per time bin): at evaluation time t it counts at least the chunks
        # that ended a second (a round trip, generously) plus a scrape interval before t,
        # and at most those that ended by t.
        bins = results["runtime"]["throughput"]
        start, width = bins["start"], bins["bin_seconds"]
        rate = prometheus.range(f"metapeft:tasks_per_second:rate1m{job}", start, ended, 1.0)
        assert rate and max(v for _, v in rate) > 0
        length = max(len(b) for b in bins["nodes"].values())
        cumulative = list(itertools.accumulate(
            sum(b[i] for b in bins["nodes"].values() if i < len(b)) for i in range(length)))
        assert cumulative[-1] == tasks

        def completed_through(index: int) -> int:
            return 0 if index < 0 else cumulative[min(index, length - 1)]

        counter = prometheus.range(f"sum(metapeft_tasks_completed_total{job})", start, ended,
                                   SCRAPE_SECONDS)
        assert len([v for _, v in counter if 0 < v < tasks]) >= 2, counter  # seen training
        for t, value in counter:
            upper = completed_through(math.floor((t - start) / width))
            lower = completed_through(math.floor((t - 1.0 - SCRAPE_SECONDS - start) / width) - 1)
            assert lower <= value <= upper, (t - start, value, lower, upper)
    finally:
        prometheus.close()


@pytest.mark.skipif(PUSHGATEWAY is None, reason="prometheus-pushgateway is not installed")
def test_outcome_is_pushed_to_a_pushgateway(tmp_path):
    port = _free_port()
    gateway = subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/-/ready", gateway)
        spec = parse_spec(f"""
name: pushed
family: {{name: sinusoid, shots: 5, query: 5}}
algorithm: {{name: maml, meta_batch: 4, iterations: 30}}
runtime: {{mode: local}}
eval: {{tasks: 10, shots: [5], steps: 2, every: 0, select: last, baselines: [random]}}
checkpoint: {{every: 0}}
metrics: {{port: 0, pushgateway: "127.0.0.1:{port}"}}
run: {{out_dir: {tmp_path}}}
""")
        results = api.run(spec, tmp_path / "run")
        body = _get(f"http://127.0.0.1:{port}/metrics").decode()
        lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
                 if line.startswith("metapeft_job_")}
        key = '{instance="",job="pushed"}'
        assert lines[f"metapeft_job_succeeded{key}"] == 1
        assert lines[f"metapeft_job_tasks_completed{key}"] == 30 * 4
        assert lines[f"metapeft_job_outer_updates{key}"] == 30
        assert lines[f"metapeft_job_last_success_timestamp_seconds{key}"] == pytest.approx(
            results["outcome"]["finished_timestamp"])
        outcome = json.loads((tmp_path / "run" / "outcome.json").read_text())
        assert outcome == results["outcome"]
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
