"""The meta-training loop over an :class:`Executor` (the in-process MetaTrainer or the
Ray driver): steps, the training curve, meta-validation, checkpoints, and the
choice of the init the run ends with.

Meta-validation runs where the executor's scorer computes (the Ray workers, beside the
next steps: a validation started after iteration t measures the init of iteration t
and is recorded under t whenever it ends; in process, at once). Validations are taken
in iteration order. With ``eval.select: best`` the selected init is the one with the
best meta-validation metric (also saved as checkpoints/best.safetensors), else the last
one. A periodic checkpoint after iteration t waits for the validations before t and
carries the best init so far; one of t itself still out is named in its info
(``validating``) and done again by a run resumed there, so a resumed run selects exactly
as an uninterrupted one would. Checkpoints carry the nodes' reserved seconds so far (the cost
meter the executor holds its nodes on), so a resumed run's cost counts the sessions
before it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from metapeft_dist.cost import SpendMeter
from metapeft_dist.evaluate import LocalScorer, Pending, Progress, Scorer, no_progress
from metapeft_dist.files import write_atomic
from metapeft_dist.job import Init, Job
from metapeft_dist.metrics import JobMetrics, NoMetrics
from metapeft_dist.rundir import RunDirError
from metapeft_dist.sweeps import Piece, assemble, pieces
from metapeft_dist.runtime.checkpoint import (Checkpoint, checkpoint_path, prune_checkpoints,
                                             save_checkpoint)
from metapeft_dist.tree import Meta

class Executor(Protocol):
    """Runs meta-iterations: the in-process MetaTrainer (trainer.py) or the Ray driver's
    RayExecutor (runtime/driver.py); runner.make_executor makes the one a job asks for."""

    @property
    def workers(self) -> int:
        """The MLX workers started (1: this process)."""

    def step(self, iteration: int) -> tuple[float, float]: ...

    def scorer(self) -> Scorer | None:
        """Where the evaluation runs (evaluate.Scorer): None, in this process."""

    def snapshot(self) -> Meta: ...
    def checkpoint(self, path: str, iteration: int, info: dict[str, Any],
                   best: Meta | None = None) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


HISTORY_KINDS = ("curve", "validation")


def _history_entry(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or entry.get("kind") not in HISTORY_KINDS:
            raise ValueError(f"kind is not one of {', '.join(HISTORY_KINDS)}")
        if isinstance(entry.get("iteration"), bool) or not isinstance(entry.get("iteration"),
                                                                       int):
            raise ValueError("no integer iteration")
    except ValueError as err:  # json's errors among them
        raise RunDirError(f"{path}:{number}: not a history entry ({err})") from None
    return entry


def read_history(path: Path) -> list[dict[str, Any]]:
    """The entries of a run's history.jsonl, in order. Each entry is written whole,
    newline last, so a last line without one that is no entry was cut short when the
    run stopped: it is left out. Any other line that is no entry is a
    :class:`RunDirError` naming ``path:line``."""
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # what follows the last newline: nothing, unless cut short
    entries = [_history_entry(path, number, line)
               for number, line in enumerate(lines, start=1) if line.strip()]
    if tail.strip():
        try:
            entries.append(_history_entry(path, len(lines) + 1, tail))
        except RunDirError:
            pass
    return entries


class History:
    """The training curve and meta-validation scores, one JSON line per entry in
    RUN_DIR/history.jsonl, so a resumed run keeps what came before its checkpoint."""

    def __init__(self, path: Path, resume_at: int | None, redo_validation: int | None = None):
        """``redo_validation``: an iteration whose validation the resumed run does again
        (it was out when its checkpoint was written), so its entry is not kept. The kept
        entries replace the file at once (written beside it, then renamed), so a stop
        while they are written leaves the old history whole."""
        self.path = path
        self.curve: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        kept = [] if resume_at is None or not path.is_file() else [
            entry for entry in read_history(path) if entry["iteration"] <= resume_at and not (
                entry["kind"] == "validation" and entry["iteration"] == redo_validation)]
        # in their order, as an uninterrupted run wrote them
        write_atomic(path, "".join(json.dumps(entry) + "\n" for entry in kept))
        for entry in kept:
            getattr(self, entry.pop("kind")).append(entry)
        self._file = open(path, "a")

    def _write(self, kind: str, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps({"kind": kind, **entry}) + "\n")
        self._file.flush()

    def add(self, kind: str, entry: dict[str, Any]) -> None:
        getattr(self, kind).append(entry)
        self._write(kind, entry)

    def close(self) -> None:
        self._file.close()


class MetaTraining:
    """One session of meta-training a run: from the start, or from ``resume``."""

    def __init__(self, job: Job, executor: Executor, run_dir: Path,
                 resume: Checkpoint | None, metrics: JobMetrics, spend: SpendMeter):
        self.job, self.executor, self.metrics, self.spend = job, executor, metrics, spend
        self.spec = spec = job.spec
        self.checkpoint_dir = run_dir / "checkpoints"
        self.iterations = spec.algorithm.iterations
        self.start = resume.iteration if resume else 0
        self.best: tuple[int, float, Meta] | None = None  # (iteration, metric, meta)
        self.seconds = 0.0  # meta-training so far, sessions before this one included
        self.seconds_before = 0.0
        self.validation_seconds = 0.0  # waiting for meta-validation so far, likewise
        if resume is not None:
            self.seconds = self.seconds_before = resume.info.get("train_seconds", 0.0)
            self.validation_seconds = resume.info.get("validation_seconds", 0.0)
            if resume.best is not None:
                self.best = (resume.info["best_iteration"], resume.info["best_metric"],
                             resume.best)
        # on the workers beside the steps (Ray), else here: the same bits either way
        self.validator: Scorer | None = None
        if spec.eval.every:
            scorer = executor.scorer()
            self.validator = scorer if scorer is not None else LocalScorer(job)
        self.validating: deque[Validation] = deque()  # started, in iteration order
        redo = resume.info.get("validating") if resume is not None else None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.history = History(run_dir / "history.jsonl", self.start if resume else None, redo)
        if redo is not None and self.validator is not None:
            self.start_validation(redo, resume.meta)

    def info(self) -> dict[str, Any]:
        """What a checkpoint carries besides the tensors."""
        out = {"job": self.spec.name, "algorithm": self.job.algorithm.name,
               "mode": self.spec.runtime.mode, "train_seconds": self.seconds,
               "validation_seconds": self.validation_seconds,
               "reserved_seconds": self.spend.reserved_seconds()}
        if self.best is not None:
            out.update(best_iteration=self.best[0], best_metric=self.best[1])
        if self.validating:
            out["validating"] = self.validating[0].iteration
        return out

    def checkpoint(self, iteration: int) -> Path:
        """The state after ``iteration``, once the validations before it are in (one of
        ``iteration`` itself may still be out: :meth:`info` names it)."""
        self.finish_validations(before=iteration)
        path = checkpoint_path(self.checkpoint_dir, iteration)
        self.executor.checkpoint(str(path), iteration, self.info(),
                                 self.best[2] if self.best else None)
        self.metrics.checkpointed()
        prune_checkpoints(self.checkpoint_dir, self.spec.checkpoint.keep,
                          protect={self.iterations})
        return path

    def start_validation(self, done: int, meta: Meta | None = None) -> None:
        """Start meta-validating the init after iteration ``done`` (``meta``, by
        default the executor's current one)."""
        t0 = time.perf_counter()
        current = meta if meta is not None else self.executor.snapshot()
        init, todo = validation_pieces(self.job, current)
        pending = self.validator.start([init], todo, lambda piece: None)
        self.validating.append(Validation(done, current, todo, pending))
        self.validation_seconds += time.perf_counter() - t0

    def finish_validations(self, wait: bool = False, before: int | None = None
                           ) -> list[tuple[int, float]]:
        """Record the validations that are done, in iteration order (with ``wait``,
        every one started; with ``before``, every one of an iteration before it):
        (iteration, metric) of each."""
        out = []
        t0 = time.perf_counter()
        while self.validating:
            head = self.validating[0]
            if not (head.pending.ready() or wait or
                    (before is not None and head.iteration < before)):
                break
            curves = head.pending.wait()
            self.validating.popleft()
            out.append((head.iteration, self.validated(head, curves)))
        self.validation_seconds += time.perf_counter() - t0
        return out

    def validated(self, validation: "Validation", curves: dict[Piece, Any]) -> float:
        """Record a finished validation; keep its init (and save it as
        best.safetensors) when it is the best so far and the run selects so."""
        job, spec, done = self.job, self.spec, validation.iteration
        metric, val_loss = scores(job, curves, validation.todo)
        self.metrics.validated(val_loss, metric if spec.is_classification else None)
        entry = {"iteration": done, job.objective.metric_name: metric}
        if spec.is_classification:
            entry["loss"] = val_loss
        self.history.add("validation", entry)
        better = (lambda a, b: a > b) if job.objective.higher_is_better else (lambda a, b: a < b)
        if spec.eval.select == "best" and (self.best is None or better(metric, self.best[1])):
            self.best = (done, metric, validation.meta)
            save_checkpoint(self.checkpoint_dir / "best.safetensors", done, validation.meta,
                            {}, job.stored_frozen(), {**self.info(), "val": metric})
        return metric

    def run(self, on_progress: Progress) -> Path:
        """Meta-train to the last iteration; returns its checkpoint."""
        iterations, every_val = self.iterations, self.spec.eval.every
        every_ckpt = self.spec.checkpoint.every
        log_every = max(1, iterations // 200)
        window: list[tuple[float, float]] = []  # (loss, norm) since the last curve point
        for it in range(self.start, iterations):
            t0 = time.perf_counter()
            loss, norm = self.executor.step(it)
            self.seconds += time.perf_counter() - t0
            window.append((loss, norm))
            done = it + 1
            self.metrics.iteration_done(done, loss)
            progress: dict[str, Any] = {"loss": loss}
            if done % log_every == 0 or done == iterations:
                self.history.add("curve", {"iteration": done,
                                           "loss": sum(w[0] for w in window) / len(window),
                                           "grad_norm": sum(w[1] for w in window) / len(window)})
                window = []
            if self.validator is not None:
                if done % every_val == 0 or done == iterations:
                    self.start_validation(done)
                finished = self.finish_validations(wait=done == iterations)
                if finished:  # the newest for a progress line; every one, in order
                    progress["val_iteration"], progress["val"] = finished[-1]
                    progress["validated"] = finished
            if every_ckpt and done % every_ckpt == 0 and done < iterations:
                self.checkpoint(done)
            on_progress("meta-train", done, iterations, progress)
        self.finish_validations(wait=True)  # a resumed run's redone one, at its end
        final = checkpoint_path(self.checkpoint_dir, iterations)
        if self.start < iterations or not final.is_file():
            final = self.checkpoint(iterations)
        return final

    def summary(self, final: Path) -> dict[str, Any]:
        """results.json's meta_training section."""
        trained = self.iterations - self.start
        session = self.seconds - self.seconds_before
        best = self.best
        return {
            "iterations": self.iterations,
            "seconds": self.seconds,
            "validation_seconds": self.validation_seconds,
            "validation_on": (None if self.validator is None else
                              "driver" if isinstance(self.validator, LocalScorer) else "workers"),
            "iterations_per_second": trained / session if session > 0 else None,
            "tasks_per_second": (trained * self.spec.algorithm.meta_batch / session
                                 if session > 0 else None),
            "curve": self.history.curve,
            "validation": self.history.validation,
            "checkpoint": str(final),
            "selected_iteration": best[0] if best else self.iterations,
            "selected_checkpoint": (str(self.checkpoint_dir / "best.safetensors") if best
                                    else str(final)),
        }


def meta_train(job: Job, executor: Executor, run_dir: Path, on_progress: Progress = no_progress,
               resume: Checkpoint | None = None, metrics: JobMetrics | None = None,
               spend: SpendMeter | None = None) -> tuple[dict[str, Any], Meta]:
    """Meta-train from the start or from ``resume`` (module docstring); returns
    (results.json's meta_training section, the selected meta-parameters). ``spend`` is
    the cost meter the executor holds its nodes on."""
    training = MetaTraining(job, executor, run_dir, resume,
                            metrics if metrics is not None else NoMetrics(),
                            spend if spend is not None else SpendMeter({}))
    try:
        final = training.run(on_progress)
    finally:
        training.history.close()
    selected = training.best[2] if training.best else executor.snapshot()
    return training.summary(final), selected


class Validation:
    """A meta-validation started: the iteration it measures, that init, its pieces and
    the scorer's pending result."""

    def __init__(self, iteration: int, meta: Meta, todo: list[Piece], pending: Pending):
        self.iteration, self.meta, self.todo, self.pending = iteration, meta, todo, pending


def scores(job: Job, curves: dict[Piece, Any], todo: list[Piece]) -> tuple[float, float]:
    """(metric, query loss) after adaptation, meta-validation tasks' mean, from the
    curves of its pieces."""
    values = assemble(curves, todo, "meta", job.spec.family.shots)
    return float(values[:, -2].mean()), float(values[:, -1].mean())


def validation_pieces(job: Job, meta: Meta) -> tuple[Init, list[Piece]]:
    """The init ``meta`` as meta-validation scores it, and its pieces."""
    init = Init("meta", meta, job.frozen)
    return init, pieces(job.spec, [init], "val")


def validate(job: Job, scorer: Scorer, meta: Meta) -> tuple[float, float]:
    """(metric, query loss) after adaptation, meta-validation tasks' mean."""
    init, todo = validation_pieces(job, meta)
    return scores(job, scorer.run([init], todo, lambda piece: None), todo)
