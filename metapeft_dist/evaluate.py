"""Few-shot evaluation: adaptation curves on held-out tasks (their statistics in
curves.py), and the standard init fine-tuned to the target (finetune.py: what a task
costs without meta-learning).

Every init (the meta-learned one and the baselines) is adapted on the *same* tasks,
keyed (seed, split, stream, index), so differences between inits are paired. A
prompted init (``Init.prompted``: a causal LM's ``in_context`` baseline) is not adapted
but scored by in-context prompting with each task's support set
(:func:`in_context_piece`), on the same tasks.
:func:`evaluate_job` is a run's final evaluation (results.json's ``evaluation``), and
``metapeft eval``'s on other tasks.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Protocol

import mlx.core as mx
import numpy as np

from metapeft_dist.algorithms.base import map_tasks
from metapeft_dist.config.schema import JobSpec
from metapeft_dist.curves import summarize
from metapeft_dist.finetune import FINETUNE_EVERY, Finetune, median_seconds
from metapeft_dist.job import Init, Job, TaskLoss, to_mx
from metapeft_dist.sweeps import Piece, Sweep, assemble, named_sweep, pieces

# on_progress(stage, done, total, info): a run's stages are "setup", "meta-train",
# "evaluate", "done"; an evaluation reports "evaluate".
Progress = Callable[[str, int, int, dict[str, Any]], None]


def no_progress(stage: str, done: int, total: int, info: dict[str, Any]) -> None:
    pass


class Evaluator:
    """Adapts an init for ``steps`` steps on many tasks at once and records the query
    metric after every step (0 .. steps), or with ``final_only`` after the last step
    alone (a column of one: scoring a large query set 11 times costs more than 10
    steps); with ``with_loss`` also the query loss after the last step
    (meta-validation reports both)."""

    def __init__(self, job: Job, steps: int, with_loss: bool = False, final_only: bool = False):
        self.job = job
        self.steps = steps
        self.with_loss = with_loss
        self.final = 0 if final_only else steps  # the column of the metric after the last step
        algorithm, model, objective = job.algorithm, job.model, job.objective
        vmap = job.spec.run.batching == "vmap"

        def curve(shared, sx, sy, qx, qy):
            frozen = shared["frozen"]
            loss_fn = TaskLoss(model, frozen, objective.loss)

            trajectory = algorithm.adapt(shared["meta"], loss_fn, sx, sy, steps)
            scored = trajectory[-1:] if final_only else trajectory
            values = [objective.metric(model({**frozen, **p}, qx), qy) for p in scored]
            if with_loss:
                values.append(loss_fn(trajectory[-1], qx, qy))
            return mx.stack(values)

        def curves(shared, sx, sy, qx, qy):
            return map_tasks(curve, shared, (sx, sy, qx, qy), vmap)

        self._curves: Callable = mx.compile(curves) if job.spec.run.compile else curves

    def curves(self, init: Init, split: str, shots: int, tasks: int, stream: int,
               chunk: int, query: int | None = None) -> np.ndarray:
        """Metric after 0..steps adaptation steps, shape (tasks, steps + 1) (with
        ``final_only`` (tasks, 1)); with ``with_loss`` one more column, the query loss
        after the last step."""
        out = []
        for start in range(0, tasks, chunk):
            indices = range(start, min(start + chunk, tasks))
            out.append(self.score(init, *to_mx(self.job.episodes(split, stream, indices,
                                                                 shots, query))))
        return np.concatenate(out)

    def score(self, init: Init, sx: mx.array, sy: mx.array, qx: mx.array,
              qy: mx.array) -> np.ndarray:
        """The same columns for given tasks: support and query arrays with a leading
        task axis (e.g. a support set split into folds)."""
        return np.array(self._curves({"meta": init.meta, "frozen": init.frozen},
                                     sx, sy, qx, qy))


def cost_shots(spec: JobSpec) -> int:
    """The shot count the cost figures are measured at: the job's own (family.shots) if
    it is evaluated, else the smallest evaluated."""
    return spec.family.shots if spec.family.shots in spec.eval.shots else min(spec.eval.shots)


def target_step(spec: JobSpec) -> int:
    """The step whose meta-learned mean is the default target: its inner steps, as
    meta-trained (at most the evaluation's steps)."""
    return min(spec.inner.steps, spec.eval.steps)


class Pending(Protocol):
    """Pieces a scorer has started (:meth:`Scorer.start`)."""

    def ready(self) -> bool:
        """Whether every piece is done (then :meth:`wait` returns at once)."""
        ...

    def wait(self) -> dict[Piece, np.ndarray]:
        """Every piece's curves, once they are done."""
        ...


class Done:
    """A Pending whose pieces were computed when it was started."""

    def __init__(self, curves: dict[Piece, np.ndarray]):
        self.curves = curves

    def ready(self) -> bool:
        return True

    def wait(self) -> dict[Piece, np.ndarray]:
        return self.curves


class Scorer(Protocol):
    """Computes pieces: :class:`LocalScorer` in this process, or the Ray workers."""

    def run(self, inits: list[Init], todo: list[Piece],
            on_piece: Callable[[Piece], None]) -> dict[Piece, np.ndarray]:
        """The curves (count, steps + 1) of every piece in ``todo``; ``on_piece`` is
        called as each one is done."""
        ...

    def start(self, inits: list[Init], todo: list[Piece],
              on_piece: Callable[[Piece], None]) -> Pending:
        """The same pieces, computed while the caller goes on where the scorer can
        (the Ray workers: beside meta-training's next steps)."""
        ...

    def finetune(self, init: Init, shots: int, target: float | None,
                 on_step: Callable[[int, int, float], None]) -> dict[str, Any]:
        """:meth:`Finetune.run` of ``init``, its pieces computed where the scorer
        computes."""
        ...

    def stats(self) -> dict[str, Any]:
        """What the latest run took: pieces dispatched, completed, lost, per worker."""
        ...


class LocalScorer:
    """Pieces computed here, one after another (a prompted init by in-context prompting,
    the others adapted by :class:`Evaluator`)."""

    def __init__(self, job: Job):
        self.job = job
        self._evaluators: dict[tuple[int, bool, bool], Evaluator] = {}
        self._prompters: dict[str, Any] = {}
        self.completed = 0

    def piece(self, init: Init, shots: int, start: int, count: int,
              sweep: str | Sweep = "test") -> np.ndarray:
        """Curves of the tasks ``start .. start+count-1`` at ``shots`` of ``sweep``
        (:data:`Piece`); in the final evaluation the stream is the shot count: each shot
        setting has its own tasks, and all inits see the same ones."""
        s = sweep if isinstance(sweep, Sweep) else named_sweep(self.job.spec, sweep)
        stream = shots if s.stream is None else s.stream
        indices = range(start, start + count)
        if s.on != "query":
            if init.prompted:
                raise ValueError(f"{init.name} is prompted, not adapted: it has no "
                                 f"{s.on} score")
            # the support sets alone (one query example per class, never read)
            return on_support(self._evaluator(s), init,
                              self.job.episodes(s.split, stream, indices, shots, 1), s.on)
        episodes = self.job.episodes(s.split, stream, indices, shots, s.query)
        if init.prompted:
            curves = in_context_piece(self.job, self._prompter(init), init, episodes, s.steps)
            return curves[:, -1:] if s.final_only else curves
        return self._evaluator(s).score(init, *to_mx(episodes))

    def _evaluator(self, sweep: Sweep) -> Evaluator:
        key = (sweep.steps, sweep.with_loss, sweep.final_only)
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(self.job, *key)
        return self._evaluators[key]

    def _prompter(self, init: Init):
        if init.name not in self._prompters:
            from metapeft_dist.models.in_context import InContext

            self._prompters[init.name] = InContext(
                self.job.model, init.frozen["inputs.ids"], init.frozen["inputs.mask"],
                chat=init.prompted == "chat")
        return self._prompters[init.name]

    def run(self, inits: list[Init], todo: list[Piece],
            on_piece: Callable[[Piece], None]) -> dict[Piece, np.ndarray]:
        by_name = {init.name: init for init in inits}
        out = {}
        for piece in todo:
            name, shots, start, count, sweep = piece
            out[piece] = self.piece(by_name[name], shots, start, count, sweep)
            self.completed += 1
            on_piece(piece)
        return out

    def start(self, inits: list[Init], todo: list[Piece],
              on_piece: Callable[[Piece], None]) -> Done:
        """Here, nothing runs beside the caller: the pieces are computed now."""
        return Done(self.run(inits, todo, on_piece))

    def finetune(self, init: Init, shots: int, target: float | None,
                 on_step: Callable[[int, int, float], None]) -> dict[str, Any]:
        return Finetune(self.job).run(init, shots, target, on_step)

    def stats(self) -> dict[str, Any]:
        return {"completed": self.completed}


def evaluate_job(job: Job, meta, on_progress: Progress = no_progress,
                 scorer: Scorer | None = None) -> dict[str, Any]:
    """Meta-learned init vs baselines on meta-test tasks, for every shot setting
    (a prompted baseline's curve is flat: it takes no steps), computed by ``scorer``
    (default: here; the Ray driver passes its workers'). With a standard init (the
    random baseline) and ``eval.finetune.steps`` > 0, the standard init is also
    fine-tuned to the target at the cost shot count (:class:`Finetune`, by the same
    scorer): results' ``finetune``."""
    spec, objective = job.spec, job.objective
    inits = [Init("meta", meta, job.frozen)] + [job.baseline(b) for b in spec.eval.baselines]
    standard = next((i for i in inits if i.name == "random"), None)
    finetune = standard is not None and spec.eval.finetune.steps > 0
    todo = pieces(spec, inits)
    total = len(todo) + finetune
    t0 = time.perf_counter()
    finished: dict[tuple[str, int], int] = {}  # (init, shots) -> its tasks done
    pieces_done = itertools.count(1)

    def on_piece(piece: Piece) -> None:
        name, shots, _, count, _ = piece
        finished[name, shots] = finished.get((name, shots), 0) + count
        on_progress("evaluate", next(pieces_done), total,
                    {"shots": shots, "init": name,
                     "detail": f"{finished[name, shots]} of {spec.eval.tasks} tasks"})

    scorer = scorer or LocalScorer(job)
    curves = scorer.run(inits, todo, on_piece)
    done = len(todo)
    by_shots: dict[str, Any] = {}
    for shots in spec.eval.shots:
        by_shots[str(shots)] = summarize(
            {init.name: assemble(curves, todo, init.name, shots) for init in inits},
            objective.higher_is_better, spec.eval.target, target_step(spec))
    out = {
        "metric": objective.metric_name,
        "higher_is_better": objective.higher_is_better,
        "split": "test",
        "tasks": spec.eval.tasks,
        "query": spec.eval.query or spec.family.query,
        "steps": spec.eval.steps,
        "inner_steps": spec.inner.steps,
        "target_step": None if spec.eval.target is not None else target_step(spec),
        "shots": by_shots,
    }
    if finetune and standard is not None:
        shots = cost_shots(spec)
        target = by_shots[str(shots)]["target"]

        def progress(step: int, budget: int, mean: float) -> None:
            if step % FINETUNE_EVERY == 0:
                on_progress("evaluate", done, total, {
                    "shots": shots, "init": standard.name,
                    "detail": f"Adam fine-tune to the target {target:.4g}: step {step} of "
                              f"at most {budget}, {objective.metric_name} {mean:.4g}"})

        out["finetune"] = scorer.finetune(standard, shots, target, progress)
        reached = out["finetune"]["steps_to_target"]
        on_progress("evaluate", total, total, {
            "shots": shots, "init": standard.name,
            "detail": "Adam fine-tune: " + (f"target reached at step {reached}"
                                            if reached is not None else
                                            f"target not reached in {spec.eval.finetune.steps}"
                                            " steps")})
    out["seconds"] = time.perf_counter() - t0
    return out


def on_support(evaluator: Evaluator, init: Init, episodes, on: str) -> np.ndarray:
    """Each task's score on its own support set after ``evaluator``'s steps, shape
    (tasks, 1): with ``on`` "support-fit" the accuracy on the support set after adapting
    to all of it; "support-cv" the leave-one-shot-out accuracy, adapted on shots - 1
    examples per class and scored on the one left out, averaged over the ``shots``
    folds. Support sets are class-major, as every classification family draws them."""
    sx, sy = np.asarray(episodes.support_x), np.asarray(episodes.support_y)
    ways = evaluator.job.spec.family.ways
    shots = sy.shape[1] // ways
    if not (sy == np.repeat(np.arange(ways), shots)).all():
        raise ValueError(f"{on} needs class-major support sets of a classification family")
    if on == "support-fit":
        final = evaluator.final
        return evaluator.score(init, *(mx.array(a) for a in (sx, sy, sx, sy)))[:, final:final + 1]
    if on != "support-cv":
        raise ValueError(f"unknown support score {on!r} (support-cv or support-fit)")
    if shots < 2:
        raise ValueError("support-cv needs at least 2 shots (one is left out)")
    out = np.zeros(len(sx))
    for j in range(shots):
        held = np.arange(ways) * shots + j
        kept = np.setdiff1d(np.arange(ways * shots), held)
        scored = evaluator.score(init, *(mx.array(a) for a in (sx[:, kept], sy[:, kept],
                                                               sx[:, held], sy[:, held])))
        out += scored[:, evaluator.final] / shots
    return out[:, None]


def in_context_piece(job: Job, prompter, init: Init, episodes, steps: int) -> np.ndarray:
    """The query metric of in-context prompting (models/in_context.py, ``prompter``) with
    each task's support set, under ``init``'s adapters (the in_context baseline's: B = 0,
    the base LM), shape (tasks, steps + 1): nothing is adapted, so every step holds the
    same value (a flat curve, which ``summarize``, results.json and the report read as
    any other; its steps-to-target is 0 or never)."""
    params = init.meta["params"]
    sx, sy, qx, qy = episodes.arrays()
    out = [float(job.objective.metric(prompter.logits(params, sx[i], sy[i], qx[i]),
                                      mx.array(qy[i])))
           for i in range(sx.shape[0])]
    return np.repeat(np.array(out, dtype=np.float32)[:, None], steps + 1, axis=1)


def adaptation_step_seconds(job: Job, init: Init, split: str, shots: int, steps: int,
                            tasks: int = 20, stream: int = 0) -> float:
    """Measured seconds per adaptation step of ONE task (not a vmapped batch): what
    adapting a single new task costs. The median over ``tasks`` tasks of (time to adapt
    ``steps`` steps) / ``steps``, each after the compiled graph is warm."""
    algorithm, loss_fn = job.algorithm, job.loss_fn(init.frozen)
    steps = max(1, steps)

    def adapted(meta, sx, sy):
        return algorithm.adapt(meta, loss_fn, sx, sy, steps)[-1]

    fn = mx.compile(adapted) if job.spec.run.compile else adapted
    sx, sy, _, _ = to_mx(job.episodes(split, stream, range(tasks), shots))
    return median_seconds(lambda task: fn(init.meta, *task),
                          [(sx[i], sy[i]) for i in range(tasks)]) / steps
