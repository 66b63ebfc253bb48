"""Jobs on a real Ray head (`ray start --head` on 127.0.0.1 with its job server and token
authentication on), driven through the `metapeft` command as a user would: submit and
follow a job to SUCCEEDED, stop a running one, read a failed one's error, see the nodes,
and get one line and exit status 2 for each of 45 bad inputs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_SPEC

VENV_BIN = Path(sys.executable).parent
CLUSTER_YAML = ROOT / "cluster" / "mac-cluster.yaml"

TINY = f"\nname: tiny{TINY_SPEC}metrics: {{port: 0}}\n"
LONG = TINY.replace("name: tiny", "name: long").replace("iterations: 30",
                                                           "iterations: 1000000")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Head:
    def __init__(self, url: str, token: str, token_file: Path, home: Path):
        self.url, self.token, self.token_file, self.home = url, token, token_file, home

    def env(self, **extra: str | None) -> dict[str, str]:
        """The environment of a user holding the cluster token in ~/.ray/auth_token."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                            "METAPEFT_ADDRESS", "METAPEFT_CLUSTER")}
        env.update(HOME=str(self.home), PYTHONWARNINGS="ignore", METAPEFT_ADDRESS=self.url)
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def cli(self, *args: str, timeout: float = 300, **env: str | None):
        return subprocess.run([sys.executable, "-m", "metapeft_dist.cli", *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=self.env(**env), cwd=ROOT)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with the job server on 127.0.0.1, one `mlx` resource, token auth on;
    stopped (its whole process group) at the end."""
    temp_dir = tempfile.mkdtemp(prefix="mpt", dir="/tmp")  # short: Ray's socket paths
    home = tmp_path_factory.mktemp("home")
    token = secrets.token_hex(16)
    (home / ".ray").mkdir()
    token_file = home / ".ray" / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    # Every Ray node's dashboard agent, the job server's, listens on 52365 unless told
    # otherwise: a Ray another test runs meanwhile (the other test process) may hold it,
    # and then this head's job server never takes a job.
    port, dashboard_port, agent_port = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The job's entrypoint is `metapeft run`: this venv's bin must be on the head's PATH,
    # as the cluster's setup commands arrange on real nodes.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(home),
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}",
         f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-agent-listen-port={agent_port}",
         "--node-ip-address=127.0.0.1", '--resources={"mlx": 1}', "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_ready(url, token, proc, Path(temp_dir) / "head.log")
        yield Head(url, token, token_file, home)
    finally:
        # `ray start --block` stops its node's processes when it gets SIGTERM.
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", temp_dir], check=False)  # stragglers
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_ready(url: str, token: str, proc: subprocess.Popen, log: Path) -> None:
    import requests

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        try:
            reply = requests.get(f"{url}/api/jobs/", timeout=5,
                                 headers={"Authorization": f"Bearer {token}"})
            nodes = requests.get(f"{url}/api/v0/nodes", timeout=5,
                                 headers={"Authorization": f"Bearer {token}"})
            if reply.status_code == 200 and nodes.status_code == 200 and \
                    nodes.json()["data"]["result"]["result"]:
                # The job agent comes up last (later still on a loaded machine): ready
                # once it takes a job.
                probe = requests.post(f"{url}/api/jobs/", timeout=30,
                                      json={"entrypoint": "true"},
                                      headers={"Authorization": f"Bearer {token}"})
                if probe.status_code == 200:
                    return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the job server at {url} did not come up:\n{log.read_text()[-3000:]}")


def _spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _wait_for(predicate, timeout: float = 120, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


# --- the job lifecycle ------------------------------------------------------------------

TINY_JOB_ID = "metapeft-tiny-1"


@pytest.fixture(scope="module")
def finished(head, tmp_path_factory):
    """The tiny job submitted with --wait under a job id of ours, run to the end: its
    spec, run directory and the submit command's output (several tests read one job)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    spec = _spec(tmp_path, TINY)
    run_dir = tmp_path / "run"
    out = head.cli("submit", spec, "--wait", "--run-dir", str(run_dir), "--job-id",
                   TINY_JOB_ID, "--cluster", str(CLUSTER_YAML))
    return {"spec": spec, "run_dir": run_dir, "out": out}


def test_submit_wait_follows_a_job_to_succeeded(head, finished):
    run_dir, out = finished["run_dir"], finished["out"]
    assert out.returncode == 0, out.stderr
    states = [line.split(": ")[-1] for line in out.stderr.splitlines() if line.startswith("[")]
    assert states == ["PENDING", "RUNNING", "SUCCEEDED"], out.stderr
    assert "meta-training 30/30" in out.stdout  # the job's log, streamed
    assert out.stdout.strip().splitlines()[-1].endswith("SUCCEEDED after "
                                                        + out.stdout.split("after ")[-1].strip())
    job_id = out.stdout.strip().splitlines()[-1].split(":")[0]
    assert job_id == TINY_JOB_ID

    results = json.loads((run_dir / "results.json").read_text())
    assert results["runtime"]["tasks_completed"] == 30 * 4
    assert json.loads((run_dir / "outcome.json").read_text())["status"] == "succeeded"
    # The node cost figures are the cluster's (cluster/mac-cluster.yaml), not the spec's.
    cluster_cost = yaml.safe_load(CLUSTER_YAML.read_text())["metadata"]["metapeft"]["cost"]
    for name, figures in cluster_cost["nodes"].items():
        assert results["spec"]["cost"]["nodes"][name] == pytest.approx(
            {key: float(value) for key, value in figures.items()})

    logs = head.cli("logs", job_id)
    assert logs.returncode == 0 and "meta-training 30/30" in logs.stdout
    assert "steps to target" in logs.stdout  # the results table the job printed
    status = json.loads(head.cli("status", job_id, "--json").stdout)
    assert status["status"] == "SUCCEEDED" and status["exit_code"] == 0
    assert status["run_dir"] == str(run_dir) and status["name"] == "tiny"
    listed = json.loads(head.cli("list", "--json").stdout)
    assert job_id in [job["job_id"] for job in listed]


def test_a_jsonl_job_takes_its_task_files_along(head, tmp_path):
    """The tasks of a jsonl job are files on the submitting machine: they go with the
    submission, and the run keeps them (RUN/tasks/, named by its spec.yaml), so the job
    succeeds although they are deleted here the moment submit returns."""
    from tiny_llama import save_tiny_llama, save_tiny_tasks

    llama = save_tiny_llama(tmp_path / "llama")
    data = tmp_path / "tasks"
    originals = save_tiny_tasks(data)
    spec = _spec(tmp_path, f"""
name: mine
family: {{name: jsonl, path: {data}, ways: 2, shots: 2, query: 2}}
model: {{kind: causal_lm, path: {llama}, train: lora, max_len: 24, lora: {{rank: 2, layers: 1}}}}
algorithm: {{name: fomaml, meta_batch: 2, iterations: 4}}
inner: {{steps: 2, lr: 0.5}}
eval: {{tasks: 2, shots: [2], steps: 1, every: 0, select: last, chunk: 2}}
metrics: {{enabled: false}}
""")
    run_dir = tmp_path / "run"
    out = head.cli("submit", spec, "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr
    shutil.rmtree(data)
    job_id = out.stdout.strip()
    follow = head.cli("logs", job_id, "--follow")
    status = json.loads(head.cli("status", job_id, "--json").stdout)
    assert status["status"] == "SUCCEEDED", follow.stdout[-2000:]
    kept = run_dir / "tasks"
    assert {f.name: f.read_bytes() for f in kept.iterdir()} == originals
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["family"]["path"] == str(kept)
    assert json.loads((run_dir / "results.json").read_text())["runtime"]["tasks_completed"] \
        == 4 * 2


def test_a_jsonl_job_without_its_task_files_is_refused_here(head, tmp_path):
    spec = _spec(tmp_path, "family: {name: jsonl, path: /nonexistent/tasks}\n"
                           "model: {kind: encoder, train: lora, lora: {}}\n"
                           "algorithm: {name: fomaml}\n")
    out = head.cli("submit", spec)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines == [
        "error: family.path: /nonexistent/tasks is not a directory"], out.stderr


def test_stop_ends_a_running_job_as_stopped_and_keeps_its_checkpoints(head, tmp_path):
    run_dir = tmp_path / "run"
    out = head.cli("submit", _spec(tmp_path, LONG), "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    # Meta-training has begun once the first checkpoint (every 10 iterations) is written.
    _wait_for(lambda: (run_dir / "checkpoints").is_dir() and any(
        (run_dir / "checkpoints").iterdir()))
    assert json.loads(head.cli("status", job_id, "--json").stdout)["status"] == "RUNNING"

    stopped = head.cli("stop", job_id, "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["status"] == "STOPPED"
    status = head.cli("status", job_id)
    assert status.returncode == 1 and "STOPPED" in status.stdout
    # The driver ended as stopped: its run directory says so and stays resumable.
    outcome = _wait_for(lambda: (run_dir / "outcome.json").is_file()
                        and json.loads((run_dir / "outcome.json").read_text()))
    assert outcome["status"] == "stopped"
    assert any((run_dir / "checkpoints").iterdir())


def test_a_failing_job_is_failed_with_its_error_readable(head, tmp_path):
    run_dir = tmp_path / "taken"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "ckpt-00000010.safetensors").write_bytes(b"x")
    out = head.cli("submit", _spec(tmp_path, TINY), "--wait", "--run-dir", str(run_dir))
    assert out.returncode == 1
    assert "FAILED" in out.stdout.strip().splitlines()[-1]
    assert "already holds a run" in out.stdout.strip().splitlines()[-1]
    job_id = out.stdout.strip().splitlines()[-1].split(":")[0]
    logs = head.cli("logs", job_id)
    assert f"error: {run_dir} already holds a run" in logs.stdout
    status = json.loads(head.cli("status", job_id, "--json").stdout)
    assert status["status"] == "FAILED" and status["exit_code"] == 2
    assert status["error"].startswith(f"{run_dir} already holds a run")


def test_cluster_status_shows_the_head_with_its_mlx_resource_and_rate(head):
    out = head.cli("cluster", "status", "--json", "--cluster", str(CLUSTER_YAML))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    alive = [node for node in status["nodes"] if node["state"] == "ALIVE"]
    assert len(alive) == 1 and alive[0]["head"] and alive[0]["mlx"] == 1.0
    assert alive[0]["cpus"] == 2.0
    # This machine is not named in the description: the `default` figures apply.
    cost = yaml.safe_load(CLUSTER_YAML.read_text())["metadata"]["metapeft"]["cost"]
    default = cost["nodes"]["default"]
    rate = (default["price_usd"] / (default["service_life_years"] * 8760)
            + default["watts"] / 1000 * cost["energy_usd_per_kwh"])
    assert alive[0]["rate_usd_per_hour"] == pytest.approx(rate)
    # The described Macs have not joined this test cluster.
    described = yaml.safe_load(CLUSTER_YAML.read_text())["provider"]
    missing = {node["ip"] for node in status["nodes"] if node["state"] == "MISSING"}
    assert missing == {described["head_ip"], *described["worker_ips"]}
    assert status["mlx"] == 1.0 and status["alive"] == 1


def test_every_read_command_prints_json_that_parses(head, finished, tmp_path):
    spec, run_dir, job_id = finished["spec"], finished["run_dir"], TINY_JOB_ID
    submitted = head.cli("submit", spec, "--json", "--run-dir", str(tmp_path / "run"))
    assert submitted.returncode == 0, submitted.stderr
    # a job of its own, stopped at once so that it takes no time from the other tests
    stopped = head.cli("stop", json.loads(submitted.stdout)["job_id"], "--json")
    commands = {
        "submit": submitted,
        "stop": stopped,
        "status": head.cli("status", job_id, "--json"),
        "status (newest)": head.cli("status", "--json"),
        "logs --follow": head.cli("logs", job_id, "--follow", "--json"),
        "logs": head.cli("logs", job_id, "--json"),
        "list": head.cli("list", "--json"),
        "stop (ended)": head.cli("stop", job_id, "--json"),
        "cluster status": head.cli("cluster", "status", "--json"),
        "validate": head.cli("validate", spec, "--json"),
        "report": head.cli("report", str(run_dir), "--json", "--out", str(tmp_path / "plots")),
    }
    # status exits 1 for a job that did not succeed: the newest is the stopped one
    failing = {"status (newest)": 1}
    parsed = {}
    for name, out in commands.items():
        assert out.returncode == failing.get(name, 0), (name, out.stderr)
        parsed[name] = json.loads(out.stdout)
    assert parsed["stop"]["status"] == parsed["status (newest)"]["status"] == "STOPPED"
    assert parsed["status (newest)"]["job_id"] == parsed["submit"]["job_id"]
    assert parsed["logs --follow"]["status"] == "SUCCEEDED"
    assert "meta-training 30/30" in parsed["logs"]["logs"]
    assert parsed["stop (ended)"]["status"] == "SUCCEEDED"  # an ended job stays as it was
    assert parsed["validate"]["valid"] is True
    assert len(parsed["report"]["written"]) == 4


# --- bad input: one line, exit 2 --------------------------------------------------------

GOOD = "family: {name: sinusoid}\nalgorithm: {name: maml}\n"
NO_TOKEN = {"HOME": "EMPTY_HOME"}  # a user without ~/.ray/auth_token


def _bad_inputs(tmp: Path, head: Head) -> dict[str, tuple[list[str], dict, str]]:
    """name -> (arguments, environment changes, phrase the error line must contain)."""
    specs = {
        "missing.yaml": None,
        "broken.yaml": "family: [\n",
        "empty.yaml": "",
        "list.yaml": "- a\n- b\n",
        "unknown_key.yaml": GOOD + "inner: {learning_rate: 0.1}\n",
        "negative_lr.yaml": GOOD + "inner: {lr: -0.1}\n",
    }
    for name, text in specs.items():
        if text is not None:
            (tmp / name).write_text(text)
    (tmp / "dir.yaml").mkdir()
    good = _spec(tmp, GOOD, "good.yaml")
    (tmp / "empty_token").write_text("")
    (tmp / "run_without_results").mkdir()
    (tmp / "a_file").write_text("x")
    clusters = {
        "aws.yaml": {"cluster_name": "x", "provider": {"type": "aws", "region": "us-east-1"}},
        "unknown_key.yaml": {**yaml.safe_load(CLUSTER_YAML.read_text()), "colour": "blue"},
        "bad_cost.yaml": {**yaml.safe_load(CLUSTER_YAML.read_text()),
                          "metadata": {"metapeft": {"cost": {"energy_usd_per_kwh": -1}}}},
        "no_workers.yaml": {"cluster_name": "x", "provider": {"type": "local",
                                                              "head_ip": "10.0.0.1"},
                            "auth": {"ssh_user": "me"}},
    }
    for name, data in clusters.items():
        (tmp / f"cluster_{name}").write_text(yaml.safe_dump(data))
    (tmp / "cluster_broken.yaml").write_text("provider: [\n")
    url = head.url
    return {
        # specs
        "spec missing": (["submit", str(tmp / "missing.yaml")], {}, "spec file not found"),
        "spec is a directory": (["submit", str(tmp / "dir.yaml")], {}, "is a directory"),
        "spec not YAML": (["submit", str(tmp / "broken.yaml")], {}, "not valid YAML"),
        "spec empty": (["submit", str(tmp / "empty.yaml")], {}, "is empty"),
        "spec a list": (["submit", str(tmp / "list.yaml")], {}, "must be a mapping"),
        "spec unknown key": (["submit", str(tmp / "unknown_key.yaml")], {},
                             "inner.learning_rate"),
        "spec bad value": (["submit", str(tmp / "negative_lr.yaml")], {},
                           "inner.lr: must be > 0"),
        "bad override": (["submit", good, "--set", "nonsense"], {}, "override 'nonsense'"),
        "validate missing": (["validate", str(tmp / "missing.yaml")], {}, "spec file not found"),
        # addresses and tokens
        "address empty": (["list", "--address", ""], {}, "address is empty"),
        "address ftp": (["list", "--address", "ftp://127.0.0.1:21"], {}, "http:// or https://"),
        "address ray client": (["list", "--address", "ray://127.0.0.1:10001"], {},
                               "Ray Client address"),
        "address bad port": (["list", "--address", "http://127.0.0.1:port"], {}, "malformed"),
        "address port too big": (["list", "--address", "http://127.0.0.1:99999"], {},
                                 "malformed"),
        "address no host": (["list", "--address", "http://:8265"], {}, "names no host"),
        "address with path": (["list", "--address", f"{url}/api"], {}, "without a path"),
        "address with credentials": (["list", "--address", "http://me:pw@127.0.0.1:8265"], {},
                                     "must not carry credentials"),
        "remote http without token": (["submit", good, "--address", "http://10.0.0.5:8265"],
                                      NO_TOKEN, "refusing to use http://10.0.0.5:8265"),
        "unreachable": (["list", "--address", "http://127.0.0.1:1"], {}, "cannot reach"),
        "submit unreachable": (["submit", good, "--address", "127.0.0.1:1"], {},
                               "cannot reach"),
        "token file missing": (["list", "--token-file", str(tmp / "nope")], {},
                               "token file not found"),
        "token file empty": (["list", "--token-file", str(tmp / "empty_token")], {},
                             "does not hold a token"),
        "token env malformed": (["list"], {"RAY_AUTH_TOKEN": "two words"},
                                "RAY_AUTH_TOKEN does not hold a token"),
        "token path env missing": (["list"], {"RAY_AUTH_TOKEN_PATH": str(tmp / "nope")},
                                   "token file not found"),
        "wrong token": (["list"], {"RAY_AUTH_TOKEN": "0123456789abcdef"},
                        "rejected the token from RAY_AUTH_TOKEN"),
        "no token": (["list"], NO_TOKEN, "requires the cluster's token"),
        # job ids
        "unknown job status": (["status", "no-such-job"], {}, "no job 'no-such-job'"),
        "unknown job logs": (["logs", "no-such-job"], {}, "no job 'no-such-job'"),
        "unknown job stop": (["stop", "no-such-job"], {}, "no job 'no-such-job'"),
        "malformed job id": (["status", "bad/id"], {}, "job id 'bad/id' is malformed"),
        "job id with space": (["logs", "two words"], {}, "is malformed"),
        "submit malformed job id": (["submit", good, "--job-id", "-starts-with-dash"], {},
                                    "is malformed"),
        # run directories
        "report missing run": (["report", str(tmp / "no_run")], {}, "no_run"),
        "report without results": (["report", str(tmp / "run_without_results")], {},
                                   "results.json"),
        "resume missing run": (["run", "--resume", str(tmp / "no_run")], {}, "no_run"),
        "resume a file": (["run", "--resume", str(tmp / "a_file")], {}, "a_file"),
        # cluster descriptions
        "cluster missing": (["cluster", "up", "--cluster", str(tmp / "nope.yaml")], {},
                            "cluster description not found"),
        "cluster not YAML": (["cluster", "down", "--cluster", str(tmp / "cluster_broken.yaml")],
                             {}, "not valid YAML"),
        "cluster not local": (["cluster", "up", "--cluster", str(tmp / "cluster_aws.yaml")], {},
                              "provider.type must be local"),
        "cluster unknown key": (["cluster", "up", "--cluster",
                                 str(tmp / "cluster_unknown_key.yaml")], {}, "colour"),
        "cluster no workers": (["cluster", "up", "--cluster",
                                str(tmp / "cluster_no_workers.yaml")], {}, "worker_ips"),
        "cluster bad cost": (["cluster", "status", "--cluster",
                              str(tmp / "cluster_bad_cost.yaml")], {},
                             "metadata.metapeft.cost.energy_usd_per_kwh: must be >= 0"),
        "submit bad cluster": (["submit", good, "--cluster", str(tmp / "cluster_aws.yaml")], {},
                               "provider.type must be local"),
        # what `ray up` needs on this machine, checked before it starts
        "cluster up without ssh key": (["cluster", "up", "--cluster", str(CLUSTER_YAML)],
                                       NO_TOKEN, "auth.ssh_private_key ~/.ssh/id_ed25519 "
                                                 "does not exist"),
        "cluster up without token": (["cluster", "up", "--cluster", str(CLUSTER_YAML)],
                                     {"HOME": "KEY_HOME"}, "ray get-auth-token --generate"),
    }


def test_bad_inputs_get_one_line_and_exit_2(head, tmp_path):
    """45 bad inputs through the real command; a few need the real job server (tokens,
    unknown jobs), so they share the head."""
    homes = {"EMPTY_HOME": tmp_path / "empty_home", "KEY_HOME": tmp_path / "key_home"}
    homes["EMPTY_HOME"].mkdir()
    (homes["KEY_HOME"] / ".ssh").mkdir(parents=True)
    (homes["KEY_HOME"] / ".ssh" / "id_ed25519").write_text("a key\n")
    table = _bad_inputs(tmp_path, head)
    assert len(table) >= 30

    def check(item) -> str | None:
        name, (args, env, phrase) = item
        env = {key: str(homes.get(value, value)) for key, value in env.items()}
        out = head.cli(*args, timeout=120, **env)
        lines = out.stderr.strip().splitlines()
        ok = (out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
              and phrase in lines[0] and "Traceback" not in out.stderr)
        return None if ok else f"{name}: exit {out.returncode}, stderr {out.stderr!r}"

    # four commands at a time: each is a process of its own, mostly starting Python
    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(check, table.items()) if f is not None]
    assert not failures, "\n".join(failures)


def test_a_duplicate_job_id_is_refused(head, finished):
    assert finished["out"].returncode == 0, finished["out"].stderr
    again = head.cli("submit", finished["spec"], "--job-id", TINY_JOB_ID)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1
    assert f"already has a job '{TINY_JOB_ID}'" in lines[0]
