"""The cluster description (cluster/mac-cluster.yaml): Ray's cluster-launcher config for
on-premises Macs, plus the node cost figures under ``metadata.metapeft.cost`` (Ray
keeps ``metadata`` for its users and ignores it).

``metapeft cluster up|down`` check the file with Ray's own validation, then run
``ray up`` / ``ray down``; ``metapeft cluster status`` joins the nodes the job server
reports with their cost rates; ``metapeft submit --cluster`` carries the cost section
into the job.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metapeft_dist.config import ConfigError, CostSpec, section_from_dict
from metapeft_dist.cost import SpendMeter

DEFAULT_CLUSTER = "cluster/mac-cluster.yaml"
CLUSTER_ENV = "METAPEFT_CLUSTER"


class ClusterConfigError(ValueError):
    """The cluster description is missing or invalid: one line (exit status 2)."""


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    name: str
    head_ip: str
    worker_ips: tuple[str, ...]
    ssh_user: str | None
    cost: CostSpec | None
    ssh_private_key: str | None = None
    file_mounts: tuple[tuple[str, str], ...] = ()  # (path on the nodes, local path)


def load_cluster(path: str | Path) -> ClusterConfig:
    """Read the cluster description and check it as ``ray up`` would."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClusterConfigError(f"cluster description not found: {path}") from None
    except IsADirectoryError:
        raise ClusterConfigError(f"cluster description {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ClusterConfigError(f"cannot read the cluster description {path}: {err}") \
            from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ClusterConfigError(f"{path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path} must be a mapping (Ray's cluster-launcher config)")
    provider = data.get("provider")
    if not isinstance(provider, dict) or provider.get("type") != "local":
        kind = provider.get("type") if isinstance(provider, dict) else None
        raise ClusterConfigError(f"{path}: provider.type must be local (on-premises "
                                 f"machines), got {kind!r}")
    validate_with_ray(data, path)
    cost = None
    meta = (data.get("metadata") or {}).get("metapeft") or {}
    if "cost" in meta:
        try:
            cost = section_from_dict(CostSpec, meta["cost"], "metadata.metapeft.cost")
        except ConfigError as err:
            raise ClusterConfigError(f"{path}: {err.lines()[0]}") from None
    return ClusterConfig(path=path, name=str(data.get("cluster_name", "default")),
                         head_ip=str(provider.get("head_ip")),
                         worker_ips=tuple(str(ip) for ip in provider.get("worker_ips", [])),
                         ssh_user=(data.get("auth") or {}).get("ssh_user"), cost=cost,
                         ssh_private_key=(data.get("auth") or {}).get("ssh_private_key"),
                         file_mounts=tuple((str(k), str(v)) for k, v in
                                           (data.get("file_mounts") or {}).items()))


def validate_with_ray(data: dict[str, Any], path: Path) -> None:
    """Ray's own checks, as ``ray up`` runs them: fill in the local provider's node type
    and defaults, then validate against Ray's JSON schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        # Ray prints its own complaint before raising it; the raised one is reported.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            validate_config(prepare_config(copy.deepcopy(data)))
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "top level"
        raise ClusterConfigError(f"{path}: {where}: {err.message}") from None
    except (Exception, SystemExit) as err:  # ray aborts through click or SystemExit
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterConfigError(f"{path}: {text}") from None


def ray_executable() -> str:
    """The ``ray`` next to this Python (the venv's), else the one on PATH."""
    sibling = Path(sys.executable).with_name("ray")
    found = str(sibling) if sibling.exists() else shutil.which("ray")
    if found is None:
        raise ClusterConfigError("the `ray` command is not installed next to this Python "
                                 "or on PATH")
    return found


def preflight(config: ClusterConfig, cwd: Path | None = None) -> None:
    """What ``ray up`` needs on this machine, checked before it starts (it would fail
    half-way with a traceback): the SSH key, and every local path it copies to the
    nodes, relative to the directory it runs in."""
    cwd = Path.cwd() if cwd is None else cwd
    if config.ssh_private_key:
        key = Path(config.ssh_private_key).expanduser()
        if not key.is_file():
            raise ClusterConfigError(
                f"{config.path}: auth.ssh_private_key {config.ssh_private_key} does not "
                "exist: create it (ssh-keygen -t ed25519) and add its .pub to "
                "~/.ssh/authorized_keys on every node")
    for remote, local in config.file_mounts:
        source = Path(local).expanduser()
        source = source if source.is_absolute() else cwd / source
        if not source.exists():
            hint = " (create the cluster token: ray get-auth-token --generate)" \
                if source.name == "auth_token" else ""
            raise ClusterConfigError(f"{config.path}: file_mounts[{remote!r}]: {local} does "
                                     f"not exist here{hint}")
        if local in (".", "./") and not (source / "pyproject.toml").is_file():
            raise ClusterConfigError(f"{config.path}: file_mounts copies {source} as the "
                                     "project: run from the root of the metapeft checkout")


def launch(config: ClusterConfig, action: str) -> int:
    """``ray up -y`` or ``ray down -y`` on the cluster; Ray's output goes to the terminal.
    Returns its exit status."""
    if action not in ("up", "down"):
        raise ValueError(action)
    preflight(config)
    return subprocess.call([ray_executable(), action, "-y", str(config.path)])


def node_table(nodes: list[dict[str, Any]], config: ClusterConfig | None) -> list[dict[str, Any]]:
    """The job server's nodes with each one's cost rate, plus every machine the cluster
    description names that has not joined (state MISSING)."""
    cost = config.cost if config is not None and config.cost is not None else CostSpec()
    meter = SpendMeter(cost.node_table(), cost.energy_usd_per_kwh)
    rows = []
    for node in nodes:
        meter.add_node(node["ip"])
        rows.append({**node, "rate_usd_per_hour": meter.rate_usd_per_hour(node["ip"])})
    if config is not None:
        joined = {node["ip"] for node in nodes if node["state"] == "ALIVE"}
        for ip in (config.head_ip, *config.worker_ips):
            if ip not in joined and not any(row["ip"] == ip for row in rows):
                meter.add_node(ip)
                rows.append({"node_id": None, "ip": ip, "head": ip == config.head_ip,
                             "state": "MISSING", "mlx": 0.0, "cpus": 0.0,
                             "memory_bytes": 0.0,
                             "rate_usd_per_hour": meter.rate_usd_per_hour(ip)})
    return rows
