"""The cluster commands of ``metapeft``: submit, status, logs, stop and list jobs on a
cluster's Ray job server, and ``cluster up|down|status``. Thin over ``api``, like
local.py; cli/__init__.py adds them to the ``main`` group."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from metapeft_dist.cli.common import (EXIT_FAILED, EXIT_USAGE, fail_usage, one_line_errors,
                                      overrides_option, print_json)


def _cluster_option(func):
    return click.option(
        "--cluster", "cluster", envvar="METAPEFT_CLUSTER", type=click.Path(),
        metavar="YAML",
        help="Cluster description (cluster/mac-cluster.yaml): Ray's launcher config with "
             "the node cost figures (default: $METAPEFT_CLUSTER).")(func)


def _server_options(func):
    """--address, --token-file, --insecure: which job server, and its credentials."""
    func = click.option(
        "--insecure", is_flag=True,
        help="Allow plain http to another machine without a token. Anyone who reaches an "
             "unauthenticated Ray job server can run code on every node: only on a "
             "network that trusted machines alone can reach.")(func)
    func = click.option(
        "--token-file", type=click.Path(), metavar="PATH",
        help="File holding the cluster's Ray token (default: $RAY_AUTH_TOKEN, "
             "$RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token).")(func)
    return click.option(
        "--address", envvar="METAPEFT_ADDRESS", metavar="URL",
        help="The cluster's Ray job server, http(s)://HOST:PORT (default: "
             "$METAPEFT_ADDRESS, else http://127.0.0.1:8265).")(func)


# --- jobs on a cluster ------------------------------------------------------------------

_ENDED_BADLY = ("FAILED", "STOPPED")


def _describe(info: dict[str, Any]) -> str:
    parts = [f"{info['job_id']}: {info['status']}"]
    if info.get("duration_s") is not None:
        parts.append(f"after {info['duration_s']:.0f} s")
    reason = info.get("error") or (info.get("message") or "").strip().splitlines()[:1]
    if info.get("status") in _ENDED_BADLY and reason:
        parts.append(f"({reason if isinstance(reason, str) else reason[0]})")
    return " ".join(parts)


@click.command()
@click.argument("spec", type=click.Path())
@_server_options
@_cluster_option
@overrides_option
@click.option("--job-id", metavar="ID", help="Submission id (default: "
              "metapeft-NAME-TIMESTAMP-XXXX).")
@click.option("--run-dir", metavar="DIR", help="Run directory on the head node (default: "
              "~/metapeft/runs/JOB_ID).")
@click.option("--wait", is_flag=True, help="Follow the job's log until it ends; exit 1 if "
              "it failed or was stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print the job's info as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="With --wait: no log, only the outcome.")
def submit(spec: str, address: str | None, token_file: str | None, insecure: bool,
           cluster: str | None, overrides: tuple[str, ...], job_id: str | None,
           run_dir: str | None, wait: bool, as_json: bool, quiet: bool) -> None:
    """Validate SPEC here, then run it on the cluster (`metapeft run` on the head node).

    Prints the job id; `metapeft status|logs|stop JOB` follow it from there.
    """
    from metapeft_dist import api

    with one_line_errors():
        info = api.submit(spec, address, overrides, cluster, token_file, insecure, job_id,
                          run_dir)
        if not as_json:
            click.echo(f"submitted {info['job_id']} (run directory on the head node: "
                       f"{info['run_dir']})", err=True)
        if wait:
            jobs = api.jobs(address, token_file, insecure)
            info = _follow(jobs, info["job_id"], show_log=not quiet and not as_json)
    if as_json:
        print_json(info)
    else:
        click.echo(info["job_id"] if not wait else _describe(info))
    sys.exit(EXIT_FAILED if info["status"] in _ENDED_BADLY else 0)


def _follow(jobs, job_id: str, show_log: bool) -> dict[str, Any]:
    """Stream the job's log (stdout) and its status changes (stderr) until it ends."""
    started = time.monotonic()

    def on_status(info: dict[str, Any]) -> None:
        click.echo(f"[{time.monotonic() - started:5.0f} s] {info['job_id']}: "
                   f"{info['status']}", err=True)

    def on_text(text: str) -> None:
        if show_log:
            click.echo(text, nl=False)

    return jobs.follow(job_id, on_text, on_status)


@click.command()
@click.argument("job_id", metavar="[JOB]", required=False)
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the job's info as JSON.")
def status(job_id: str | None, address: str | None, token_file: str | None, insecure: bool,
           as_json: bool) -> None:
    """Show JOB's status (default: the cluster's newest job); exit 1 if it failed or
    was stopped."""
    from metapeft_dist import api

    with one_line_errors():
        jobs = api.jobs(address, token_file, insecure)
        if job_id is None:
            listed = jobs.list()
            if not listed:
                fail_usage(f"the cluster at {jobs.server.url} has no jobs yet")
            info = listed[-1]
        else:
            info = jobs.info(job_id)
    if as_json:
        print_json(info)
    else:
        click.echo(_describe(info))
        for key in ("name", "run_dir", "start_time", "end_time", "exit_code"):
            if info.get(key) is not None:
                click.echo(f"  {key}: {info[key]}")
    sys.exit(EXIT_FAILED if info["status"] in _ENDED_BADLY else 0)


@click.command()
@click.argument("job_id", metavar="JOB")
@_server_options
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends; "
              "exit 1 if it failed or was stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print {job_id, status, logs} as "
              "JSON (with --follow: once the job has ended).")
def logs(job_id: str, address: str | None, token_file: str | None, insecure: bool,
         follow: bool, as_json: bool) -> None:
    """Print JOB's log (its driver's stdout and stderr, on the head node)."""
    from metapeft_dist import api

    with one_line_errors():
        jobs = api.jobs(address, token_file, insecure)
        if follow and not as_json:
            info = _follow(jobs, job_id, show_log=True)
            sys.exit(EXIT_FAILED if info["status"] in _ENDED_BADLY else 0)
        info = jobs.wait(job_id) if follow else jobs.info(job_id)
        text = jobs.logs(job_id)
    if as_json:
        print_json({"job_id": job_id, "status": info["status"], "logs": text})
    else:
        click.echo(text, nl=False)


@click.command()
@click.argument("job_id", metavar="JOB")
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the job's info as JSON.")
def stop(job_id: str, address: str | None, token_file: str | None, insecure: bool,
         as_json: bool) -> None:
    """Stop JOB: its driver is asked to end (SIGTERM; its run directory keeps the
    checkpoints, resumable with `metapeft run --resume`). Waits until it has."""
    from metapeft_dist import api

    from metapeft_dist.runtime.jobs import TERMINAL

    with one_line_errors():
        jobs = api.jobs(address, token_file, insecure)
        if jobs.info(job_id)["status"] not in TERMINAL and \
                not as_json:
            click.echo(f"stopping {job_id} ...", err=True)
        info = jobs.stop(job_id)
    if as_json:
        print_json(info)
    else:
        click.echo(_describe(info))


@click.command(name="list")
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as a JSON list.")
def list_jobs(address: str | None, token_file: str | None, insecure: bool,
              as_json: bool) -> None:
    """List the cluster's jobs, oldest first."""
    from metapeft_dist import api

    with one_line_errors():
        listed = api.jobs(address, token_file, insecure).list()
    if as_json:
        print_json(listed)
        return
    if not listed:
        click.echo("no jobs", err=True)
    for info in listed:
        click.echo(f"{info['job_id']:<48} {info['status']:<10} {info['start_time'] or '-':<26}"
                   f" {info['name'] or '(not metapeft)'}")


# --- the cluster ---------------------------------------------------------------------------

@click.group()
def cluster() -> None:
    """Bring a Mac cluster up and down (Ray's cluster launcher) and see its nodes."""


def _cluster_config_argument(func):
    return click.option(
        "--cluster", "config", envvar="METAPEFT_CLUSTER", type=click.Path(),
        default="cluster/mac-cluster.yaml", show_default=True, metavar="YAML",
        help="Cluster description: Ray's launcher config with the node cost figures "
             "(or $METAPEFT_CLUSTER).")(func)


@cluster.command()
@_cluster_config_argument
def up(config: str) -> None:
    """Start (or update) the cluster: `ray up` over ssh, after checking the description."""
    from metapeft_dist import api

    with one_line_errors():
        code = api.cluster_launch(config, "up")
    sys.exit(EXIT_USAGE if code else 0)


@cluster.command()
@_cluster_config_argument
def down(config: str) -> None:
    """Stop Ray on every node of the cluster: `ray down`."""
    from metapeft_dist import api

    with one_line_errors():
        code = api.cluster_launch(config, "down")
    sys.exit(EXIT_USAGE if code else 0)


@cluster.command(name="status")
@_server_options
@click.option("--cluster", "config", envvar="METAPEFT_CLUSTER",
              type=click.Path(), metavar="YAML",
              help="Cluster description, for node cost rates and the machines that have "
                   "not joined (default: $METAPEFT_CLUSTER; without one, default rates).")
@click.option("--json", "as_json", is_flag=True, help="Print the nodes as JSON.")
def cluster_status(address: str | None, token_file: str | None, insecure: bool,
                   config: str | None, as_json: bool) -> None:
    """Show the cluster's nodes: IP, role, health, `mlx` resource, CPUs, cost rate."""
    from metapeft_dist import api

    with one_line_errors():
        status_ = api.cluster_status(config, address, token_file, insecure)
    if as_json:
        print_json(status_)
        return
    click.echo(f"{'node':<18} {'role':<7} {'state':<8} {'mlx':>4} {'cpus':>5} {'usd/h':>8}")
    for row in status_["nodes"]:
        click.echo(f"{row['ip']:<18} {'head' if row['head'] else 'worker':<7} "
                   f"{row['state']:<8} {row['mlx']:>4.0f} {row['cpus']:>5.0f} "
                   f"{row['rate_usd_per_hour']:>8.4f}")
    click.echo(f"{status_['alive']} node(s) alive, {status_['mlx']:.0f} MLX worker slot(s), "
               f"{status_['rate_usd_per_hour']:.4f} usd/h while reserved")
