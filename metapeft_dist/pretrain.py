"""Supervised pretraining on all meta-train data.

Gives the frozen base for ``model.base: pretrained`` and the "pretrained" baseline:
the network is trained as one classifier over all meta-train classes (digits: 20-way),
or one regressor over meta-train tasks (sinusoid, Finn et al.'s pretrained baseline),
then its head is replaced by a fresh one for the task's classes.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from metapeft_dist.models import Model, is_head
from metapeft_dist.objectives import Objective
from metapeft_dist.tree import Params


def pretrain(model: Model, family, objective: Objective, spec, seed: int,
             compile: bool = True) -> Params:
    """All parameters of ``model`` (its head sized for the task) after pretraining.

    ``spec`` is a :class:`metapeft_dist.config.PretrainSpec`. Deterministic in ``seed``.
    """
    wide = model.with_out_dim(family.pretrain_outputs)
    params = wide.init(mx.random.key(seed))
    optimizer = optim.Adam(learning_rate=spec.lr, bias_correction=True)
    optimizer.init(params)
    holder = {"params": params}
    state = [holder, optimizer.state]

    def loss_fn(p, x, y):
        return objective.loss(wide(p, x), y)

    grad_fn = mx.value_and_grad(loss_fn)

    def step(x, y):
        loss, grads = grad_fn(holder["params"], x, y)
        holder["params"] = optimizer.apply_gradients(grads, holder["params"])
        return loss

    if compile:
        step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng([seed, 0x5EED])
    for _ in range(spec.steps):
        x, y = family.pretrain_batch(rng, spec.batch)
        mx.eval(step(mx.array(x), mx.array(y)), state)
    trained = holder["params"]
    fresh_head = model.init(mx.random.key(seed + 1))
    return {**{k: v for k, v in trained.items() if not is_head(k)},
            **{k: v for k, v in fresh_head.items() if is_head(k)}}
