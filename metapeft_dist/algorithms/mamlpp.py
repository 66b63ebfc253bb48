"""MAML++ (Antoniou, Edwards and Storkey 2019, "How to train your MAML").

Three of its fixes apply to these models (the batch-norm ones need batch norm):
  - multi-step loss (MSL): the objective is sum_k w_k L_query(phi_k) over every inner
    step k; w starts uniform and anneals onto the last step over
    ``msl_anneal_iterations`` (non-final weights decay linearly to 0.03/N);
  - per-layer per-step learning rates (LSLR): a learned rate for each layer and inner
    step, starting at the inner learning rate;
  - derivative-order annealing (DA): first-order meta-gradients for the first
    ``first_order_until`` iterations, second order after.
(Cosine annealing of the outer learning rate is ``outer.schedule: cosine``.)
With all three off it is exactly second-order MAML.
"""

from __future__ import annotations

import mlx.core as mx

from metapeft_dist.algorithms.base import GradientMetaAlgorithm
from metapeft_dist.algorithms.inner import InnerOptimizer, LrRule
from metapeft_dist.tree import Meta, Params


def layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def msl_weights(iteration: int, steps: int, anneal_iterations: int) -> list[float]:
    """Antoniou et al.'s per-step loss importance at ``iteration`` (sums to 1)."""
    if steps == 1:
        return [1.0]
    uniform = 1.0 / steps
    floor = 0.03 / steps
    if anneal_iterations == 0:
        decayed = floor
    else:
        decayed = max(uniform - iteration * (uniform - floor) / anneal_iterations, floor)
    weights = [decayed] * (steps - 1)
    return weights + [1.0 - sum(weights)]


class MAMLpp(GradientMetaAlgorithm):
    name = "mamlpp"

    def __init__(self, inner_steps: int, inner_lr: float,
                 inner_optimizer: InnerOptimizer = InnerOptimizer(),
                 multi_step_loss: bool = True, msl_anneal_iterations: int = 1000,
                 per_step_lr: bool = True, first_order_until: int = 0):
        super().__init__(inner_steps, inner_lr, inner_optimizer)
        self.multi_step_loss = multi_step_loss
        self.msl_anneal_iterations = msl_anneal_iterations
        self.per_step_lr = per_step_lr
        self.first_order_until = first_order_until

    def init_meta(self, params: Params) -> Meta:
        meta: Meta = {"params": params}
        if self.per_step_lr:
            layers = sorted({layer_of(n) for n in params})
            meta["lslr"] = {layer: mx.full((self.inner_steps,), self.inner_lr)
                            for layer in layers}
        return meta

    def lr_rule(self, meta: Meta) -> LrRule:
        if not self.per_step_lr:
            return super().lr_rule(meta)
        rates = meta["lslr"]
        last = self.inner_steps - 1
        # Beyond the trained steps (longer adaptation at evaluation) keep the last rate.
        return lambda step, name: rates[layer_of(name)][min(step, last)]

    def phase(self, iteration: int) -> bool:
        """True: first-order meta-gradient this iteration (derivative-order annealing)."""
        return iteration < self.first_order_until

    def step_inputs(self, iteration: int) -> mx.array:
        if not self.multi_step_loss:
            return mx.zeros((0,))
        return mx.array(msl_weights(iteration, self.inner_steps, self.msl_anneal_iterations))

    def objective(self, meta, loss_fn, task, inputs, phase=None):
        sx, sy, qx, qy = task
        trajectory = self.adapt(meta, loss_fn, sx, sy, first_order=bool(phase))
        final = loss_fn(trajectory[-1], qx, qy)
        if not self.multi_step_loss:
            return final, final
        losses = [loss_fn(phi, qx, qy) for phi in trajectory[1:-1]] + [final]
        return sum(inputs[k] * loss for k, loss in enumerate(losses)), final
