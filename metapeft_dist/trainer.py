"""Meta-training in one process: one (compiled) meta-step per meta-iteration.

A meta-step samples nothing itself: it takes the iteration's batch of tasks (keyed by
seed and iteration, see tasks/base.py), asks the algorithm for the mean outer gradient
(vmapped over tasks, or looped), clips it and applies the outer optimizer. With
``run.compile`` the whole step, optimizer included, is one ``mx.compile``d graph; the
meta-parameters and optimizer state are its captured state.

Iterations stepped in order run one ahead: ``step(t)`` queues iteration t + 1's graph
behind t's (``mx.async_eval``) before it reads t's loss, so MLX computes while this
thread builds the next graph, reads results and does the run's bookkeeping. The graphs
are the ones a step at a time would run, so the bits are the same; the trainer's state
(``meta``, ``snapshot``, ``checkpoint``) is the one after the last iteration stepped,
and a step out of order first drops the queued one.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable, Hashable

import mlx.core as mx
from mlx.utils import tree_map

from metapeft_dist.algorithms import Task
from metapeft_dist.algorithms.outer import make_optimizer, meta_holder, outer_update
from metapeft_dist.cost import SpendMeter
from metapeft_dist.job import Job
from metapeft_dist.metrics import JobMetrics, NoMetrics
from metapeft_dist.throughput import Throughput
from metapeft_dist.runtime.checkpoint import save_checkpoint
from metapeft_dist.tree import Meta


def total_updates(job: Job) -> int:
    """Outer-optimizer updates over the whole run (serial Reptile: one per task)."""
    a = job.spec.algorithm
    return a.iterations * (1 if job.algorithm.updates_per_batch else a.meta_batch)


class MetaTrainer:
    def __init__(self, job: Job, meta: Meta | None = None,
                 optimizer_state: dict[str, Any] | None = None,
                 metrics: JobMetrics | None = None, version: int = 0,
                 spend: SpendMeter | None = None):
        self.job = job
        self.metrics = metrics if metrics is not None else NoMetrics()
        # This process is the one node; it is held from now until meta-training ends.
        self.spend = spend if spend is not None else SpendMeter({})
        self.node = platform.node()
        self.spend.add_node(self.node)
        self.spend.reserve(self.node)
        self.metrics.workers(1)
        self.throughput = Throughput()
        self.version = version
        self.tasks_completed = 0
        self.optimizer = make_optimizer(job.spec.outer, total_updates(job))
        self.holder = meta_holder(job.initial_meta if meta is None else meta)
        self.optimizer.init(self.holder["meta"])
        if optimizer_state is not None:
            self.optimizer.state = optimizer_state
        self.loss_fn = job.loss_fn()
        self._steps: dict[Hashable, Callable] = {}
        self._prefetch: Prefetcher | None = None
        # The iteration queued ahead and its (loss, norm, tasks), and the state (meta,
        # optimizer state) after the last iteration stepped, which the queued one has
        # already replaced in the holder.
        self._ahead: tuple[int, tuple[mx.array, mx.array, int]] | None = None
        self._stepped: tuple[Meta, dict[str, Any]] | None = None

    @property
    def meta(self) -> Meta:
        """The current meta-parameters. The containers are the trainer's own: the next
        compiled step overwrites their leaves in place, so keep :meth:`snapshot`s."""
        return self._stepped[0] if self._ahead is not None else self.holder["meta"]

    def snapshot(self) -> Meta:
        """The current meta-parameters in new containers, safe to keep across steps."""
        return tree_map(lambda a: a, self.meta)

    def _optimizer_state(self) -> dict[str, Any]:
        return self._stepped[1] if self._ahead is not None else self.optimizer.state

    def step_fn(self, phase: Hashable) -> Callable:
        """The meta-step of ``phase`` (the algorithm's static switch), built once:
        ``step(batch, inputs) -> (loss, norm)``, lazy, updating the trainer's state."""
        if phase in self._steps:
            return self._steps[phase]
        spec = self.job.spec
        algorithm, loss_fn = self.job.algorithm, self.loss_fn
        vmap = spec.run.batching == "vmap"

        def gradient(meta: Meta, batch: Task, inputs: mx.array):
            return algorithm.batch_grad(meta, loss_fn, batch, inputs, phase, vmap)

        step = outer_update(self.optimizer, self.holder, spec.outer.clip_norm,
                            spec.run.compile, gradient)
        self._steps[phase] = step
        return step

    def step(self, iteration: int, batch: Task | None = None) -> tuple[float, float]:
        """One meta-iteration; returns (mean query loss after adaptation, gradient norm).

        Without ``batch``, the iteration's tasks come from a prefetching sampler when
        iterations are stepped in order, and the next iteration is queued behind this
        one (module docstring).
        """
        algorithm = self.job.algorithm
        t0 = time.perf_counter()
        queued = None
        if self._ahead is not None:
            if batch is None and self._ahead[0] == iteration:
                queued = self._ahead[1]
            else:
                self._drop_ahead()
            self._ahead = None
        if algorithm.updates_per_batch and batch is None:
            if queued is None:
                queued = self._queue(iteration, self._next_batch(iteration))
            if iteration + 1 < self.job.spec.algorithm.iterations:
                self._stepped = (tree_map(lambda a: a, self.holder["meta"]),
                                 tree_map(lambda a: a, self.optimizer.state))
                self._ahead = (iteration + 1, self._queue(iteration + 1,
                                                          self._next_batch(iteration + 1)))
            loss, norm, tasks = queued
            return self._finished(loss.item(), norm.item(), tasks, 1, t0)
        if batch is None:
            batch = self._next_batch(iteration)
        fn = self.step_fn(algorithm.phase(iteration))
        inputs = algorithm.step_inputs(iteration)
        if algorithm.updates_per_batch:
            loss, norm = fn(batch, inputs)
        else:
            # Serial Reptile: each task, in index order, is its own outer update.
            n = batch[0].shape[0]
            losses, norms = [], []
            for i in range(n):
                loss_i, norm_i = fn(tuple(part[i:i + 1] for part in batch), inputs)
                mx.eval(loss_i, norm_i, self.holder, self.optimizer.state)
                losses.append(loss_i)
                norms.append(norm_i)
            loss, norm = mx.mean(mx.stack(losses)), mx.mean(mx.stack(norms))
        mx.eval(loss, norm, self.holder, self.optimizer.state)
        tasks = batch[0].shape[0]
        return self._finished(loss.item(), norm.item(), tasks,
                              1 if algorithm.updates_per_batch else tasks, t0)

    def _queue(self, iteration: int, batch: Task) -> tuple[mx.array, mx.array, int]:
        """Iteration ``iteration``'s compiled step on ``batch``, queued to compute:
        (its loss, its gradient norm, its task count)."""
        algorithm = self.job.algorithm
        fn = self.step_fn(algorithm.phase(iteration))
        loss, norm = fn(batch, algorithm.step_inputs(iteration))
        mx.async_eval(loss, norm, self.holder, self.optimizer.state)
        return loss, norm, batch[0].shape[0]

    def _drop_ahead(self) -> None:
        """Forget the iteration queued ahead: the holder and the optimizer state go back
        to the state after the last iteration stepped (in place: the compiled step
        reads them through its captured containers)."""
        meta, state = self._stepped
        _assign(self.holder, {"meta": meta})
        _assign(self.optimizer.state, state)

    def _finished(self, loss: float, norm: float, tasks: int, updates: int,
                  t0: float) -> tuple[float, float]:
        seconds = time.perf_counter() - t0
        self.version += updates
        self.tasks_completed += tasks
        self.metrics.chunk_done(self.node, tasks, self.job.spec.inner.steps, seconds, seconds,
                                None, 0, 0)
        for _ in range(updates):
            self.metrics.update_applied(self.version, None)
        self.throughput.add(self.node, time.time(), tasks)
        return loss, norm

    def _next_batch(self, iteration: int) -> Task:
        if self._prefetch is None or self._prefetch.next_iteration != iteration:
            if self._prefetch is not None:
                self._prefetch.close()
            self._prefetch = Prefetcher(self.job, iteration)
        return self._prefetch.batch(iteration)

    # --- the executor interface (see training.Executor) -------------------------------------

    workers = 1  # this process

    def scorer(self) -> None:
        """None: the evaluation runs here (evaluate.LocalScorer)."""
        return None

    def checkpoint(self, path: str, iteration: int, info: dict[str, Any],
                   best: Meta | None = None) -> None:
        save_checkpoint(path, iteration, self.meta, self._optimizer_state(),
                        self.job.stored_frozen(),
                        {**info, "version": self.version}, best)

    def stats(self) -> dict[str, Any]:
        return {"mode": "local", "workers": 0, "tasks_completed": self.tasks_completed,
                "outer_updates": self.version,
                "nodes": [self.node], "throughput": self.throughput.summary()}

    def release(self) -> None:
        """Meta-training is over: this node is no longer held (for the cost)."""
        self.spend.release_all()

    def close(self) -> None:
        self.release()
        if self._ahead is not None:
            self._drop_ahead()
            self._ahead = None
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None


def _assign(live: dict[str, Any], saved: dict[str, Any]) -> None:
    """Put the leaves of ``saved`` into the containers of ``live`` (the same structure)."""
    for key, value in saved.items():
        if isinstance(value, dict):
            _assign(live[key], value)
        else:
            live[key] = value


class Prefetcher:
    """Samples the next iteration's tasks on a thread while the current one computes.

    Sampling is numpy (it releases the GIL in its inner loops) and keyed by iteration,
    so prefetching changes timing only, never which tasks an iteration sees.
    """

    def __init__(self, job: Job, start: int):
        from concurrent.futures import ThreadPoolExecutor

        self.job = job
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-sampler")
        self.next_iteration = start
        self._next = self._submit(start)

    def _submit(self, iteration: int):
        indices = range(self.job.spec.algorithm.meta_batch)
        return self._pool.submit(self.job.episodes, "train", iteration, indices)

    def batch(self, iteration: int) -> Task:
        from metapeft_dist.job import to_mx

        if iteration != self.next_iteration:
            raise ValueError(f"prefetched iteration {self.next_iteration}, asked for {iteration}")
        episode = self._next.result()
        self.next_iteration = iteration + 1
        self._next = self._submit(iteration + 1)
        return to_mx(episode)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
