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
        overrides: Sequence[str] = (), on_progress=None) -> dict[str, Any]:
    """Meta-train and evaluate a job in this process; returns the results
    (also written to ``run_dir/results.json``)."""
    from metapeft_dist.runner import default_run_dir, run_job

    job_spec = load(spec, overrides)
    directory = Path(run_dir) if run_dir is not None else default_run_dir(job_spec)
    kwargs = {"on_progress": on_progress} if on_progress is not None else {}
    return run_job(job_spec, directory, **kwargs)
