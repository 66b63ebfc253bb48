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
from typing import Any, Callable

import yaml

from metapeft_dist.config import JobSpec
from metapeft_dist.cost import SpendMeter, cost_summary
from metapeft_dist.evaluate import Progress, evaluate_job, no_progress
from metapeft_dist.files import failure_reason, write_atomic
from metapeft_dist.job import Init, Job, build_job, with_family_path
from metapeft_dist.metrics import JobMetrics, MetricsServer, NoMetrics, push_outcome
from metapeft_dist.rundir import RunDirError
from metapeft_dist.runtime.checkpoint import Checkpoint
from metapeft_dist.trainer import MetaTrainer
from metapeft_dist.training import Executor, meta_train
from metapeft_dist.tree import Meta, num_elements
from metapeft_dist.wire import TreeSpec, WireError, encode

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
    write_atomic(path, json.dumps(data, indent=1))


def make_executor(job: Job, address: str | None, resume: Checkpoint | None,
                  log: Callable[[str], None], metrics: JobMetrics | None = None,
                  spend: SpendMeter | None = None, connecting: Any = None) -> Executor:
    """The executor of ``job``'s runtime mode; it records on ``metrics`` and holds its
    nodes on ``spend`` (the cost meter). ``connecting``: on the Ray runtime, the
    cluster being joined already (a runtime.connection.Connecting)."""
    if job.spec.runtime.mode == "local":
        if resume is None:
            return MetaTrainer(job, metrics=metrics, spend=spend)
        return MetaTrainer(job, resume.meta, resume.optimizer_state, metrics,
                           resume.info.get("version", resume.iteration), spend)
    from metapeft_dist.runtime.driver import RayExecutor

    try:
        return RayExecutor(job, address, resume.path if resume else None,
                           resume.iteration if resume else 0, log, metrics, spend, connecting)
    except BaseException:
        if connecting is not None:  # the Ray started for this job stops with it
            connecting.abandon()
        raise


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


def run_job(spec: JobSpec, run_dir: Path, on_progress: Progress = no_progress,
            address: str | None = None, resume: Checkpoint | None = None,
            log: Callable[[str], None] = lambda message: None,
            invoked: float | None = None) -> dict[str, Any]:
    """Meta-train (from ``resume`` if given), evaluate, write results.json. ``invoked``:
    when the command running it started (its startup timing counts from there)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file")
    if resume is None and (run_dir / "checkpoints").is_dir() and any(
            (run_dir / "checkpoints").iterdir()):
        raise RunDirError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                          "or choose another --run-dir")
    started = time.time()
    job, connecting = build_while_joining(spec, address, resume)
    built = time.time()
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
        executor = make_executor(job, address, resume, log, metrics, spend, connecting)
        try:
            if spec.metrics.enabled:
                server = MetricsServer(metrics.registry, spec.metrics.address,
                                       spec.metrics.port, log)
                log(f"metrics at {server.url}")
            spec = open_run_dir(spec, job, run_dir, resume, log)
            metrics.job_started(spec.family.name, spec.runtime.mode, spec.algorithm.iterations,
                                executor.workers,
                                spec.runtime.staleness if spec.runtime.mode == "async" else None,
                                spec.cost.budget_usd)
            on_progress("setup", 0, 1, {"run_dir": str(run_dir)})
            training, selected = meta_train(job, executor, run_dir, on_progress, resume,
                                            metrics, spend)
            executor.release()
            runtime = executor.stats()
            milestones = {"job_built": built, **runtime.pop("started", {})}
            totals = {"meta_iterations": spec.algorithm.iterations,
                      "tasks_completed": runtime.get("tasks_completed"),
                      "outer_updates": runtime.get("outer_updates"),
                      "spend_usd": spend.spend_usd()}
            # on the executor's workers while they are up (the Ray runtime), else here
            scorer = executor.scorer()
            evaluation = evaluate_job(job, selected, on_progress, scorer)
            if scorer is not None:
                runtime["evaluation"] = scorer.stats()
        finally:
            executor.close()
        job.model.export(selected["params"], run_dir / "adapter")  # text models only
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
            "runtime": runtime, "meta_training": training, "evaluation": evaluation,
            "cost": cost, "outcome": outcome,
        }
        results["timing"] = timing(results, started, milestones, invoked)
        write_json_atomic(run_dir / "results.json", results)
    except BaseException as err:
        outcome = job_outcome(ended_by(err), started, totals, f"{type(err).__name__}: {err}")
        raise
    finally:
        end_run(spec, run_dir, metrics, server, outcome, log)
    on_progress("done", 1, 1, {"results": str(run_dir / "results.json")})
    return results


def build_while_joining(spec: JobSpec, address: str | None, resume: Checkpoint | None
                        ) -> tuple[Job, Any]:
    """The job (:func:`build_resumable`), and on the Ray runtime the cluster being
    joined meanwhile (the embedded Ray starting: a runtime.connection.Connecting), else
    None."""
    connecting = None
    if spec.runtime.mode != "local":
        from metapeft_dist.runtime.connection import Connecting

        connecting = Connecting(address, spec.runtime.workers)
    try:
        return build_resumable(spec, resume), connecting
    except BaseException:
        if connecting is not None:
            connecting.abandon()
        raise


def build_resumable(spec: JobSpec, resume: Checkpoint | None) -> Job:
    """The job. A resumed run keeps the frozen base its meta-parameters were trained on
    (the checkpoint's) instead of pretraining it again, and its meta-parameters come
    from the checkpoint, so it no longer needs the run algorithm.hyper.init named;
    :class:`RunDirError` when the checkpoint's trees do not fit the job's model."""
    if resume is None:
        return build_job(spec)
    try:
        job = build_job(spec, encode({"frozen": resume.frozen}, 0))
    except WireError as err:  # only the checkpoint's frozen base travels as a frame
        raise RunDirError(unfit(resume.path, "frozen base", str(err))) from None
    want, got = TreeSpec.of(job.initial_meta), TreeSpec.of(resume.meta)
    if want != got:
        missing = sorted(set(want.entries) - set(got.entries))
        other = sorted(k for k, v in got.entries.items() if want.entries.get(k) != v)
        raise RunDirError(unfit(resume.path, "meta-parameters",
                                f"missing {missing}, not this job's {other}"))
    return job


def unfit(path: str, part: str, detail: str) -> str:
    """The one line for a checkpoint whose ``part`` is not this job's tree."""
    line = f"checkpoint {path}: its {part} do not fit this job's model ({detail})"
    if ".w'" in detail and ".kernel'" in detail:
        line += ("; it was written before the MLP stored its hidden layers as (in, out) "
                 "kernels, and cannot be resumed: run the job anew")
    return line


def timing(results: dict[str, Any], started: float, milestones: dict[str, float],
           invoked: float | None = None) -> dict[str, Any]:
    """Where the job's seconds went: meta-training's steps, the time it waited for
    meta-validation (on the workers it runs beside the steps), the final evaluation,
    and the whole job (setup, checkpoints and cost timing the rest); a resumed run's
    meta-training counts its sessions before. ``startup``: seconds from the command's
    start (``invoked``; then the job's own start, ``started``, is the first milestone),
    else from the job's start, to each of ``milestones`` (the job built in this
    process; on the Ray runtime, Ray and the workers answering), then to the first task
    completed (the runtime's throughput record); ``startup_from`` says which."""
    training = results["meta_training"]
    first = results["runtime"].get("throughput", {}).get("first")
    origin = started if invoked is None else invoked
    milestones = {**({} if invoked is None else {"run_started": started}), **milestones,
                  "first_task": first}
    return {"meta_training": training["seconds"],
            "validation": training.get("validation_seconds"),
            "evaluation": results["evaluation"]["seconds"], "job": results["seconds"],
            "startup": {k: t - origin for k, t in milestones.items() if t is not None},
            "startup_from": "run" if invoked is None else "command"}


def open_run_dir(spec: JobSpec, job: Job, run_dir: Path, resume: Checkpoint | None,
                 log: Callable[[str], None]) -> JobSpec:
    """Create the run directory; a new run writes its spec.yaml there, with the task
    files it keeps (returns the spec that names them)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        log(f"resuming {run_dir} from iteration {resume.iteration}")
        return spec
    if job.files is not None:
        spec = keep_task_files(spec, job.files, run_dir)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return spec


def end_run(spec: JobSpec, run_dir: Path, metrics: JobMetrics, server: MetricsServer | None,
            outcome: dict[str, Any], log: Callable[[str], None]) -> None:
    """However the run ended: its outcome recorded (metrics, outcome.json, the
    Pushgateway when one is set; a failure to write outcome.json or to push is logged,
    not raised), the metrics server stopped after ``metrics.linger``."""
    metrics.job_ended(outcome["status"])
    if run_dir.is_dir():
        try:
            write_json_atomic(run_dir / "outcome.json", outcome)
        except OSError as err:  # a full disk: the error that ended the run goes on
            log(f"could not write {run_dir / 'outcome.json'}: {failure_reason(err)}")
    if server is not None:
        server.stop(spec.metrics.linger)
    if spec.metrics.pushgateway:
        try:
            push_outcome(spec.metrics.pushgateway, spec.name, outcome)
        except OSError as push_err:
            log(f"could not push the outcome to {spec.metrics.pushgateway}: {push_err}")


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
    Adam to the target, finetune.Finetune, else its evaluation curve), and seconds per
    adaptation step of one task from each, timed here."""
    from metapeft_dist.evaluate import adaptation_step_seconds, cost_shots
    from metapeft_dist.finetune import Finetune

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
