"""Meta-learning algorithms as pure functions on parameter trees."""

from __future__ import annotations

from metapeft_dist.algorithms.base import GradientMetaAlgorithm, MetaAlgorithm, Task
from metapeft_dist.algorithms.inner import InnerOptimizer, adapt
from metapeft_dist.algorithms.maml import MAML
from metapeft_dist.algorithms.mamlpp import MAMLpp
from metapeft_dist.algorithms.metasgd import MetaSGD
from metapeft_dist.algorithms.reptile import Reptile, reptile_update


def make_algorithm(spec) -> MetaAlgorithm:
    """The algorithm of a :class:`metapeft_dist.config.JobSpec`."""
    a, inner = spec.algorithm, spec.inner
    inner_opt = InnerOptimizer(inner.optimizer, inner.beta1, inner.beta2)
    common = (inner.steps, inner.lr, inner_opt)
    if a.name == "reptile":
        return Reptile(*common, serial=a.reptile.serial)
    if a.name in ("maml", "fomaml"):
        return MAML(*common, first_order=a.name == "fomaml")
    if a.name == "metasgd":
        return MetaSGD(*common, first_order=a.metasgd.first_order)
    if a.name == "mamlpp":
        o = a.mamlpp
        return MAMLpp(*common, multi_step_loss=o.multi_step_loss,
                      msl_anneal_iterations=o.msl_anneal_iterations,
                      per_step_lr=o.per_step_lr, first_order_until=o.first_order_until)
    if a.name == "hyper":
        from metapeft_dist.algorithms.hyper import Hyper

        o = a.hyper
        return Hyper(*common, task_dim=o.task_dim, hidden=o.hidden, map_rank=o.map_rank,
                     prune=o.prune)
    raise ValueError(f"unknown algorithm {a.name!r}")


__all__ = ["MetaAlgorithm", "GradientMetaAlgorithm", "Task", "InnerOptimizer", "adapt",
           "MAML", "MAMLpp", "MetaSGD", "Reptile", "reptile_update", "make_algorithm"]
