"""The ``metapeft`` command: parse, call one ``api`` function, print.

Imports neither mlx nor ray at load time, so ``metapeft --help`` is instant. Exit codes:
0 success, 1 the job failed (or was stopped), 2 usage, spec, address or cluster error.
Every read command takes ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from typing import Any

import click

from metapeft_dist.config import ConfigError

EXIT_FAILED, EXIT_USAGE = 1, 2


def _fail_usage(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@contextlib.contextmanager
def _one_line_errors():
    """Bad input and unusable clusters become one ``error:`` line and exit status 2."""
    from metapeft_dist.remote import RemoteError
    from metapeft_dist.runtime.jobs import JobsError
    from metapeft_dist.runtime.launcher import ClusterConfigError

    try:
        yield
    except (ConfigError, RemoteError, JobsError, ClusterConfigError) as err:
        _fail_usage(str(err).splitlines()[0] if str(err) else type(err).__name__)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=1))


def _server_options(func):
    """--address, --token-file, --insecure: which job server, and its credentials."""
    func = click.option(
        "--insecure", is_flag=True,
        help="Allow plain http to another machine without a token. Anyone who reaches an "
             "unauthenticated Ray job server can run code on every node: only on a "
             "network that trusted machines alone can reach.")(func)
    func = click.option(
        "--token-file", type=click.Path(dir_okay=False), metavar="PATH",
        help="File holding the cluster's Ray token (default: $RAY_AUTH_TOKEN, "
             "$RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token).")(func)
    return click.option(
        "--address", envvar="METAPEFT_ADDRESS", metavar="URL",
        help="The cluster's Ray job server, http(s)://HOST:PORT (default: "
             "$METAPEFT_ADDRESS, else http://127.0.0.1:8265).")(func)


def _cluster_option(func):
    return click.option(
        "--cluster", "cluster", envvar="METAPEFT_CLUSTER", type=click.Path(dir_okay=False),
        metavar="YAML",
        help="Cluster description (cluster/mac-cluster.yaml): Ray's launcher config with "
             "the node cost figures (default: $METAPEFT_CLUSTER).")(func)


def _raise_stopped(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def _overrides(func):
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a spec field, e.g. --set algorithm.iterations=100 (repeatable).",
    )(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metapeft-dist")
def main() -> None:
    """Meta-learn LoRA initializations over task distributions, with MLX."""


class _ProgressPrinter:
    """Renders runner progress on stderr: a bar for meta-training, lines otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.shown = 0
        # In a submitted job stderr is a log file: a bar would print once, so print a
        # line every tenth of the way instead.
        self.lines = not sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        if stage == "setup":
            click.echo(f"run directory: {info['run_dir']}", err=True)
        elif stage == "meta-train" and self.lines:
            if done == total or done * 10 // total > self.shown * 10 // total:
                text = f"meta-training {done}/{total}: loss {info['loss']:.4f}"
                if "val" in info:
                    text += f"  val {info['val']:.4f}"
                click.echo(text, err=True)
            self.shown = done
        elif stage == "meta-train":
            if self.bar is None:
                self.bar = click.progressbar(length=total, label="meta-training",
                                             file=sys.stderr, show_pos=True, show_eta=True,
                                             item_show_func=lambda x: x)
                self.bar.__enter__()
            text = f"loss {info['loss']:.4f}"
            if "val" in info:
                text += f"  val {info['val']:.4f}"
            self.bar.current_item = text
            self.bar.update(done - self.shown)
            self.shown = done
            if done == total:
                self.bar.__exit__(None, None, None)
        elif stage == "evaluate":
            click.echo(f"evaluating {done}/{total}: {info['init']} init, "
                       f"{info['shots']}-shot", err=True)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False), required=False)
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Write the run here (default: run.out_dir/NAME-TIMESTAMP).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the killed run in this directory from its newest good "
                   "checkpoint (no SPEC: the run's own spec is used).")
@click.option("--address", metavar="ADDRESS",
              help="Join the Ray cluster at ADDRESS (e.g. 10.0.0.2:6379); default: start "
                   "an embedded local Ray for the job.")
@_overrides
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of a table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def run(spec: str | None, run_dir: str | None, resume_dir: str | None, address: str | None,
        overrides: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Meta-train and evaluate the job in SPEC (on Ray unless runtime.mode is local)."""
    from metapeft_dist import api

    if (spec is None) == (resume_dir is None):
        _fail_usage("give either SPEC or --resume RUN_DIR")
    if resume_dir is not None and (overrides or run_dir):
        _fail_usage("--resume continues a run as it was; --set and --run-dir do not apply")
    job_spec = None
    if spec is not None:
        try:
            job_spec = api.load(spec, overrides)
        except ConfigError as err:
            _fail_usage(str(err))
    from metapeft_dist.results import format_table
    from metapeft_dist.runner import RunDirError
    from metapeft_dist.runtime.driver import ClusterError, StallError

    progress = _ProgressPrinter(quiet or as_json)

    def log(message: str) -> None:
        click.echo(f"metapeft: {message}", err=True)

    # `metapeft stop` (Ray's job server) sends SIGTERM: end like Ctrl-C, so the run
    # directory records the job as stopped and its checkpoints stay resumable.
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        if resume_dir is not None:
            results = api.resume(resume_dir, address, on_progress=progress, log=log)
        else:
            results = api.run(job_spec, run_dir, address=address, on_progress=progress,
                              log=log)
    except (RunDirError, ClusterError, ConfigError) as err:
        _fail_usage(str(err))
    except StallError as err:
        click.echo(f"error: the job failed: {err}", err=True)
        sys.exit(EXIT_FAILED)
    except (KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and err.code != signal.SIGTERM:
            raise
        where = resume_dir or run_dir or "its run directory"
        click.echo(f"metapeft: stopped; continue with metapeft run --resume {where}",
                   err=True)
        sys.exit(EXIT_FAILED)
    click.echo(json.dumps(results, indent=1) if as_json else format_table(results))


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@_overrides
@click.option("--json", "as_json", is_flag=True, help="Print {spec, valid, errors} as JSON.")
def validate(spec: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check SPEC and list every error with its field path (exit 2 if any)."""
    from metapeft_dist import api

    errors = api.validate(spec, overrides)
    if as_json:
        click.echo(json.dumps({"spec": spec, "valid": not errors, "errors": errors}))
    else:
        for line in errors:
            click.echo(f"error: {line}", err=True)
        if not errors:
            click.echo(f"{spec}: valid")
    sys.exit(2 if errors else 0)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write the plots here (default: RUN_DIR/report).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {written, skipped} as JSON instead of one path per line.")
def report(run_dir: str, out_dir: str | None, as_json: bool) -> None:
    """Plot the finished run in RUN_DIR as PNGs: training, shots, cost, throughput.

    A plot whose data results.json lacks (a run recorded before cost or throughput
    tracking) is skipped with its reason on stderr.
    """
    from metapeft_dist import api
    from metapeft_dist.report import ReportError

    try:
        outcome = api.report(run_dir, out_dir)
    except ReportError as err:
        _fail_usage(str(err))
    if as_json:
        click.echo(json.dumps(outcome))
        return
    for path in outcome["written"]:
        click.echo(path)
    for name, reason in outcome["skipped"].items():
        click.echo(f"skipped {name}: {reason}", err=True)


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


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@_server_options
@_cluster_option
@_overrides
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

    with _one_line_errors():
        info = api.submit(spec, address, overrides, cluster, token_file, insecure, job_id,
                          run_dir)
        if not as_json:
            click.echo(f"submitted {info['job_id']} (run directory on the head node: "
                       f"{info['run_dir']})", err=True)
        if wait:
            jobs = api.jobs(address, token_file, insecure)
            info = _follow(jobs, info["job_id"], show_log=not quiet and not as_json)
    if as_json:
        _print_json(info)
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


@main.command()
@click.argument("job_id", metavar="[JOB]", required=False)
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the job's info as JSON.")
def status(job_id: str | None, address: str | None, token_file: str | None, insecure: bool,
           as_json: bool) -> None:
    """Show JOB's status (default: the cluster's newest job); exit 1 if it failed or
    was stopped."""
    from metapeft_dist import api

    with _one_line_errors():
        jobs = api.jobs(address, token_file, insecure)
        if job_id is None:
            listed = jobs.list()
            if not listed:
                _fail_usage(f"the cluster at {jobs.server.url} has no jobs yet")
            info = listed[-1]
        else:
            info = jobs.info(job_id)
    if as_json:
        _print_json(info)
    else:
        click.echo(_describe(info))
        for key in ("name", "run_dir", "start_time", "end_time", "exit_code"):
            if info.get(key) is not None:
                click.echo(f"  {key}: {info[key]}")
    sys.exit(EXIT_FAILED if info["status"] in _ENDED_BADLY else 0)


@main.command()
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

    with _one_line_errors():
        jobs = api.jobs(address, token_file, insecure)
        if follow and not as_json:
            info = _follow(jobs, job_id, show_log=True)
            sys.exit(EXIT_FAILED if info["status"] in _ENDED_BADLY else 0)
        info = jobs.wait(job_id) if follow else jobs.info(job_id)
        text = jobs.logs(job_id)
    if as_json:
        _print_json({"job_id": job_id, "status": info["status"], "logs": text})
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("job_id", metavar="JOB")
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the job's info as JSON.")
def stop(job_id: str, address: str | None, token_file: str | None, insecure: bool,
         as_json: bool) -> None:
    """Stop JOB: its driver is asked to end (SIGTERM; its run directory keeps the
    checkpoints, resumable with `metapeft run --resume`). Waits until it has."""
    from metapeft_dist import api

    with _one_line_errors():
        info = api.jobs(address, token_file, insecure).stop(job_id)
    if as_json:
        _print_json(info)
    else:
        click.echo(_describe(info))


@main.command(name="list")
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as a JSON list.")
def list_jobs(address: str | None, token_file: str | None, insecure: bool,
              as_json: bool) -> None:
    """List the cluster's jobs, oldest first."""
    from metapeft_dist import api

    with _one_line_errors():
        listed = api.jobs(address, token_file, insecure).list()
    if as_json:
        _print_json(listed)
        return
    if not listed:
        click.echo("no jobs", err=True)
    for info in listed:
        click.echo(f"{info['job_id']:<48} {info['status']:<10} {info['start_time'] or '-':<26}"
                   f" {info['name'] or '(not metapeft)'}")


# --- the cluster ---------------------------------------------------------------------------

@main.group()
def cluster() -> None:
    """Bring a Mac cluster up and down (Ray's cluster launcher) and see its nodes."""


def _cluster_config_argument(func):
    return click.option(
        "--cluster", "config", envvar="METAPEFT_CLUSTER", type=click.Path(dir_okay=False),
        default="cluster/mac-cluster.yaml", show_default=True, metavar="YAML",
        help="Cluster description: Ray's launcher config with the node cost figures "
             "(or $METAPEFT_CLUSTER).")(func)


@cluster.command()
@_cluster_config_argument
def up(config: str) -> None:
    """Start (or update) the cluster: `ray up` over ssh, after checking the description."""
    from metapeft_dist import api

    with _one_line_errors():
        code = api.cluster_launch(config, "up")
    sys.exit(EXIT_USAGE if code else 0)


@cluster.command()
@_cluster_config_argument
def down(config: str) -> None:
    """Stop Ray on every node of the cluster: `ray down`."""
    from metapeft_dist import api

    with _one_line_errors():
        code = api.cluster_launch(config, "down")
    sys.exit(EXIT_USAGE if code else 0)


@cluster.command(name="status")
@_server_options
@click.option("--cluster", "config", envvar="METAPEFT_CLUSTER",
              type=click.Path(dir_okay=False), metavar="YAML",
              help="Cluster description, for node cost rates and the machines that have "
                   "not joined (default: $METAPEFT_CLUSTER; without one, default rates).")
@click.option("--json", "as_json", is_flag=True, help="Print the nodes as JSON.")
def cluster_status(address: str | None, token_file: str | None, insecure: bool,
                   config: str | None, as_json: bool) -> None:
    """Show the cluster's nodes: IP, role, health, `mlx` resource, CPUs, cost rate."""
    from metapeft_dist import api

    with _one_line_errors():
        status_ = api.cluster_status(config, address, token_file, insecure)
    if as_json:
        _print_json(status_)
        return
    click.echo(f"{'node':<18} {'role':<7} {'state':<8} {'mlx':>4} {'cpus':>5} {'usd/h':>8}")
    for row in status_["nodes"]:
        click.echo(f"{row['ip']:<18} {'head' if row['head'] else 'worker':<7} "
                   f"{row['state']:<8} {row['mlx']:>4.0f} {row['cpus']:>5.0f} "
                   f"{row['rate_usd_per_hour']:>8.4f}")
    click.echo(f"{status_['alive']} node(s) alive, {status_['mlx']:.0f} MLX worker slot(s), "
               f"{status_['rate_usd_per_hour']:.4f} usd/h while reserved")


if __name__ == "__main__":
    main()
