"""The standard init fine-tuned as a user without meta-learning would with mlx-lm (Adam
on each task's support set) until it reaches the target: what a task costs without
meta-learning, for the cost figures; and the timing of single steps."""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from metapeft_dist.algorithms.base import map_tasks
from metapeft_dist.config.schema import MLX_LM_LR, MLX_LM_SCALE, JobSpec
from metapeft_dist.curves import steps_to_target
from metapeft_dist.job import Init, Job, TaskLoss, to_mx
from metapeft_dist.tree import Params

# mlx.optimizers.Adam as mlx-lm's LoRA training builds it (``optim.Adam(lr)``): betas
# (0.9, 0.999), eps 1e-8, no bias correction
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# The fine-tuned standard init is scored after every step up to eval.steps (as the
# evaluation curves are), then every FINETUNE_EVERY steps: its steps-to-target beyond
# eval.steps is known to within FINETUNE_EVERY steps (rounded up: the cost is not
# understated).
FINETUNE_EVERY = 10
# Tasks fine-tuned together (vmapped): a piece of the fine-tune, computed in process or
# by a Ray worker (runtime/evaluation.py), the same bits either way. Fixed, not per
# worker count, so the fine-tune's bits do not depend on how many workers share it.
FINETUNE_CHUNK = 5

# A piece's state between two scored steps: {"params", "m", "v"}, each a tree with a
# leading task axis.
State = dict[str, Params]
# One piece's next segment: (first task, tasks, its state, steps to take).
Request = tuple[int, int, State, int]


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
        self._tasks: dict[tuple[int, int, int], tuple[mx.array, ...]] = {}  # a piece's tasks

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

    def pieces(self) -> list[tuple[int, int]]:
        """(first task, tasks) of each piece of eval.finetune.tasks, FINETUNE_CHUNK each."""
        tasks = self.job.spec.eval.finetune.tasks
        return [(start, min(FINETUNE_CHUNK, tasks - start))
                for start in range(0, tasks, FINETUNE_CHUNK)]

    def start_state(self, init: Init, count: int) -> State:
        """A piece's state at step 0: ``init``'s parameters for each of its ``count``
        tasks, Adam's moments zero."""
        params = {n: mx.broadcast_to(p, (count, *p.shape))
                  for n, p in init.meta["params"].items()}
        zeros = {n: mx.zeros_like(p) for n, p in params.items()}
        return {"params": params, "m": zeros, "v": zeros}

    def advance(self, init: Init, shots: int, start: int, count: int, state: State,
                steps: int) -> tuple[State, np.ndarray]:
        """The tasks ``start .. start+count-1`` at ``shots`` fine-tuned ``steps`` more
        Adam steps from ``state``: (the new state, each task's query metric)."""
        spec = self.job.spec
        shared = {"frozen": init.frozen, "lr": mx.array(finetune_lr(spec), dtype=mx.float32)}
        key = (shots, start, count)
        if key not in self._tasks:  # sampled once, not at every scored step
            self._tasks[key] = to_mx(self.job.episodes(
                "test", shots, range(start, start + count), shots, spec.eval.query))
        task = self._tasks[key]
        params, m, v, metric = self._segment(steps, batched=True)(
            shared, state["params"], state["m"], state["v"], *task)
        mx.eval(params, m, v, metric)
        return {"params": params, "m": m, "v": v}, np.array(metric)

    def run(self, init: Init, shots: int, target: float | None,
            on_step: Callable[[int, int, float], None] = lambda step, budget, mean: None,
            advance_all: Callable[[list[Request]], list[tuple[State, np.ndarray]]] | None
            = None) -> dict[str, Any]:
        """Fine-tune ``init`` on the tasks at ``shots``; the mean query metric at each
        scored step, and the first scored step that reaches ``target`` (None: not
        reached within the budget). ``advance_all`` takes each piece's next segment
        (default: :meth:`advance` here, one piece after another; the Ray workers'
        spread them) and returns their results in order."""
        job, spec = self.job, self.job.spec
        ft, higher = spec.eval.finetune, job.objective.higher_is_better
        if advance_all is None:
            def advance_all(requests: list[Request]) -> list[tuple[State, np.ndarray]]:
                return [self.advance(init, shots, *request) for request in requests]
        t0 = time.perf_counter()
        pieces = self.pieces()
        states = [self.start_state(init, count) for _, count in pieces]
        steps: list[int] = []
        means: list[float] = []
        reached = None
        done = 0
        for point in finetune_points(ft.steps, spec.eval.steps):
            out = advance_all([(start, count, state, point - done)
                               for (start, count), state in zip(pieces, states, strict=True)])
            states = [state for state, _ in out]
            done = point
            mean = float(np.concatenate([metric for _, metric in out]).mean())
            steps.append(point)
            means.append(mean)
            on_step(point, ft.steps, mean)
            if target is not None and steps_to_target(np.array([mean]), target, higher) == 0:
                reached = point
                break
        return {"init": init.name, "optimizer": "adam", "lr": finetune_lr(spec),
                "betas": list(ADAM_BETAS), "budget": ft.steps, "tasks": ft.tasks,
                "shots": shots, "target": target, "steps": steps, "mean": means,
                "steps_to_target": reached, "resolution": FINETUNE_EVERY,
                "seconds": time.perf_counter() - t0}

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
