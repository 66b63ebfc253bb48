"""What every meta-learning algorithm provides, and the shared batched meta-gradient.

A task is the tuple ``(support_x, support_y, query_x, query_y)`` of MLX arrays; a batch
is the same tuple with a leading task axis. Meta-parameters are a tree
``{"params": {...}, ...extras}`` (extras: Meta-SGD's ``lr``, MAML++'s ``lslr``).

An algorithm turns (meta-parameters, a task) into an outer gradient: a tree like the
meta-parameters that the outer optimizer (``outer.py``) applies. For MAML-type methods
it is the gradient of the post-adaptation query loss; for Reptile it is theta - phi.
Everything here is pure: no Ray, files, clocks or metrics.
"""

from __future__ import annotations

from typing import Any, Hashable

import mlx.core as mx

from metapeft_dist.algorithms.inner import InnerOptimizer, LossFn, LrRule, adapt, constant_lr
from metapeft_dist.tree import Meta, Params

Task = tuple[mx.array, mx.array, mx.array, mx.array]


class MetaAlgorithm:
    name = "base"

    def __init__(self, inner_steps: int, inner_lr: float,
                 inner_optimizer: InnerOptimizer = InnerOptimizer()):
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.inner_optimizer = inner_optimizer

    # --- meta-parameters and adaptation ---------------------------------------------

    def init_meta(self, params: Params) -> Meta:
        """Meta-parameters that start from the model parameters ``params``."""
        return {"params": params}

    def lr_rule(self, meta: Meta) -> LrRule:
        return constant_lr(self.inner_lr)

    def adapt(self, meta: Meta, loss_fn: LossFn, x: mx.array, y: mx.array,
              steps: int | None = None, first_order: bool = False) -> list[Params]:
        """Trajectory of parameters adapted to (x, y) from the meta-learned start."""
        return adapt(meta["params"], loss_fn, x, y,
                     self.inner_steps if steps is None else steps,
                     self.lr_rule(meta), self.inner_optimizer, first_order)

    # --- iteration-dependent inputs (MAML++ anneals both) ----------------------------

    def phase(self, iteration: int) -> Hashable:
        """A static switch of the meta-step; a compiled step is built per value."""
        return None

    def step_inputs(self, iteration: int) -> mx.array:
        """Array inputs of the meta-step that change with the iteration."""
        return mx.zeros((0,))

    @property
    def updates_per_batch(self) -> bool:
        """False when each task of the batch is applied as its own outer update."""
        return True

    # --- outer gradient ---------------------------------------------------------------

    def task_grad(self, meta: Meta, loss_fn: LossFn, task: Task, inputs: mx.array,
                  phase: Hashable = None) -> tuple[Meta, mx.array]:
        """(outer gradient, query loss after adaptation) of one task."""
        raise NotImplementedError

    def batch_grad(self, meta: Meta, loss_fn: LossFn, batch: Task, inputs: mx.array,
                   phase: Hashable = None, vmap: bool = True) -> tuple[Meta, mx.array]:
        """Mean outer gradient and mean query loss over a batch of tasks."""
        raise NotImplementedError


def map_tasks(fn: Any, shared: Any, batch: Task, vmap: bool) -> Any:
    """fn(shared, *task) for every task of ``batch``, stacked along a leading axis:
    vmapped, or a Python loop (for models whose ops have no vmap rule). The parts of
    ``batch`` are arrays or trees of arrays, all with the task axis first."""
    if vmap:
        return mx.vmap(fn, in_axes=(None,) + (0,) * len(batch))(shared, *batch)
    count = _leaves(batch[0])[0].shape[0]
    outs = [fn(shared, *(_index(part, i) for part in batch)) for i in range(count)]
    if isinstance(outs[0], tuple):
        return tuple(_stack_trees([o[j] for o in outs]) for j in range(len(outs[0])))
    return _stack_trees(outs)


def _leaves(tree: Any) -> list[mx.array]:
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


def _index(tree: Any, i: int) -> Any:
    return {k: _index(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]


def _stack_trees(trees: list[Any]) -> Any:
    if isinstance(trees[0], dict):
        return {k: _stack_trees([t[k] for t in trees]) for k in trees[0]}
    return mx.stack(trees)


class GradientMetaAlgorithm(MetaAlgorithm):
    """Algorithms whose outer gradient is d(query objective)/d(meta): the MAML family."""

    first_order = False

    def objective(self, meta: Meta, loss_fn: LossFn, task: Task, inputs: mx.array,
                  phase: Hashable = None) -> tuple[mx.array, mx.array]:
        """(objective to differentiate, query loss after the last inner step)."""
        sx, sy, qx, qy = task
        phi = self.adapt(meta, loss_fn, sx, sy, first_order=self.first_order)[-1]
        loss = loss_fn(phi, qx, qy)
        return loss, loss

    def task_grad(self, meta, loss_fn, task, inputs, phase=None):
        (_, query_loss), grad = mx.value_and_grad(
            lambda m: self.objective(m, loss_fn, task, inputs, phase))(meta)
        return grad, query_loss

    def batch_grad(self, meta, loss_fn, batch, inputs, phase=None, vmap=True):
        def per_task(m, *task):
            return self.objective(m, loss_fn, task, inputs, phase)

        def mean_objective(m):
            objectives, query_losses = map_tasks(per_task, m, batch, vmap)
            return mx.mean(objectives), mx.mean(query_losses)

        (_, query_loss), grad = mx.value_and_grad(mean_objective)(meta)
        return grad, query_loss
