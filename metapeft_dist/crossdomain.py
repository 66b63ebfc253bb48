"""A run's meta-learned init evaluated on other tasks (``metapeft eval``): its spec
retargeted to another text family or a directory of JSONL tasks, with overrides, and
the init compared with its baselines on their meta-test tasks (the cross-domain test).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from metapeft_dist.config import ConfigError, JobSpec
from metapeft_dist.rundir import AdaptError, load_init, narrow


def retarget(spec: JobSpec, family: str | None = None, data: str | Path | None = None,
             overrides: Sequence[str] = ()) -> JobSpec:
    """``spec`` on another family (``family``, or ``data``: a directory of JSONL tasks)
    with ``overrides`` (``eval.tasks=100`` ...) applied; its heads keep their size."""
    from metapeft_dist.config import from_dict
    from metapeft_dist.config.loader import apply_override

    if family is not None and data is not None:
        raise AdaptError("give --family or --data, not both")
    plain = spec.to_dict()
    if family is not None or data is not None:
        plain["family"] = {**plain["family"], "name": "jsonl" if data else family,
                           "path": str(data) if data else None}
    errors: list[tuple[str, str]] = []
    for item in overrides:
        apply_override(plain, item, errors)
    if errors:
        raise ConfigError(errors)
    target = from_dict(plain)
    if target.family.ways != spec.family.ways:
        raise AdaptError(f"the init has {spec.family.ways} outputs; family.ways must stay "
                         f"{spec.family.ways}")
    return target


def evaluate_init(run_dir: str | Path, family: str | None = None, data: str | None = None,
                  overrides: Sequence[str] = (), on_progress=None,
                  address: str | None = None) -> dict[str, Any]:
    """The run's meta-learned init against its baselines on the meta-test tasks of
    ``family`` (another text family: the cross-domain test), of ``data`` (a directory of
    your JSONL tasks; its meta-test files), or of the run's own family. ``overrides``
    (``eval.tasks=100``, ``eval.shots=[1,5]`` ...) apply to the run's spec. Where it runs
    follows the spec's ``runtime.mode``, as for ``metapeft run``: ``local`` here, else on
    Ray's workers (an embedded local Ray, or the cluster at ``address``), with the same
    numbers. Returns a results-shaped dict (``evaluation`` as in results.json)."""
    from metapeft_dist.evaluate import evaluate_job
    from metapeft_dist.job import build_job

    spec, meta, source = load_init(run_dir)
    target = retarget(spec, family, data, overrides)
    job = build_job(target)
    progress = on_progress or (lambda *args: None)
    started = time.perf_counter()
    init = narrow(meta, target.family.ways)
    runtime: dict[str, Any] = {"mode": target.runtime.mode}
    if target.runtime.mode == "local":
        evaluation = evaluate_job(job, init, progress)
    else:
        from metapeft_dist.runtime.driver import evaluate_on_ray

        evaluation, runtime["evaluation"] = evaluate_on_ray(job, init, progress, address)
    return {"job": f"{spec.name} on {target.family.name}", "run_dir": str(run_dir),
            "init": source, "spec": target.to_dict(), "evaluation": evaluation,
            "runtime": runtime, "meta_training": {}, "seconds": time.perf_counter() - started}
