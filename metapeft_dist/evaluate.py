"""Few-shot evaluation: adaptation curves on held-out tasks, confidence intervals and
steps-to-target.

Every init (the meta-learned one and the baselines) is adapted on the *same* tasks,
keyed (seed, split, stream, index), so differences between inits are paired. A
prompted init (``Init.prompted``: a causal LM's ``in_context`` baseline) is not adapted
but scored by in-context prompting with each task's support set
(:func:`in_context_curves`), on the same tasks.
:func:`evaluate_job` is a run's final evaluation (results.json's ``evaluation``), and
``metapeft eval``'s on other tasks.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from metapeft_dist.algorithms.base import map_tasks
from metapeft_dist.job import Init, Job, TaskLoss, to_mx

Z95 = 1.959963984540054

# on_progress(stage, done, total, info): a run's stages are "setup", "meta-train",
# "evaluate", "done"; an evaluation reports "evaluate".
Progress = Callable[[str, int, int, dict[str, Any]], None]


def _quiet(stage: str, done: int, total: int, info: dict[str, Any]) -> None:
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


def evaluate_job(job: Job, meta, on_progress: Progress = _quiet) -> dict[str, Any]:
    """Meta-learned init vs baselines on meta-test tasks, for every shot setting
    (a prompted baseline's curve is flat: it takes no steps)."""
    spec, objective = job.spec, job.objective
    evaluator = Evaluator(job, spec.eval.steps)
    inits = [Init("meta", meta, job.frozen)] + [job.baseline(b) for b in spec.eval.baselines]
    by_shots: dict[str, Any] = {}
    total = len(spec.eval.shots) * len(inits)
    done = 0
    t0 = time.perf_counter()

    def prompted_curves(init, split, shots, tasks, stream, chunk, query):
        return in_context_curves(job, init, split, shots, tasks, stream, chunk, query,
                                 spec.eval.steps)

    for shots in spec.eval.shots:
        curves = {}
        for init in inits:
            # The stream is the shot count: each shot setting has its own tasks, and all
            # inits see the same ones.
            score = prompted_curves if init.prompted else evaluator.curves
            curves[init.name] = score(init, "test", shots, spec.eval.tasks, shots,
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


def in_context_curves(job: Job, init: Init, split: str, shots: int, tasks: int, stream: int,
                      chunk: int, query: int | None = None, steps: int = 0) -> np.ndarray:
    """The query metric of in-context prompting (models/in_context.py) with each task's
    support set, under ``init``'s adapters (the in_context baseline's: B = 0, the base
    LM), shape (tasks, steps + 1): nothing is adapted, so every step holds the same value
    (a flat curve, which ``summarize``, results.json and the report read as any other;
    its steps-to-target is 0 or never)."""
    from metapeft_dist.models.in_context import InContext

    scorer = InContext(job.model, init.frozen["inputs.ids"], init.frozen["inputs.mask"])
    params = init.meta["params"]
    out = []
    for start in range(0, tasks, chunk):
        indices = range(start, min(start + chunk, tasks))
        sx, sy, qx, qy = job.episodes(split, stream, indices, shots, query).arrays()
        for i in range(len(indices)):
            logits = scorer.logits(params, sx[i], sy[i], qx[i])
            out.append(float(job.objective.metric(logits, mx.array(qy[i]))))
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
    mx.eval(fn(init.meta, sx[0], sy[0]))  # warm-up: compile
    times = []
    for i in range(tasks):
        task_x, task_y = sx[i], sy[i]
        mx.eval(task_x, task_y)
        t0 = time.perf_counter()
        mx.eval(fn(init.meta, task_x, task_y))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / steps


def mean_ci95(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and the half-width of its normal 95% confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    mean = values.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, Z95 * values.std(axis=0, ddof=1) / math.sqrt(n)


def steps_to_target(curve: np.ndarray, target: float, higher_is_better: bool) -> int | None:
    """First step at which ``curve`` reaches ``target``; None if it never does."""
    reached = curve >= target if higher_is_better else curve <= target
    hits = np.flatnonzero(reached)
    return int(hits[0]) if hits.size else None


def summarize(curves: dict[str, np.ndarray], higher_is_better: bool,
              target: float | None) -> dict[str, Any]:
    """Per init: mean and 95% CI at every step, steps-to-target on the mean curve and
    per task; per baseline: the paired gain of the meta-learned init over it."""
    if target is None and "random" in curves:
        target = float(mean_ci95(curves["random"])[0][-1])
    out: dict[str, Any] = {"target": target, "inits": {}, "gain_over": {}}
    for name, values in curves.items():
        mean, ci = mean_ci95(values)
        entry: dict[str, Any] = {"mean": mean.tolist(), "ci95": ci.tolist()}
        if target is not None:
            entry["steps_to_target"] = steps_to_target(mean, target, higher_is_better)
            per_task = [steps_to_target(row, target, higher_is_better) for row in values]
            reached = [s for s in per_task if s is not None]
            entry["tasks_reaching_target"] = len(reached) / len(per_task)
            entry["median_task_steps_to_target"] = (
                float(np.median(reached)) if len(reached) * 2 > len(per_task) else None)
        out["inits"][name] = entry
    if "meta" in curves:
        sign = 1.0 if higher_is_better else -1.0
        for name, values in curves.items():
            if name == "meta":
                continue
            gain, ci = mean_ci95(sign * (curves["meta"] - values))
            out["gain_over"][name] = {"mean": gain.tolist(), "ci95": ci.tolist()}
    return out
