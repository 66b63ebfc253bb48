"""MAML (Finn, Abbeel and Levine 2017) and its first-order approximation.

theta <- theta - beta * grad_theta sum_i L_query_i(phi_i(theta)),
phi_i(theta) = theta after the inner steps on task i's support set.

Second order differentiates through the inner loop (Hessian-vector products). First
order (FOMAML) stops the gradient at each inner gradient, so d(phi)/d(theta) = I and
the outer gradient is the query-loss gradient at phi_i.
"""

from __future__ import annotations

from metapeft_dist.algorithms.base import GradientMetaAlgorithm
from metapeft_dist.algorithms.inner import InnerOptimizer


class MAML(GradientMetaAlgorithm):
    def __init__(self, inner_steps: int, inner_lr: float,
                 inner_optimizer: InnerOptimizer = InnerOptimizer(),
                 first_order: bool = False):
        super().__init__(inner_steps, inner_lr, inner_optimizer)
        self.first_order = first_order
        if self.name == "base":  # subclasses (the hypernetwork) keep their own name
            self.name = "fomaml" if first_order else "maml"
