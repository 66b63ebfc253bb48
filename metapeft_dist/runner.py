"""Run a job in this process: meta-train (with meta-validation and checkpoints), then
evaluate the meta-learned init against the baselines on meta-test tasks, and write
everything to the run directory:

  RUN_DIR/spec.yaml                 the validated spec, defaults filled in
  RUN_DIR/checkpoints/ckpt-*.safetensors
  RUN_DIR/results.json              training curve, timings, evaluation
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from metapeft_dist.config import JobSpec
from metapeft_dist.evaluate import Evaluator, summarize
from metapeft_dist.job import Init, Job, build_job
from metapeft_dist.runtime.checkpoint import checkpoint_path, prune_checkpoints, save_checkpoint
from metapeft_dist.trainer import MetaTrainer, Prefetcher
from metapeft_dist.tree import Meta, num_elements

# on_progress(stage, done, total, info): stages "setup", "meta-train", "evaluate", "done".
Progress = Callable[[str, int, int, dict[str, Any]], None]

VAL_STREAM = 0  # meta-validation always uses the same tasks


def _quiet(stage: str, done: int, total: int, info: dict[str, Any]) -> None:
    pass


def platform_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    import mlx.core as mx

    from metapeft_dist import blas

    return {"python": platform.python_version(), "machine": platform.machine(),
            "system": platform.system(), "mlx": mx.__version__,
            "blas": blas.ensure_fast_blas() or "bundled",
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def default_run_dir(spec: JobSpec) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(spec.run.out_dir) / f"{spec.name}-{stamp}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_job(spec: JobSpec, run_dir: Path, on_progress: Progress = _quiet) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    on_progress("setup", 0, 1, {"run_dir": str(run_dir)})
    started = time.time()
    job = build_job(spec)
    trainer = MetaTrainer(job)
    training, selected = meta_train(job, trainer, run_dir / "checkpoints", on_progress)
    evaluation = evaluate_job(job, selected, on_progress)
    results = {
        "job": spec.name,
        "run_dir": str(run_dir),
        "created": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "seconds": time.time() - started,
        "spec": spec.to_dict(),
        "meta_parameters": num_elements(job.initial_meta),
        "platform": platform_info(),
        "meta_training": training,
        "evaluation": evaluation,
    }
    write_json_atomic(run_dir / "results.json", results)
    on_progress("done", 1, 1, {"results": str(run_dir / "results.json")})
    return results


def meta_train(job: Job, trainer: MetaTrainer, checkpoint_dir: Path,
               on_progress: Progress = _quiet, start: int = 0) -> tuple[dict[str, Any], Meta]:
    """Meta-train from iteration ``start``; returns (summary, the selected meta-parameters).

    With ``eval.select: best`` the selected init is the one with the best meta-validation
    metric (also saved as checkpoints/best.safetensors), else the last one.
    """
    spec = job.spec
    better = (lambda a, b: a > b) if job.objective.higher_is_better else (lambda a, b: a < b)
    best: tuple[int, float, Meta] | None = None
    iterations = spec.algorithm.iterations
    every_val, every_ckpt = spec.eval.every, spec.checkpoint.every
    log_every = max(1, iterations // 200)
    validator = Evaluator(job, spec.inner.steps) if every_val else None
    curve: list[dict[str, float]] = []
    validation: list[dict[str, float]] = []
    window_loss = window_norm = 0.0
    window = 0
    prefetch = Prefetcher(job, start, iterations)
    seconds = 0.0
    try:
        for it in range(start, iterations):
            t0 = time.perf_counter()
            loss, norm = trainer.step(it, prefetch.batch(it))
            seconds += time.perf_counter() - t0
            window_loss += loss
            window_norm += norm
            window += 1
            done = it + 1
            info: dict[str, Any] = {"loss": loss}
            if done % log_every == 0 or done == iterations:
                curve.append({"iteration": done, "loss": window_loss / window,
                              "grad_norm": window_norm / window})
                window_loss = window_norm = 0.0
                window = 0
            if validator is not None and (done % every_val == 0 or done == iterations):
                metric = validate(job, validator, trainer)
                validation.append({"iteration": done, job.objective.metric_name: metric})
                info["val"] = metric
                if spec.eval.select == "best" and (best is None or better(metric, best[1])):
                    best = (done, metric, trainer.snapshot())
                    save_checkpoint(checkpoint_dir / "best.safetensors", done, trainer.meta,
                                    trainer.optimizer.state, job.frozen,
                                    {"job": spec.name, "algorithm": job.algorithm.name,
                                     "val": metric})
            if every_ckpt and done % every_ckpt == 0 and done < iterations:
                save(job, trainer, checkpoint_dir, done)
            on_progress("meta-train", done, iterations, info)
    finally:
        prefetch.close()
    final = save(job, trainer, checkpoint_dir, iterations)
    trained = iterations - start
    selected_iteration, selected = (best[0], best[2]) if best else (iterations, trainer.meta)
    return {
        "iterations": iterations,
        "seconds": seconds,
        "iterations_per_second": trained / seconds if seconds else None,
        "tasks_per_second": trained * spec.algorithm.meta_batch / seconds if seconds else None,
        "curve": curve,
        "validation": validation,
        "checkpoint": str(final),
        "selected_iteration": selected_iteration,
        "selected_checkpoint": str(checkpoint_dir / "best.safetensors") if best else str(final),
    }, selected


def validate(job: Job, validator: Evaluator, trainer: MetaTrainer) -> float:
    spec = job.spec
    curves = validator.curves(Init("meta", trainer.meta, job.frozen), "val", spec.family.shots,
                              spec.eval.val_tasks, VAL_STREAM, spec.eval.chunk)
    return float(curves[:, -1].mean())


def save(job: Job, trainer: MetaTrainer, checkpoint_dir: Path, iteration: int) -> Path:
    path = save_checkpoint(checkpoint_path(checkpoint_dir, iteration), iteration, trainer.meta,
                           trainer.optimizer.state, job.frozen,
                           {"job": job.spec.name, "algorithm": job.algorithm.name})
    prune_checkpoints(checkpoint_dir, job.spec.checkpoint.keep,
                      protect={job.spec.algorithm.iterations})
    return path


def evaluate_job(job: Job, meta, on_progress: Progress = _quiet) -> dict[str, Any]:
    """Meta-learned init vs baselines on meta-test tasks, for every shot setting."""
    spec, objective = job.spec, job.objective
    evaluator = Evaluator(job, spec.eval.steps)
    inits = [Init("meta", meta, job.frozen)] + [job.baseline(b) for b in spec.eval.baselines]
    by_shots: dict[str, Any] = {}
    total = len(spec.eval.shots) * len(inits)
    done = 0
    t0 = time.perf_counter()
    for shots in spec.eval.shots:
        curves = {}
        for init in inits:
            # The stream is the shot count: each shot setting has its own tasks, and all
            # inits see the same ones.
            curves[init.name] = evaluator.curves(init, "test", shots, spec.eval.tasks, shots,
                                                 spec.eval.chunk, spec.eval.query)
            done += 1
            on_progress("evaluate", done, total, {"shots": shots, "init": init.name})
        by_shots[str(shots)] = summarize(curves, objective.higher_is_better, spec.eval.target)
    return {
        "metric": objective.metric_name,
        "higher_is_better": objective.higher_is_better,
        "split": "test",
        "tasks": spec.eval.tasks,
        "query": spec.eval.query or spec.family.query,
        "steps": spec.eval.steps,
        "inner_steps": spec.inner.steps,
        "seconds": time.perf_counter() - t0,
        "shots": by_shots,
    }
