"""Run a job: meta-train on an executor (the Ray driver, or this process), with
meta-validation and checkpoints, then evaluate the meta-learned init against the
baselines on meta-test tasks, and write everything to the run directory:

  RUN_DIR/spec.yaml                 the validated spec, defaults filled in
  RUN_DIR/history.jsonl             training curve and meta-validation, as they happen
  RUN_DIR/checkpoints/ckpt-*.safetensors, best.safetensors
  RUN_DIR/results.json              curves, timings, runtime counters, evaluation, cost
  RUN_DIR/outcome.json              status, end time, duration, totals (also on failure)
  RUN_DIR/adapter/                  text runs: the selected init as an adapter
  RUN_DIR/tasks/                    jsonl runs: the task files, which spec.yaml names

While it runs, the job's metrics are served at ``metrics.address:metrics.port``
(metrics.py); the cost figures come from cost.py.

A killed run resumes from its newest good checkpoint (``find_resume_point``); in sync
and local modes it then ends exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from metapeft_dist.config import JobSpec
from metapeft_dist.cost import SpendMeter, cost_summary
from metapeft_dist.evaluate import Evaluator, Progress, evaluate_job
from metapeft_dist.job import Init, Job, build_job, with_family_path
from metapeft_dist.metrics import JobMetrics, MetricsServer, NoMetrics, push_outcome
from metapeft_dist.runtime.checkpoint import Checkpoint, checkpoint_path, prune_checkpoints
from metapeft_dist.trainer import MetaTrainer
from metapeft_dist.tree import Meta, num_elements
from metapeft_dist.wire import encode

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


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked (already holds a run, nothing to resume)."""


class Executor(Protocol):
    """Runs meta-iterations: the in-process MetaTrainer or the Ray driver's RayExecutor."""

    @property
    def workers(self) -> int:
        """The MLX workers started (1: this process)."""

    def step(self, iteration: int) -> tuple[float, float]: ...
    def snapshot(self) -> Meta: ...
    def checkpoint(self, path: str, iteration: int, info: dict[str, Any],
                   best: Meta | None = None) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


def make_executor(job: Job, address: str | None, resume: Checkpoint | None,
                  log: Callable[[str], None], metrics: JobMetrics | None = None,
                  spend: SpendMeter | None = None) -> Executor:
    """The executor of ``job``'s runtime mode; it records on ``metrics`` and holds its
    nodes on ``spend`` (the cost meter)."""
    if job.spec.runtime.mode == "local":
        if resume is None:
            return MetaTrainer(job, metrics=metrics, spend=spend)
        return MetaTrainer(job, resume.meta, resume.optimizer_state, metrics,
                           resume.info.get("version", resume.iteration), spend)
    from metapeft_dist.runtime.driver import RayExecutor

    return RayExecutor(job, address, resume.path if resume else None,
                       resume.iteration if resume else 0, log, metrics, spend)


def keep_task_files(spec: JobSpec, files: dict[str, bytes], run_dir: Path) -> JobSpec:
    """The run keeps the task files it was built from (RUN_DIR/tasks/) and its spec names
    that copy: a resumed or re-evaluated run finds them wherever the originals went (a
    submitted job's came with the submission, into a directory Ray removes later)."""
    from metapeft_dist.tasks.text import write_task_files

    return with_family_path(spec, write_task_files(files, run_dir.resolve() / "tasks"))


def find_resume_point(run_dir: Path, log: Callable[[str], None]) -> tuple[JobSpec, Checkpoint]:
    """The run's spec and its newest good checkpoint; corrupt newer ones are named and
    skipped."""
    from metapeft_dist.config import load_spec
    from metapeft_dist.runtime.checkpoint import newest_good_checkpoint

    if not (run_dir / "spec.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no spec.yaml)")
    spec = load_spec(run_dir / "spec.yaml")
    checkpoint = newest_good_checkpoint(run_dir / "checkpoints", log)
    if checkpoint is None:
        raise RunDirError(f"{run_dir / 'checkpoints'} holds no usable checkpoint to resume from")
    return spec, checkpoint


def run_job(spec: JobSpec, run_dir: Path, on_progress: Progress = _quiet,
            address: str | None = None, resume: Checkpoint | None = None,
            log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Meta-train (from ``resume`` if given), evaluate, write results.json."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file")
    if resume is None and (run_dir / "checkpoints").is_dir() and any(
            (run_dir / "checkpoints").iterdir()):
        raise RunDirError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                          "or choose another --run-dir")
    started = time.time()
    # A resumed run keeps the frozen base its meta-parameters were trained on (the
    # checkpoint's) instead of pretraining it again, and its meta-parameters come from the
    # checkpoint, so it no longer needs the run algorithm.hyper.init named.
    job = build_job(spec, None if resume is None else encode({"frozen": resume.frozen}, 0))
    spend = SpendMeter(spec.cost.node_table(), spec.cost.energy_usd_per_kwh)
    if resume is not None:
        spend.restore(resume.info.get("reserved_seconds", {}))
    metrics = (JobMetrics(spec.name, spec.algorithm.name, spend=spend) if spec.metrics.enabled
               else NoMetrics(spec.name, spec.algorithm.name))
    server = None
    outcome: dict[str, Any] = {"status": "failed"}
    totals: dict[str, Any] = {}
    try:
        # nothing is written to the run directory before the executor is up
        executor = make_executor(job, address, resume, log, metrics, spend)
        try:
            if spec.metrics.enabled:
                server = MetricsServer(metrics.registry, spec.metrics.address,
                                       spec.metrics.port, log)
                log(f"metrics at {server.url}")
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume is None and job.files is not None:
                spec = keep_task_files(spec, job.files, run_dir)
            if resume is None:
                (run_dir / "spec.yaml").write_text(
                    yaml.safe_dump(spec.to_dict(), sort_keys=False))
            else:
                log(f"resuming {run_dir} from iteration {resume.iteration}")
            metrics.job_started(spec.family.name, spec.runtime.mode, spec.algorithm.iterations,
                                executor.workers,
                                spec.runtime.staleness if spec.runtime.mode == "async" else None,
                                spec.cost.budget_usd)
            on_progress("setup", 0, 1, {"run_dir": str(run_dir)})
            training, selected = meta_train(job, executor, run_dir, on_progress, resume,
                                            metrics, spend)
            executor.release()
            runtime = executor.stats()
            totals = {"meta_iterations": spec.algorithm.iterations,
                      "tasks_completed": runtime.get("tasks_completed"),
                      "outer_updates": runtime.get("outer_updates"),
                      "spend_usd": spend.spend_usd()}
        finally:
            executor.close()
        evaluation = evaluate_job(job, selected, on_progress)
        if hasattr(job.model, "export"):  # text models: the init as an adapter to share
            job.model.export(selected["params"], run_dir / "adapter")
        cost = job_cost(job, selected, evaluation, spend)
        metrics.costs(cost)
        outcome = job_outcome("succeeded", started, totals)
        results = {
            "job": spec.name,
            "run_dir": str(run_dir),
            "created": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "seconds": time.time() - started,
            "resumed_from": resume.iteration if resume else None,
            "spec": spec.to_dict(),
            "meta_parameters": num_elements(job.initial_meta),
            "platform": platform_info(),
            "metrics_url": server.url if server else None,
            "runtime": runtime,
            "meta_training": training,
            "evaluation": evaluation,
            "cost": cost,
            "outcome": outcome,
        }
        write_json_atomic(run_dir / "results.json", results)
    except BaseException as err:
        outcome = job_outcome(ended_by(err), started, totals, f"{type(err).__name__}: {err}")
        raise
    finally:
        metrics.job_ended(outcome["status"])
        if run_dir.is_dir():
            write_json_atomic(run_dir / "outcome.json", outcome)
        if server is not None:
            server.stop(spec.metrics.linger)
        if spec.metrics.pushgateway:
            try:
                push_outcome(spec.metrics.pushgateway, spec.name, outcome)
            except OSError as push_err:
                log(f"could not push the outcome to {spec.metrics.pushgateway}: {push_err}")
    on_progress("done", 1, 1, {"results": str(run_dir / "results.json")})
    return results


def ended_by(err: BaseException) -> str:
    """"stopped" for Ctrl-C and SIGTERM (`metapeft stop`; a Ray driver's own handler
    exits with the signal's number), else "failed"."""
    if isinstance(err, KeyboardInterrupt):
        return "stopped"
    if isinstance(err, SystemExit) and err.code == signal.SIGTERM:
        return "stopped"
    return "failed"


def job_outcome(status: str, started: float, totals: dict[str, Any],
                error: str | None = None) -> dict[str, Any]:
    """What stays readable after the job ends (outcome.json, results.json, and the
    Pushgateway when one is set)."""
    now = time.time()
    out = {"status": status,
           "finished": datetime.fromtimestamp(now, timezone.utc).isoformat(),
           "finished_timestamp": now, "duration_seconds": now - started, "totals": totals}
    if error is not None:
        out["error"] = error
    return out


def job_cost(job: Job, selected: Meta, evaluation: dict[str, Any],
             spend: SpendMeter) -> dict[str, Any]:
    """The cost figures of the finished job: :func:`adaptation_cost` at the meta-training
    spend and this node's rate, and the nodes' details."""
    import platform

    cost = adaptation_cost(job, selected, evaluation, spend.spend_usd(),
                           spend.rate_usd_per_hour(platform.node()))
    details = spend.summary()
    cost["nodes"] = details["nodes"]
    cost["energy_usd_per_kwh"] = details["energy_usd_per_kwh"]
    return cost


def adaptation_cost(job: Job, selected: Meta, evaluation: dict[str, Any], spend_usd: float,
                    rate_usd_per_hour: float) -> dict[str, Any]:
    """cost.cost_summary from measurements: steps-to-target of the meta-learned init and
    of the standard one at the job's own shot count (the standard init fine-tuned with
    Adam to the target, evaluate.Finetune, else its evaluation curve), and seconds per
    adaptation step of one task from each, timed here."""
    from metapeft_dist.evaluate import Finetune, adaptation_step_seconds, cost_shots

    spec = job.spec
    shots = cost_shots(spec)
    summary = evaluation["shots"][str(shots)]
    inits = summary["inits"]
    tasks = min(20, spec.eval.tasks)  # a median of at most 20 tasks, and no more tasks
    # than the evaluation itself adapts
    step_seconds = adaptation_step_seconds(job, Init("meta", selected, job.frozen), "test",
                                           shots, spec.eval.steps, tasks=tasks)
    finetune = evaluation.get("finetune")
    extra: dict[str, Any] = {}
    if finetune is not None:
        standard = job.baseline(finetune["init"])
        extra = {"standard_step_seconds": Finetune(job).step_seconds(
                     standard, shots, tasks=min(5, finetune["tasks"])),
                 "standard_budget": finetune["budget"],
                 "standard_how": f"Adam at lr {finetune['lr']:.3g} on the support set, "
                                 f"up to {finetune['budget']} steps"}
        steps_standard = finetune["steps_to_target"]
    else:
        steps_standard = inits.get("random", {}).get("steps_to_target")
    cost = cost_summary(spend_usd, step_seconds, rate_usd_per_hour,
                        inits["meta"].get("steps_to_target"), steps_standard,
                        summary["target"], shots, **extra)
    cost["standard_init"] = "random" if "random" in inits else None
    return cost


class History:
    """The training curve and meta-validation scores, one JSON line per entry in
    RUN_DIR/history.jsonl, so a resumed run keeps what came before its checkpoint."""

    def __init__(self, path: Path, resume_at: int | None):
        self.path = path
        self.curve: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        if resume_at is not None and path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry["iteration"] <= resume_at:
                    getattr(self, entry.pop("kind")).append(entry)
        self._file = open(path, "w")
        for kind in ("curve", "validation"):
            for entry in getattr(self, kind):
                self._write(kind, entry)

    def _write(self, kind: str, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps({"kind": kind, **entry}) + "\n")
        self._file.flush()

    def add(self, kind: str, entry: dict[str, Any]) -> None:
        getattr(self, kind).append(entry)
        self._write(kind, entry)

    def close(self) -> None:
        self._file.close()


def meta_train(job: Job, executor: Executor, run_dir: Path, on_progress: Progress = _quiet,
               resume: Checkpoint | None = None, metrics: JobMetrics | None = None,
               spend: SpendMeter | None = None) -> tuple[dict[str, Any], Meta]:
    """Meta-train from the start or from ``resume``; returns (summary, the selected
    meta-parameters).

    With ``eval.select: best`` the selected init is the one with the best meta-validation
    metric (also saved as checkpoints/best.safetensors), else the last one. Periodic
    checkpoints carry the best init so far, so a resumed run selects exactly as an
    uninterrupted one would. Checkpoints carry the nodes' reserved seconds so far
    (``spend``, the meter the executor holds its nodes on), so a resumed run's cost
    counts the sessions before it.
    """
    spec = job.spec
    metrics = metrics if metrics is not None else NoMetrics()
    spend = spend if spend is not None else SpendMeter({})
    checkpoint_dir = run_dir / "checkpoints"
    iterations = spec.algorithm.iterations
    start = resume.iteration if resume else 0
    better = (lambda a, b: a > b) if job.objective.higher_is_better else (lambda a, b: a < b)
    best: tuple[int, float, Meta] | None = None
    seconds = 0.0
    if resume is not None:
        seconds = resume.info.get("train_seconds", 0.0)
        if resume.best is not None:
            best = (resume.info["best_iteration"], resume.info["best_metric"], resume.best)
    every_val, every_ckpt = spec.eval.every, spec.checkpoint.every
    log_every = max(1, iterations // 200)
    validator = Evaluator(job, spec.inner.steps, with_loss=True) if every_val else None
    run_dir.mkdir(parents=True, exist_ok=True)
    history = History(run_dir / "history.jsonl", start if resume else None)
    window_loss = window_norm = 0.0
    window = 0

    def info() -> dict[str, Any]:
        out = {"job": spec.name, "algorithm": job.algorithm.name, "mode": spec.runtime.mode,
               "train_seconds": seconds,
               "reserved_seconds": spend.reserved_seconds()}
        if best is not None:
            out.update(best_iteration=best[0], best_metric=best[1])
        return out

    def checkpoint(iteration: int) -> Path:
        path = checkpoint_path(checkpoint_dir, iteration)
        executor.checkpoint(str(path), iteration, info(), best[2] if best else None)
        metrics.checkpointed()
        prune_checkpoints(checkpoint_dir, spec.checkpoint.keep, protect={iterations})
        return path

    try:
        for it in range(start, iterations):
            t0 = time.perf_counter()
            loss, norm = executor.step(it)
            seconds += time.perf_counter() - t0
            window_loss += loss
            window_norm += norm
            window += 1
            done = it + 1
            metrics.iteration_done(done, loss)
            progress: dict[str, Any] = {"loss": loss}
            if done % log_every == 0 or done == iterations:
                history.add("curve", {"iteration": done, "loss": window_loss / window,
                                      "grad_norm": window_norm / window})
                window_loss = window_norm = 0.0
                window = 0
            if validator is not None and (done % every_val == 0 or done == iterations):
                current = executor.snapshot()
                metric, val_loss = validate(job, validator, current)
                metrics.validated(val_loss, metric if spec.is_classification else None)
                entry = {"iteration": done, job.objective.metric_name: metric}
                if spec.is_classification:
                    entry["loss"] = val_loss
                history.add("validation", entry)
                progress["val"] = metric
                if spec.eval.select == "best" and (best is None or better(metric, best[1])):
                    best = (done, metric, current)
                    executor.checkpoint(str(checkpoint_dir / "best.safetensors"), done,
                                        {**info(), "val": metric})
            if every_ckpt and done % every_ckpt == 0 and done < iterations:
                checkpoint(done)
            on_progress("meta-train", done, iterations, progress)
        final = checkpoint_path(checkpoint_dir, iterations)
        if start < iterations or not final.is_file():
            final = checkpoint(iterations)
    finally:
        history.close()
    selected_iteration = best[0] if best else iterations
    selected = best[2] if best else executor.snapshot()
    trained = iterations - start
    session_seconds = seconds - (resume.info.get("train_seconds", 0.0) if resume else 0.0)
    return {
        "iterations": iterations,
        "seconds": seconds,
        "iterations_per_second": trained / session_seconds if session_seconds > 0 else None,
        "tasks_per_second": (trained * spec.algorithm.meta_batch / session_seconds
                             if session_seconds > 0 else None),
        "curve": history.curve,
        "validation": history.validation,
        "checkpoint": str(final),
        "selected_iteration": selected_iteration,
        "selected_checkpoint": str(checkpoint_dir / "best.safetensors") if best else str(final),
    }, selected


def validate(job: Job, validator: Evaluator, meta: Meta) -> tuple[float, float]:
    """(metric, query loss) after adaptation, meta-validation tasks' mean."""
    spec = job.spec
    curves = validator.curves(Init("meta", meta, job.frozen), "val", spec.family.shots,
                              spec.eval.val_tasks, VAL_STREAM, spec.eval.chunk)
    if validator.with_loss:
        return float(curves[:, -2].mean()), float(curves[:, -1].mean())
    value = float(curves[:, -1].mean())
    return value, value
