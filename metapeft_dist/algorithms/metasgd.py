"""Meta-SGD (Li, Zhou, Chen and Li 2017): learn the initialization and a learning rate
per parameter element.

phi = theta - alpha (elementwise) * grad L_support(theta);  (theta, alpha) are updated
by the outer optimizer on the query loss. alpha starts at the inner learning rate.
Even the first-order variant gives alpha a gradient, through the -alpha * g term.
"""

from __future__ import annotations

import mlx.core as mx

from metapeft_dist.algorithms.base import GradientMetaAlgorithm
from metapeft_dist.algorithms.inner import InnerOptimizer, LrRule
from metapeft_dist.tree import Meta, Params


class MetaSGD(GradientMetaAlgorithm):
    name = "metasgd"

    def __init__(self, inner_steps: int, inner_lr: float,
                 inner_optimizer: InnerOptimizer = InnerOptimizer(),
                 first_order: bool = False):
        super().__init__(inner_steps, inner_lr, inner_optimizer)
        self.first_order = first_order

    def init_meta(self, params: Params) -> Meta:
        return {"params": params,
                "lr": {n: mx.full(p.shape, self.inner_lr) for n, p in params.items()}}

    def lr_rule(self, meta: Meta) -> LrRule:
        rates = meta["lr"]
        return lambda step, name: rates[name]
