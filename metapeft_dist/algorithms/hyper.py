"""The LoRA hypernetwork as a meta-learning algorithm, so it meta-trains on the same
runtime (Ray workers, parameter server, checkpoints, evaluation) as MAML.

Meta-parameters: ``params``, the base LoRA matrices M0 (and a head, unused: the
hypernetwork's head comes from the support set), and ``hyper``, the task-encoding MLP,
the rank-``map_rank`` maps and the metric scale (metapeft_dist/hyper.py has the
functions and the derivation). Adapting a task starts from what the hypernetwork
generates for its support set,

    M(t) = M0 + reshape(P_M (Q_M t)),  t = MLP(pool(prototypes of frozen-base features)),
    head = Proto-MAML head of the support set under the generated adapters,

then runs the job's inner loop. The outer gradient is first-order through the inner
steps (d phi_k / d phi_0 = I) and exact through the generator (at 0 inner steps, exact).
Meta-parameters without ``hyper`` (the standard-init and head-only baselines) adapt
from ``params`` as in MAML, so the same evaluation compares them.

The features of the support set are read through the model the loss closes over
(:class:`metapeft_dist.job.TaskLoss`): the model with an identity head, on the frozen
base (the probe) and on the generated adapters (the prototypes).
"""

from __future__ import annotations

import math

import mlx.core as mx

from metapeft_dist.algorithms.inner import adapt
from metapeft_dist.algorithms.maml import MAML
from metapeft_dist.models.lora import is_adapter
from metapeft_dist.models.mlp import init_linear
from metapeft_dist.tree import Meta, Params


class Hyper(MAML):
    name = "hyper"

    def __init__(self, inner_steps, inner_lr, inner_optimizer, task_dim: int = 64,
                 hidden: int = 128, map_rank: int = 16):
        super().__init__(inner_steps, inner_lr, inner_optimizer, first_order=True)
        self.task_dim, self.hidden, self.map_rank = task_dim, hidden, map_rank

    def init_hyper(self, key: mx.array, params: Params) -> Meta:
        """Meta-parameters of a fresh hypernetwork whose output is ``params``' adapters
        for every task (its maps start at zero)."""
        from metapeft_dist.models.encoder import LOGIT_SCALE

        names = sorted(k for k in params if is_adapter(k))
        if not names:
            raise ValueError("the model has no LoRA adapters to generate")
        dim = int(params["head.w"].shape[1])
        keys = mx.random.split(key, 2 + len(names))
        hyper = {**init_linear(keys[0], "task.0", 2 * dim, self.hidden),
                 **init_linear(keys[1], "task.1", self.hidden, self.task_dim),
                 "metric.log_scale": mx.array(math.log(LOGIT_SCALE))}
        bound = 1.0 / math.sqrt(self.task_dim)
        for k, name in zip(keys[2:], names, strict=True):
            hyper[f"map_p.{name}"] = mx.zeros((params[name].size, self.map_rank))
            hyper[f"map_q.{name}"] = mx.random.uniform(-bound, bound,
                                                       (self.map_rank, self.task_dim), key=k)
        return {"params": dict(params), "hyper": hyper}

    def generate(self, meta: Meta, loss_fn, x: mx.array, y: mx.array) -> Params:
        """Adapters and head for the task whose support set is (x, y)."""
        from metapeft_dist.hyper import generate_adapters, proto_head, task_vector
        from metapeft_dist.models.encoder import LOGIT_SCALE

        params, hyper = meta["params"], meta["hyper"]
        ways, dim = params["head.w"].shape
        names = tuple(sorted(k for k in params if is_adapter(k)))
        pooled = loss_fn.model.with_out_dim(dim)
        identity = {"head.w": mx.eye(dim), "head.b": mx.zeros((dim,))}
        base = {k: v for k, v in loss_fn.frozen.items() if not is_adapter(k)}
        probe = mx.stop_gradient(pooled({**base, **identity}, x))
        t = task_vector(hyper, probe, y, ways)
        adapters = generate_adapters({**hyper, **{f"base.{n}": params[n] for n in names}},
                                     t, names)
        z = pooled({**base, **adapters, **identity}, x) / LOGIT_SCALE
        return {**adapters, **proto_head(z, y, ways, mx.exp(hyper["metric.log_scale"]))}

    def adapt(self, meta: Meta, loss_fn, x: mx.array, y: mx.array, steps: int | None = None,
              first_order: bool = False) -> list[Params]:
        if "hyper" not in meta:
            return super().adapt(meta, loss_fn, x, y, steps, first_order)
        start = self.generate(meta, loss_fn, x, y)
        return adapt(start, loss_fn, x, y, self.inner_steps if steps is None else steps,
                     self.lr_rule(meta), self.inner_optimizer, first_order)
