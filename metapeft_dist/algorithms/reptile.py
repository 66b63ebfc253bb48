"""Reptile (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms").

Batched:  theta <- theta + eps * mean_i (phi_i - theta)
Serial:   for each task i in turn, theta <- theta + eps * (phi_i - theta)
where phi_i is theta after the inner steps on task i's support set.

The outer gradient handed to the outer optimizer is theta - phi_i; plain SGD with
learning rate eps then performs exactly the update above (an identity tests/algorithms
checks against :func:`reptile_update`), and Adam on it is Reptile's common variant.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
from mlx.utils import tree_map

from metapeft_dist.algorithms.base import MetaAlgorithm, map_tasks
from metapeft_dist.algorithms.inner import InnerOptimizer
from metapeft_dist.tree import Meta, Params, tree_mean


def reptile_update(meta: Params, adapted: Sequence[Params], outer_lr: float) -> Params:
    """theta <- theta + eps * (mean_i phi_i - theta)   (batched form)."""
    mean = tree_mean(adapted)
    return tree_map(lambda t, m: t + outer_lr * (m - t), meta, mean)


class Reptile(MetaAlgorithm):
    name = "reptile"

    def __init__(self, inner_steps: int, inner_lr: float,
                 inner_optimizer: InnerOptimizer = InnerOptimizer(), serial: bool = False):
        super().__init__(inner_steps, inner_lr, inner_optimizer)
        self.serial = serial

    @property
    def updates_per_batch(self) -> bool:
        return not self.serial

    def _task(self, meta: Meta, loss_fn, sx, sy, qx, qy):
        phi = self.adapt(meta, loss_fn, sx, sy)[-1]
        theta = meta["params"]
        grad = {"params": {n: theta[n] - phi[n] for n in theta}}
        return grad, loss_fn(phi, qx, qy)

    def task_grad(self, meta, loss_fn, task, inputs, phase=None):
        return self._task(meta, loss_fn, *task)

    def batch_grad(self, meta, loss_fn, batch, inputs, phase=None, vmap=True):
        grads, losses = map_tasks(
            lambda m, *task: self._task(m, loss_fn, *task), meta, batch, vmap)
        return tree_map(lambda g: mx.mean(g, axis=0), grads), mx.mean(losses)
