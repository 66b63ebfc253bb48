"""cluster/ and deploy/: the cluster-launcher config passes Ray's own validation, its
node costs load into the job spec's cost section and give the hand-computed rates, the
launchd plists and systemd units pass their platforms' checkers, the cluster Prometheus
config passes promtool and mirrors monitoring/prometheus.yml, and every way of starting
a node passes Ray's `ray start` parser with the same flags."""

from __future__ import annotations

import copy
import json
import plistlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from metapeft_dist.config import ConfigError, from_dict, load_spec
from metapeft_dist.config.schema import CostSpec
from metapeft_dist.cost import SpendMeter
from metapeft_dist.runtime.launcher import load_cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster" / "mac-cluster.yaml"
DEPLOY = ROOT / "deploy"
PLISTS = {"head": DEPLOY / "launchd" / "io.metapeft.ray-head.plist",
          "worker": DEPLOY / "launchd" / "io.metapeft.ray-worker.plist"}
UNITS = {"head": DEPLOY / "systemd" / "metapeft-ray-head.service",
         "worker": DEPLOY / "systemd" / "metapeft-ray-worker.service"}
PROMETHEUS = DEPLOY / "prometheus-cluster.yml"
MINIMAL_SPEC = {"family": {"name": "sinusoid"}, "algorithm": {"name": "maml"}}
MAC_OBJECT_STORE_CAP = 2 * 1024**3  # bytes; macOS caps Ray's object store here


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def bootstrap(config: dict) -> dict:
    """What `ray up` does with the file before touching any machine: prepare_config
    (the local provider's single node type, defaults.yaml merged in), the schema and
    consistency checks of validate_config, and the local provider's bootstrap_config.
    No SSH; no config cache is read or written."""
    from ray.autoscaler._private.commands import _bootstrap_config

    return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)


# --- (a) the cluster-launcher config ---------------------------------------------------

def test_cluster_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster_config()
    validate_config(prepare_config(copy.deepcopy(config)))
    resolved = bootstrap(config)
    # Manual on-prem mode: one node type, every listed worker kept (min = max = 2).
    resolved["provider"].pop("_config_cache_path")
    assert resolved["provider"] == config["provider"]
    assert resolved["head_node_type"] == "local.cluster.node"
    node_type = resolved["available_node_types"]["local.cluster.node"]
    assert (node_type["min_workers"], node_type["max_workers"]) == (2, 2)
    assert resolved["max_workers"] == 2
    # Ray keeps the free-form metadata as written.
    assert resolved["metadata"] == config["metadata"]
    # Setup runs on the head and on the workers alike.
    assert resolved["head_setup_commands"] == resolved["worker_setup_commands"] \
        == config["setup_commands"]


def test_cluster_config_copies_the_checkout_and_the_token():
    config = cluster_config()
    assert config["cluster_name"] == "metapeft"
    assert config["file_mounts"] == {"~/metapeft/src": ".",
                                     "~/.ray/auth_token": "~/.ray/auth_token"}
    assert {".venv", "runs", ".bench", ".git"} <= set(config["rsync_exclude"])
    assert any("pip install" in cmd and "-e ~/metapeft/src" in cmd
               and cmd.startswith("~/metapeft/.venv/bin/") for cmd in config["setup_commands"])
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        program = next(word for word in shlex.split(cmd) if "=" not in word
                       or word.startswith("-"))
        assert program == "~/metapeft/.venv/bin/ray", cmd


@pytest.mark.parametrize("breakage, error", [
    # cost figures at the top level instead of under metadata: not a Ray key
    (lambda c: c.update(cost=c["metadata"]["metapeft"]["cost"]), jsonschema.ValidationError),
    (lambda c: c.update(head_start_ray_commands="ray start --head"),
     jsonschema.ValidationError),
    (lambda c: c["provider"].pop("head_ip"), click.ClickException),
])
def test_broken_cluster_config_fails_validation(breakage, error):
    config = cluster_config()
    breakage(config)
    with pytest.raises(error):
        bootstrap(config)


# --- (b) node costs in metadata.metapeft.cost ------------------------------------------

def test_cluster_cost_loads_into_the_job_spec_cost_section(tmp_path):
    config = cluster_config()
    cost = config["metadata"]["metapeft"]["cost"]
    fields = {field.name for field in CostSpec.__dataclass_fields__.values()}
    assert set(cost) <= fields
    # Every machine the launcher starts has its own figures, plus a default.
    provider = config["provider"]
    assert set(cost["nodes"]) == {"default", provider["head_ip"], *provider["worker_ips"]}

    # Through the YAML loader, as a spec file with that cost section.
    spec_file = tmp_path / "cluster-cost.yaml"
    spec_file.write_text(yaml.safe_dump({**MINIMAL_SPEC, "cost": cost}))
    spec = load_spec(spec_file)
    assert spec.cost.energy_usd_per_kwh == 0.30
    # The loader `metapeft cluster` and `metapeft submit --cluster` use reads the same.
    cluster = load_cluster(CLUSTER_YAML)
    assert (cluster.head_ip, cluster.worker_ips) == ("10.0.0.11", ("10.0.0.12", "10.0.0.13"))
    assert cluster.cost == spec.cost
    meter = SpendMeter(spec.cost.node_table(), spec.cost.energy_usd_per_kwh)
    # 10.0.0.13, the Mac Studio: 3999 / (5 x 8760) + 90 / 1000 x 0.30
    #   = 0.0913013699 + 0.027 = 0.1183013699 usd per hour
    assert meter.rate_usd_per_hour("10.0.0.13") == pytest.approx(0.1183013699, rel=1e-9)
    # Found by its IP when Ray reports it by host name.
    meter.add_node("mac-studio.local", aliases=["10.0.0.13"])
    assert meter.rate_usd_per_hour("mac-studio.local") == pytest.approx(0.1183013699,
                                                                        rel=1e-9)
    # A node not listed, the default: 1399 / (4 x 8760) + 40 / 1000 x 0.30
    #   = 0.0399257991 + 0.012 = 0.0519257991 usd per hour
    assert meter.rate_usd_per_hour("10.0.0.99") == pytest.approx(0.0519257991, rel=1e-9)


def test_misspelled_cost_key_is_refused_by_the_loader():
    cost = copy.deepcopy(cluster_config()["metadata"]["metapeft"]["cost"])
    cost["nodes"]["10.0.0.12"]["wats"] = cost["nodes"]["10.0.0.12"].pop("watts")
    with pytest.raises(ConfigError, match=r"cost\.nodes\.10\.0\.0\.12\.wats"):
        from_dict({**MINIMAL_SPEC, "cost": cost})


# --- how each file starts Ray ------------------------------------------------------------

def cluster_start(role: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the cluster config's `ray start` for head or worker."""
    commands = cluster_config()[f"{role}_start_ray_commands"]
    assert shlex.split(commands[0]) == ["~/metapeft/.venv/bin/ray", "stop"]
    words = shlex.split(commands[-1])
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return words, env


def plist_start(role: str) -> tuple[list[str], dict[str, str]]:
    with PLISTS[role].open("rb") as f:
        plist = plistlib.load(f)
    return plist["ProgramArguments"], plist["EnvironmentVariables"]


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values of a unit file, backslash continuations joined."""
    settings: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_start(role: str) -> tuple[list[str], dict[str, str]]:
    settings = unit_settings(UNITS[role])
    env = dict(item.split("=", 1) for item in settings.get("Environment", []))
    (exec_start,) = settings["ExecStart"]
    return shlex.split(exec_start), env


def ray_start_params(argv: list[str]) -> dict:
    """`ray start`'s own click parser over the arguments: an unknown flag or a value of
    the wrong type (a --system-config that is not JSON) raises here."""
    from ray.scripts.scripts import start

    assert Path(argv[0]).name == "ray" and argv[1] == "start", argv
    params = start.make_context("start", list(argv[2:])).params
    return {name: value for name, value in params.items()
            if value is not None and value is not False}


# --- (c) launchd plists ---------------------------------------------------------------------

@pytest.mark.parametrize("role", ["head", "worker"])
def test_plist_has_the_launchd_keys(role):
    with PLISTS[role].open("rb") as f:  # expat: also refuses "--" inside a comment
        plist = plistlib.load(f)
    assert plist["Label"] == PLISTS[role].stem == f"io.metapeft.ray-{role}"
    assert plist["ProgramArguments"][:3] == ["/Users/USER/metapeft/.venv/bin/ray", "start",
                                             "--block"]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith("/Users/USER/Library/Logs/metapeft/ray-")
    assert plist["StandardOutPath"] != plist["StandardErrorPath"]


@pytest.mark.parametrize("role", ["head", "worker"])
def test_plist_passes_plutil_lint(role):
    plutil = shutil.which("plutil")
    if plutil is None:
        pytest.skip("plutil ships with macOS only; plistlib's parse above still checks "
                    "the XML and the keys")
    out = subprocess.run([plutil, "-lint", str(PLISTS[role])], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


# --- (d) systemd units ---------------------------------------------------------------------

def systemd_verify(unit: Path) -> str:
    """`systemd-analyze verify --man=no` output for ``unit``: empty when it is clean.

    systemd-analyze checks that ExecStart's program exists and is executable, and the
    units name /home/metapeft/metapeft/.venv/bin/ray, which exists only on a node. So
    the unit is copied to a temporary directory with that path (in ExecStart and
    ExecStop) swapped for the same program installed here, this environment's `ray`;
    everything else is verified as written. --man=no: the units' Documentation= is a
    file on the node, not a man page. systemd 252 does not check that User= exists.
    Unknown keys and bad values are only warnings (exit status 0), so any output at
    all counts as a failure."""
    return systemd_analyze_output(unit.read_text(), unit.name)


def systemd_analyze_output(text: str, name: str) -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Linux with systemd only)")
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        pytest.skip(f"no ray console script at {ray} to stand in for the node's")
    with tempfile.TemporaryDirectory() as tmp:
        copy_path = Path(tmp) / name
        copy_path.write_text(text.replace("/home/metapeft/metapeft/.venv/bin/ray", str(ray)))
        out = subprocess.run([analyze, "verify", "--man=no", str(copy_path)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return (out.stdout + out.stderr).strip()


@pytest.mark.parametrize("role", ["head", "worker"])
def test_unit_passes_systemd_analyze_verify(role):
    assert systemd_verify(UNITS[role]) == ""


@pytest.mark.parametrize("old, new, message", [
    ("Restart=on-failure", "Restart=sometimes", "restart specifier"),
    ("NoNewPrivileges=true", "NoNewPrivilegez=true", "Unknown key"),
])
def test_broken_unit_fails_systemd_analyze_verify(old, new, message):
    text = UNITS["head"].read_text()
    assert old in text
    assert message in systemd_analyze_output(text.replace(old, new), UNITS["head"].name)


@pytest.mark.parametrize("role", ["head", "worker"])
def test_unit_runs_ray_as_a_supervised_service(role):
    settings = unit_settings(UNITS[role])
    assert settings["User"] == ["metapeft"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["EnvironmentFile"] == ["-/etc/metapeft/ray.env"]
    assert settings["ExecStop"] == ["/home/metapeft/metapeft/.venv/bin/ray stop"]
    assert settings["NoNewPrivileges"] == ["true"]
    # /tmp/ray (session, sockets, Prometheus service discovery) must stay shared.
    assert "PrivateTmp" not in settings
    argv, _ = unit_start(role)
    assert argv[:3] == ["/home/metapeft/metapeft/.venv/bin/ray", "start", "--block"]


# --- (e) Prometheus on the head ----------------------------------------------------------

def test_cluster_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu: apt-get install prometheus, "
                    "which scripts/setup.sh does; macOS: brew install prometheus)")
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS.relative_to(ROOT))],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 2 rule files found" in out.stdout


def test_cluster_prometheus_config_mirrors_the_monitoring_one():
    cluster = yaml.safe_load(PROMETHEUS.read_text())
    laptop = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert cluster["scrape_configs"] == laptop["scrape_configs"]
    assert [(PROMETHEUS.parent / path).resolve() for path in cluster["rule_files"]] == \
        [(ROOT / "monitoring" / path).resolve() for path in laptop["rule_files"]]
    by_job = {job["job_name"]: job for job in cluster["scrape_configs"]}
    assert by_job["metapeft"]["static_configs"] == [{"targets": ["127.0.0.1:9450"]}]
    assert by_job["metapeft"]["honor_labels"] is True
    assert by_job["pushgateway"]["static_configs"] == [{"targets": ["127.0.0.1:9091"]}]
    assert by_job["pushgateway"]["honor_labels"] is True
    assert by_job["ray"]["file_sd_configs"][0]["files"] == \
        ["/tmp/ray/prom_metrics_service_discovery.json"]


# --- (f) the same `ray start` everywhere ---------------------------------------------------

STARTS = {
    "cluster": cluster_start,
    "launchd": plist_start,
    "systemd": unit_start,
}


@pytest.mark.parametrize("role", ["head", "worker"])
@pytest.mark.parametrize("source", sorted(STARTS))
def test_ray_start_flags(source, role):
    argv, env = STARTS[source](role)
    params = ray_start_params(argv)
    assert json.loads(params["resources"]) == {"mlx": 1}
    assert 0 < params["object_store_memory"] <= MAC_OBJECT_STORE_CAP
    assert params["disable_usage_stats"] is True
    assert env["RAY_AUTH_MODE"] == "token"
    if source != "systemd":  # the Mac ones
        assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    if role == "head":
        assert params["head"] is True and params["port"] == 6379
        assert params["dashboard_host"] == "127.0.0.1"
        assert params["system_config"] == {"max_direct_call_object_size": 1048576}
        assert "address" not in params
    else:
        assert "head" not in params
        if source == "systemd":  # host:port from /etc/metapeft/ray.env
            assert params["address"] == "${RAY_HEAD_ADDRESS}"
        else:
            host, _, port = params["address"].rpartition(":")
            assert port == "6379" and host
        assert "system_config" not in params  # taken from the head


@pytest.mark.parametrize("role", ["head", "worker"])
def test_ray_start_flags_agree_across_files(role):
    """Only what the supervisor asks for differs: the launcher passes the autoscaling
    config (head) and starts Ray in the background; launchd and systemd hold it in the
    foreground (--block); the worker's head address is each file's own way of naming it."""
    def comparable(source: str) -> dict:
        params = ray_start_params(STARTS[source](role)[0])
        for name in ("block", "autoscaling_config", "address"):
            params.pop(name, None)
        return params

    cluster = comparable("cluster")
    assert comparable("launchd") == cluster
    assert comparable("systemd") == cluster
    assert ray_start_params(cluster_start(role)[0]).get("block") is None
    assert ray_start_params(plist_start(role)[0])["block"] is True
    assert ray_start_params(unit_start(role)[0])["block"] is True
    if role == "head":
        assert ray_start_params(cluster_start(role)[0])["autoscaling_config"] == \
            "~/ray_bootstrap_config.yaml"
    addresses = {source: ray_start_params(STARTS[source](role)[0]).get("address")
                 for source in STARTS}
    expected = ({"cluster": "$RAY_HEAD_IP:6379", "launchd": "HEAD_IP:6379",
                 "systemd": "${RAY_HEAD_ADDRESS}"} if role == "worker"
                else dict.fromkeys(STARTS))
    assert addresses == expected
