"""The library API. The CLI is a thin shell over these functions; everything it can do,
a Python user can do here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from metapeft_dist.config import ConfigError, JobSpec, load_spec

if TYPE_CHECKING:
    from metapeft_dist.runtime.jobs import ClusterJobs
    from metapeft_dist.runtime.launcher import ClusterConfig


def load(spec: str | Path | JobSpec, overrides: Sequence[str] = ()) -> JobSpec:
    """A validated :class:`JobSpec` from a path (or a spec, returned as is).

    Raises :class:`ConfigError` naming every bad field.
    """
    if isinstance(spec, JobSpec):
        if overrides:
            raise ValueError("overrides apply to spec files, not to a JobSpec")
        return spec
    return load_spec(spec, overrides)


def validate(spec_path: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """Every problem in a spec file, one line each; empty when it is valid."""
    try:
        load_spec(spec_path, overrides)
    except ConfigError as err:
        return err.lines()
    return []


def run(spec: str | Path | JobSpec, run_dir: str | Path | None = None,
        overrides: Sequence[str] = (), on_progress=None, address: str | None = None,
        log=None, invoked: float | None = None) -> dict[str, Any]:
    """Meta-train and evaluate a job; returns the results (also written to
    ``run_dir/results.json``).

    ``runtime.mode`` sync / async run on Ray: the cluster at ``address``, or, without
    one, an embedded local Ray started for the job. ``local`` runs in this process.
    ``invoked``: when the command running the job started (``time.time()``; the CLI
    passes its own start): the run's startup timing counts from it.
    """
    from metapeft_dist.runner import default_run_dir, run_job

    job_spec = load(spec, overrides)
    directory = Path(run_dir) if run_dir is not None else default_run_dir(job_spec)
    return run_job(job_spec, directory, address=address, invoked=invoked,
                   **_callbacks(on_progress, log))


def resume(run_dir: str | Path, address: str | None = None, on_progress=None,
           log=None, invoked: float | None = None) -> dict[str, Any]:
    """Continue a killed run from its newest good checkpoint (a corrupt newer one is
    reported through ``log`` and skipped), then evaluate as ``run`` does."""
    from metapeft_dist.runner import find_resume_point, run_job

    callbacks = _callbacks(on_progress, log)
    directory = Path(run_dir)
    spec, checkpoint = find_resume_point(directory, callbacks.get("log", lambda m: None))
    return run_job(spec, directory, address=address, resume=checkpoint, invoked=invoked,
                   **callbacks)


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write PNG plots of a finished run (training, shots, cost, throughput) into
    ``out_dir`` (default ``run_dir/report``); returns ``{"written": [paths], "skipped":
    {file name: reason}}``. A plot whose data the run lacks is skipped, not an error.

    Raises :class:`metapeft_dist.report.ReportError` when ``run_dir`` is missing or holds
    no readable results.json.
    """
    from metapeft_dist.report import write_report

    return write_report(run_dir, out_dir)


def adapt(run_dir: str | Path, data: str | Path, out_dir: str | Path | None = None,
          steps: int | None = None, holdout: str | Path | None = None) -> dict[str, Any]:
    """Adapt a finished text run's meta-learned init to the task in ``data`` (a JSONL
    file of a few labelled examples), write the adapter to ``out_dir`` (default
    ``run_dir/adapted/<task>``) and return the losses and accuracies before and after
    (on ``holdout`` examples too, if given). Raises
    :class:`metapeft_dist.rundir.AdaptError` or :class:`ConfigError` (a bad line)."""
    from metapeft_dist.adapt import adapt_task

    return adapt_task(run_dir, data, out_dir, steps, holdout)


def adapt_auto(candidates: Sequence[str | Path], data: str | Path,
               out_dir: str | Path | None = None, steps: int | None = None,
               holdout: str | Path | None = None, outcomes: str | Path | None = None,
               kind: str = "task2vec") -> dict[str, Any]:
    """Adapt the task in ``data`` from the configuration its embedding points to: one
    of the ``candidates`` runs' meta-learned inits, their standard LoRA init, or the
    head alone (by recorded ``outcomes`` if enough, else by similarity to each run's
    tasks); the report's ``selection`` says which and why. With ``holdout`` the outcome
    is recorded in ``outcomes``."""
    from metapeft_dist.init_choice import adapt_auto as auto

    return auto(candidates, data, out_dir, steps, holdout, outcomes, kind)


def adapt_hyper(candidates: Sequence[str | Path], data: str | Path,
                out_dir: str | Path | None = None, steps: int | None = None,
                holdout: str | Path | None = None) -> dict[str, Any]:
    """Adapt the task in ``data`` from what the hypernetwork run among ``candidates``
    generates for it (its adapters and a prototype head), then ``steps`` steps."""
    from metapeft_dist.init_choice import adapt_hyper as hyper

    return hyper(candidates, data, out_dir, steps, holdout)


def embed(data: str | Path, run_dir: str | Path | None = None, kind: str = "task2vec",
          learned: str | Path | None = None) -> dict[str, Any]:
    """The task embedding of a JSONL task file (its lines are the support set), through
    the top layer of ``run_dir``'s encoder (default: all-MiniLM-L6-v2), as ``adapt --init
    auto`` embeds tasks; ``learned`` is the trained network the ``learned`` kind needs."""
    from metapeft_dist.rundir import run_spec
    from metapeft_dist.task_embedding import embed_file, probe_model

    spec = probe_model([run_spec(run_dir)]) if run_dir is not None else None
    return embed_file(data, spec, kind, learned)


def fit_embedding(out: str | Path, families: Sequence[str] = ("wordnet", "fortunes"),
                  run_dir: str | Path | None = None, steps: int = 400) -> dict[str, Any]:
    """Train the learned task embedding on the meta-train categories of the shipped text
    ``families`` (through ``run_dir``'s encoder, default all-MiniLM-L6-v2's top layer)
    and save it to ``out`` (for ``embed(..., kind="learned", learned=out)``)."""
    from metapeft_dist.rundir import run_spec
    from metapeft_dist.task_embedding import fit_learned_embedding, probe_model

    spec = probe_model([run_spec(run_dir)]) if run_dir is not None else None
    return fit_learned_embedding(out, families, spec, steps)


def evaluate(run_dir: str | Path, family: str | None = None, data: str | None = None,
             overrides: Sequence[str] = (), on_progress=None,
             address: str | None = None) -> dict[str, Any]:
    """Compare a finished text run's meta-learned init with its baselines on the
    meta-test tasks of another text ``family`` (cross-domain), of a directory of JSONL
    tasks (``data``), or of its own family; ``overrides`` like ``eval.tasks=100``. On
    the run's ``runtime.mode``: ``local`` here, else on Ray's workers (embedded, or the
    cluster at ``address``)."""
    from metapeft_dist.crossdomain import evaluate_init

    return evaluate_init(run_dir, family, data, overrides, on_progress, address)


# --- a cluster's jobs (Ray's job server) ----------------------------------------------

def jobs(address: str | None = None, token_file: str | None = None,
         insecure: bool = False) -> ClusterJobs:
    """The jobs of the cluster whose job server is at ``address`` (default
    ``$METAPEFT_ADDRESS``, else ``http://127.0.0.1:8265``): ``submit``, ``info``,
    ``list``, ``logs``, ``follow``, ``wait``, ``stop``, ``nodes``.

    The cluster token comes from ``token_file``, ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``. Plain http to another machine
    without a token is refused unless ``insecure``. Raises
    :class:`metapeft_dist.remote.RemoteError` for a bad address or token and
    :class:`metapeft_dist.runtime.jobs.JobsError` when the server cannot be used.
    """
    from metapeft_dist.remote import job_server
    from metapeft_dist.runtime.jobs import ClusterJobs

    return ClusterJobs(job_server(address, token_file, insecure))


def submit(spec: str | Path | JobSpec, address: str | None = None,
           overrides: Sequence[str] = (), cluster: str | Path | None = None,
           token_file: str | None = None, insecure: bool = False, job_id: str | None = None,
           run_dir: str | None = None) -> dict[str, Any]:
    """Validate ``spec`` here, then start it on the cluster (entrypoint ``metapeft run``
    on the head node, run directory ``run_dir`` there, default
    ``~/metapeft/runs/JOB_ID``). With ``cluster`` (a cluster description), the job's
    node cost figures are the cluster's. Returns the job's info."""
    job_spec = load(spec, overrides)
    if cluster is not None:
        job_spec = with_cluster_cost(job_spec, load_cluster(cluster))
    return jobs(address, token_file, insecure).submit(job_spec, job_id, run_dir)


def with_cluster_cost(spec: JobSpec, cluster: ClusterConfig) -> JobSpec:
    """``spec`` with the cluster's node cost figures and energy price; the budget stays
    the job's own."""
    if cluster.cost is None:
        return spec
    cost = dataclasses.replace(cluster.cost, budget_usd=spec.cost.budget_usd)
    return dataclasses.replace(spec, cost=cost)


# --- the cluster itself (Ray's cluster launcher) ----------------------------------------

def load_cluster(path: str | Path) -> ClusterConfig:
    """The cluster description, checked with Ray's own validation. Raises
    :class:`metapeft_dist.runtime.launcher.ClusterConfigError`."""
    from metapeft_dist.runtime.launcher import load_cluster as load

    return load(path)


def cluster_launch(path: str | Path, action: str) -> int:
    """``ray up`` (action "up") or ``ray down`` ("down") on the described cluster, after
    validating the description; returns ray's exit status."""
    from metapeft_dist.runtime.launcher import launch

    return launch(load_cluster(path), action)


def cluster_status(cluster: str | Path | None = None, address: str | None = None,
                   token_file: str | None = None, insecure: bool = False) -> dict[str, Any]:
    """The cluster's nodes as its job server reports them (IP, head, state, `mlx`
    resource, CPUs, memory) with each node's cost rate from the cluster description, and
    the described machines that have not joined (state MISSING)."""
    from metapeft_dist.runtime.launcher import node_table

    config = load_cluster(cluster) if cluster is not None else None
    client = jobs(address, token_file, insecure)
    rows = node_table(client.nodes(), config)
    return {"address": client.server.url,
            "cluster": str(config.path) if config else None,
            "nodes": rows,
            "alive": sum(row["state"] == "ALIVE" for row in rows),
            "mlx": sum(row["mlx"] for row in rows if row["state"] == "ALIVE"),
            "rate_usd_per_hour": sum(row["rate_usd_per_hour"] for row in rows
                                     if row["state"] == "ALIVE")}


def _callbacks(on_progress, log) -> dict[str, Any]:
    out = {}
    if on_progress is not None:
        out["on_progress"] = on_progress
    if log is not None:
        out["log"] = log
    return out
