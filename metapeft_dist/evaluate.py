"""Few-shot evaluation: adaptation curves on held-out tasks, confidence intervals and
steps-to-target, and the standard init fine-tuned to the target (what a task costs
without meta-learning).

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
from metapeft_dist.config.schema import MLX_LM_LR, MLX_LM_SCALE, JobSpec
from metapeft_dist.job import Init, Job, TaskLoss, to_mx
from metapeft_dist.tree import Params

Z95 = 1.959963984540054

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


def evaluate_job(job: Job, meta, on_progress: Progress = no_progress) -> dict[str, Any]:
    """Meta-learned init vs baselines on meta-test tasks, for every shot setting
    (a prompted baseline's curve is flat: it takes no steps). With a standard init
    (the random baseline) and ``eval.finetune.steps`` > 0, the standard init is also
    fine-tuned to the target at the cost shot count (:class:`Finetune`): results'
    ``finetune``."""
    spec, objective = job.spec, job.objective
    evaluator = Evaluator(job, spec.eval.steps)
    inits = [Init("meta", meta, job.frozen)] + [job.baseline(b) for b in spec.eval.baselines]
    by_shots: dict[str, Any] = {}
    standard = next((i for i in inits if i.name == "random"), None)
    finetune = standard is not None and spec.eval.finetune.steps > 0
    total = len(spec.eval.shots) * len(inits) + finetune
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
        by_shots[str(shots)] = summarize(curves, objective.higher_is_better, spec.eval.target,
                                         target_step(spec))
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

        out["finetune"] = Finetune(job).run(standard, shots, target, progress)
        reached = out["finetune"]["steps_to_target"]
        on_progress("evaluate", total, total, {
            "shots": shots, "init": standard.name,
            "detail": "Adam fine-tune: " + (f"target reached at step {reached}"
                                            if reached is not None else
                                            f"target not reached in {spec.eval.finetune.steps}"
                                            " steps")})
    out["seconds"] = time.perf_counter() - t0
    return out


# mlx.optimizers.Adam as mlx-lm's LoRA training builds it (``optim.Adam(lr)``): betas
# (0.9, 0.999), eps 1e-8, no bias correction
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# The fine-tuned standard init is scored after every step up to eval.steps (as the
# evaluation curves are), then every FINETUNE_EVERY steps: its steps-to-target beyond
# eval.steps is known to within FINETUNE_EVERY steps (rounded up: the cost is not
# understated).
FINETUNE_EVERY = 10


def finetune_lr(spec: JobSpec) -> float:
    """eval.finetune.lr, or the default it documents: mlx-lm's LoRA learning rate at
    this job's adapter scale, Adam's usual 1e-3 for a model trained whole."""
    if spec.eval.finetune.lr is not None:
        return spec.eval.finetune.lr
    lora = spec.model.lora
    if spec.model.train == "lora" and lora is not None:
        return MLX_LM_LR * MLX_LM_SCALE / (lora.alpha / lora.rank)
    return 1e-3


def finetune_points(budget: int, dense: int) -> list[int]:
    """The steps at which the fine-tuned standard init is scored: 0 .. ``dense``, then
    every FINETUNE_EVERY steps, and the budget."""
    points = list(range(min(budget, dense) + 1))
    points += range((dense // FINETUNE_EVERY + 1) * FINETUNE_EVERY, budget, FINETUNE_EVERY)
    return sorted({*points, budget})


class Finetune:
    """The standard init fine-tuned as a user without meta-learning would with mlx-lm:
    full-batch steps of mlx.optimizers.Adam (mlx-lm's optimizer, its default learning
    rate for LoRA at this adapter scale, :func:`finetune_lr`) on each task's support
    set, from step 0 until the mean query metric over ``eval.finetune.tasks`` held-out
    tasks reaches the target, or for the whole budget (``eval.finetune.steps``). The
    tasks are the evaluation's first ones at that shot count, so the fine-tune is
    paired with the evaluation curves."""

    def __init__(self, job: Job):
        self.job = job
        self._compiled: dict[tuple[int, bool], Callable] = {}

    def _segment(self, steps: int, batched: bool) -> Callable:
        """(shared, params, m, v, sx, sy, qx, qy) -> (params, m, v, query metric) after
        ``steps`` Adam steps (mlx.optimizers.Adam's update, the moments carried over
        from the segment before); ``batched``: over a leading task axis."""
        key = (steps, batched)
        if key in self._compiled:
            return self._compiled[key]
        model, objective, spec = self.job.model, self.job.objective, self.job.spec
        b1, b2 = ADAM_BETAS

        def segment(shared, params, m, v, sx, sy, qx, qy):
            frozen, lr = shared["frozen"], shared["lr"]
            grad_fn = mx.grad(TaskLoss(model, frozen, objective.loss))
            for _ in range(steps):
                g = grad_fn(params, sx, sy)
                m = {n: b1 * m[n] + (1 - b1) * g[n] for n in g}
                v = {n: b2 * v[n] + (1 - b2) * mx.square(g[n]) for n in g}
                params = {n: p - lr * m[n] / (mx.sqrt(v[n]) + ADAM_EPS)
                          for n, p in params.items()}
            return params, m, v, objective.metric(model({**frozen, **params}, qx), qy)

        def segments(shared, *batch):
            return map_tasks(segment, shared, batch, spec.run.batching == "vmap")

        fn = segments if batched else segment
        self._compiled[key] = mx.compile(fn) if spec.run.compile else fn
        return self._compiled[key]

    def run(self, init: Init, shots: int, target: float | None,
            on_step: Callable[[int, int, float], None] = lambda step, budget, mean: None,
            ) -> dict[str, Any]:
        """Fine-tune ``init`` on the tasks at ``shots``; the mean query metric at each
        scored step, and the first scored step that reaches ``target`` (None: not
        reached within the budget)."""
        job, spec = self.job, self.job.spec
        ft, higher = spec.eval.finetune, job.objective.higher_is_better
        lr = finetune_lr(spec)
        shared = {"frozen": init.frozen, "lr": mx.array(lr, dtype=mx.float32)}
        t0 = time.perf_counter()
        chunks = []
        for start in range(0, ft.tasks, spec.eval.chunk):
            indices = range(start, min(start + spec.eval.chunk, ft.tasks))
            task = to_mx(job.episodes("test", shots, indices, shots, spec.eval.query))
            params = {n: mx.broadcast_to(p, (len(indices), *p.shape))
                      for n, p in init.meta["params"].items()}
            zeros = {n: mx.zeros_like(p) for n, p in params.items()}
            chunks.append([params, zeros, zeros, task])
        steps: list[int] = []
        means: list[float] = []
        reached = None
        done = 0
        for point in finetune_points(ft.steps, spec.eval.steps):
            fn = self._segment(point - done, batched=True)
            values = []
            for chunk in chunks:
                params, m, v, metric = fn(shared, *chunk[:3], *chunk[3])
                mx.eval(params, m, v, metric)
                chunk[:3] = params, m, v
                values.append(np.array(metric))
            done = point
            mean = float(np.concatenate(values).mean())
            steps.append(point)
            means.append(mean)
            on_step(point, ft.steps, mean)
            if target is not None and steps_to_target(np.array([mean]), target, higher) == 0:
                reached = point
                break
        return {"init": init.name, "optimizer": "adam", "lr": lr, "betas": list(ADAM_BETAS),
                "budget": ft.steps, "tasks": ft.tasks, "shots": shots, "target": target,
                "steps": steps, "mean": means, "steps_to_target": reached,
                "resolution": FINETUNE_EVERY, "seconds": time.perf_counter() - t0}

    def step_seconds(self, init: Init, shots: int, steps: int = 10, tasks: int = 5) -> float:
        """Measured seconds per fine-tuning step of ONE task (not a vmapped batch): the
        median over ``tasks`` tasks of (time of ``steps`` steps and one scoring) /
        ``steps``, after the compiled graph is warm."""
        spec = self.job.spec
        sx, sy, qx, qy = to_mx(self.job.episodes("test", shots, range(tasks), shots,
                                                 spec.eval.query))
        shared = {"frozen": init.frozen, "lr": mx.array(finetune_lr(spec), dtype=mx.float32)}
        params: Params = init.meta["params"]
        zeros = {n: mx.zeros_like(p) for n, p in params.items()}
        fn = self._segment(steps, batched=False)
        return median_seconds(lambda task: fn(shared, params, zeros, zeros, *task),
                              [(sx[i], sy[i], qx[i], qy[i]) for i in range(tasks)]) / steps


def in_context_curves(job: Job, init: Init, split: str, shots: int, tasks: int, stream: int,
                      chunk: int, query: int | None = None, steps: int = 0) -> np.ndarray:
    """The query metric of in-context prompting (models/in_context.py) with each task's
    support set, under ``init``'s adapters (the in_context baseline's: B = 0, the base
    LM), shape (tasks, steps + 1): nothing is adapted, so every step holds the same value
    (a flat curve, which ``summarize``, results.json and the report read as any other;
    its steps-to-target is 0 or never)."""
    from metapeft_dist.models.in_context import InContext

    scorer = InContext(job.model, init.frozen["inputs.ids"], init.frozen["inputs.mask"],
                       chat=init.prompted == "chat")
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
    return median_seconds(lambda task: fn(init.meta, *task),
                          [(sx[i], sy[i]) for i in range(tasks)]) / steps


def median_seconds(fn: Callable[[Any], Any], tasks: list[tuple[mx.array, ...]]) -> float:
    """Median seconds of ``fn(task)`` over ``tasks`` (each task's arrays evaluated
    first), after one warm-up call on the first (the compile)."""
    mx.eval(fn(tasks[0]))
    times = []
    for task in tasks:
        mx.eval(*task)
        start = time.perf_counter()
        mx.eval(fn(task))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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
              target: float | None, target_step: int = -1) -> dict[str, Any]:
    """Per init: mean and 95% CI at every step, steps-to-target on the mean curve and
    per task; per baseline: the paired gain of the meta-learned init over it. ``target``
    unset: the meta-learned init's mean after ``target_step`` steps (what it reaches
    after its inner steps)."""
    if target is None and "meta" in curves:
        target = float(mean_ci95(curves["meta"])[0][target_step])
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
