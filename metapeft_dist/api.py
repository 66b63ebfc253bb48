"""The library API. The CLI is a thin shell over these functions; everything it can do,
a Python user can do here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from metapeft_dist.config import ConfigError, JobSpec, load_spec


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
        log=None) -> dict[str, Any]:
    """Meta-train and evaluate a job; returns the results (also written to
    ``run_dir/results.json``).

    ``runtime.mode`` sync / async run on Ray: the cluster at ``address``, or, without
    one, an embedded local Ray started for the job. ``local`` runs in this process.
    """
    from metapeft_dist.runner import default_run_dir, run_job

    job_spec = load(spec, overrides)
    directory = Path(run_dir) if run_dir is not None else default_run_dir(job_spec)
    return run_job(job_spec, directory, address=address, **_callbacks(on_progress, log))


def resume(run_dir: str | Path, address: str | None = None, on_progress=None,
           log=None) -> dict[str, Any]:
    """Continue a killed run from its newest good checkpoint (a corrupt newer one is
    reported through ``log`` and skipped), then evaluate as ``run`` does."""
    from metapeft_dist.runner import find_resume_point, run_job

    callbacks = _callbacks(on_progress, log)
    directory = Path(run_dir)
    spec, checkpoint = find_resume_point(directory, callbacks.get("log", lambda m: None))
    return run_job(spec, directory, address=address, resume=checkpoint, **callbacks)


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write PNG plots of a finished run (training, shots, cost, throughput) into
    ``out_dir`` (default ``run_dir/report``); returns ``{"written": [paths], "skipped":
    {file name: reason}}``. A plot whose data the run lacks is skipped, not an error.

    Raises :class:`metapeft_dist.report.ReportError` when ``run_dir`` is missing or holds
    no readable results.json.
    """
    from metapeft_dist.report import write_report

    return write_report(run_dir, out_dir)


def _callbacks(on_progress, log) -> dict[str, Any]:
    out = {}
    if on_progress is not None:
        out["on_progress"] = on_progress
    if log is not None:
        out["log"] = log
    return out
