"""The inner loop: adapt parameters to one task's support set.

``adapt`` is a pure function: parameters, a loss, the support data and a learning-rate
rule in; the trajectory of adapted parameters out. Gradients flow through it (second
order) unless ``first_order`` stops them at each inner gradient, which is first-order
MAML's approximation d(phi)/d(theta) = I.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from metapeft_dist.tree import Params

LossFn = Callable[[Params, mx.array, mx.array], mx.array]
# (inner step k, parameter name) -> learning rate: a float, a scalar or an array like
# the parameter (Meta-SGD).
LrRule = Callable[[int, str], "float | mx.array"]


@dataclass(frozen=True)
class InnerOptimizer:
    kind: str = "sgd"  # "sgd" | "adam"
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8


def constant_lr(lr: float) -> LrRule:
    return lambda step, name: lr


def adapt(params: Params, loss_fn: LossFn, x: mx.array, y: mx.array, steps: int,
          lr: LrRule, optimizer: InnerOptimizer = InnerOptimizer(),
          first_order: bool = False) -> list[Params]:
    """[phi_0 = params, phi_1, ..., phi_steps] after ``steps`` full-batch updates.

    SGD:  phi <- phi - lr(k, n) * g
    Adam: moments start at zero for each task; the denominator is sqrt(v_hat + eps^2),
          which equals sqrt(v_hat) + eps to first order but keeps the second-order
          gradient finite where a gradient is exactly zero (sqrt'(0) is infinite).
    """
    grad_fn = mx.grad(loss_fn)
    trajectory = [params]
    m = v = None
    for k in range(steps):
        g = grad_fn(params, x, y)
        if first_order:
            g = {n: mx.stop_gradient(t) for n, t in g.items()}
        if optimizer.kind == "sgd":
            params = {n: p - lr(k, n) * g[n] for n, p in params.items()}
        else:
            b1, b2 = optimizer.beta1, optimizer.beta2
            if m is None:
                m = {n: mx.zeros_like(t) for n, t in g.items()}
                v = {n: mx.zeros_like(t) for n, t in g.items()}
            m = {n: b1 * m[n] + (1 - b1) * g[n] for n in g}
            v = {n: b2 * v[n] + (1 - b2) * mx.square(g[n]) for n in g}
            c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
            eps2 = optimizer.eps ** 2
            params = {n: p - lr(k, n) * (m[n] / c1) / mx.sqrt(v[n] / c2 + eps2)
                      for n, p in params.items()}
        trajectory.append(params)
    return trajectory
