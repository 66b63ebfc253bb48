"""Task2Vec (Achille et al., 2019): a task is the diagonal Fisher information of a fixed
probe network whose head was trained on the task.

    F = 1/n sum_i  sum_c p(c | x_i) (d/d theta log p(c | x_i))^2

over the support set, theta the probe's base weights, p the probe with the task's
head. The expectation over labels is taken exactly under the model's own predictive
distribution (the true Fisher, not the empirical one; the paper samples labels). Each
weight matrix's Fisher is averaged per output unit (per filter for a conv kernel), so
the embedding's size is fixed by the probe, not by the task.

A weight matrix's per-unit Fisher needs no per-example weight gradient: for a linear
layer ``y_t = W x_t + b`` over positions t (tokens, pixels) of one example, the gradient
is ``g = sum_t delta_t x_t^T`` with ``delta_t`` the gradient at ``y_t``, so unit o's sum
of squares is ``sum_{t,s} delta_t[o] delta_s[o] (x_t . x_s)``: the positions' Gram
matrix between two vectors of output gradients. :func:`fisher_per_unit` gets the
``delta`` of every example at once, from one batched gradient per class with respect
to a per-position copy of each bias, and the inputs ``x`` recorded in a forward pass
(models/lora.py): a fraction of the time and memory of :func:`fisher_diagonal`, which
forms every example's full gradient and stays as the definition the tests check it by.

Distances between two Fisher embeddings use the paper's symmetric normalization (see
:func:`metapeft_dist.embed.distance`).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from metapeft_dist.embed.probe import Probe, TaskSample
from metapeft_dist.models.lora import KERNEL

HEAD_STEPS = 100
HEAD_LR = 0.5
HEAD_DECAY = 1e-3


def train_head(features: np.ndarray, y: np.ndarray, ways: int, steps: int = HEAD_STEPS,
               lr: float = HEAD_LR, weight_decay: float = HEAD_DECAY
               ) -> tuple[mx.array, mx.array]:
    """A linear head (W (ways, d), b) fit to the task by full-batch gradient descent on
    the cross-entropy plus ``weight_decay``/2 |W|^2, from zero: deterministic. The
    features are scaled to unit root-mean-square norm for the fit (so one step size
    suits every probe), and W is scaled back."""
    scale = float(np.sqrt(np.mean(np.sum(np.square(features), axis=-1)))) or 1.0
    f, labels = mx.array(features / scale), mx.array(y)

    def loss(head):
        w, b = head
        logits = f @ w.T + b
        ce = mx.mean(mx.logsumexp(logits, axis=-1)
                     - mx.take_along_axis(logits, labels[:, None], axis=-1)[:, 0])
        return ce + 0.5 * weight_decay * mx.sum(w * w)

    grad = mx.grad(loss)
    head = (mx.zeros((ways, f.shape[1])), mx.zeros((ways,)))
    for _ in range(steps):
        gw, gb = grad(head)
        head = (head[0] - lr * gw, head[1] - lr * gb)
        mx.eval(head)
    return head[0] / scale, head[1]


def units_axis(name: str) -> int:
    """The axis of a weight's output units: the first (``w``, Hugging Face's ``weight``,
    a conv kernel), the last for an (in, out) kernel (models/lora.py)."""
    return -1 if name.endswith(f".{KERNEL}") else 0


def per_unit(fisher: dict[str, mx.array], names: Sequence[str]) -> np.ndarray:
    """Each weight's Fisher averaged over all axes but its output units'; vectors
    (biases, norms) as they are; concatenated in ``names`` order."""
    parts = []
    for name in names:
        value = fisher[name]
        if value.ndim > 1:
            axis = units_axis(name) % value.ndim
            value = value.mean(axis=tuple(a for a in range(value.ndim) if a != axis))
        parts.append(np.array(value.astype(mx.float32)).reshape(-1))
    return np.concatenate(parts).astype(np.float64)


def fisher_diagonal(probe: Probe, head: tuple[mx.array, mx.array], x: mx.array,
                    names: Sequence[str] | None = None) -> dict[str, mx.array]:
    """Diagonal Fisher information of the probe's base weights (those in ``names``, the
    others held fixed; all by default), labels drawn from the model (exact expectation
    over the ``ways`` classes), averaged over the inputs."""
    w, b = head
    ways = w.shape[0]
    base = probe.base()
    wrt = {k: base[k] for k in (base if names is None else names)}

    def log_probs(weights, xi):
        logits = probe.forward({**base, **weights}, xi[None]) @ w.T + b
        return (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]

    probs = mx.softmax(probe.forward(base, x) @ w.T + b, axis=-1)  # (n, ways)
    total = {k: mx.zeros(v.shape, dtype=mx.float32) for k, v in wrt.items()}
    for c in range(ways):
        grads = mx.vmap(mx.grad(lambda p, xi, c=c: log_probs(p, xi)[c]),
                        in_axes=(None, 0))(wrt, x)
        weight = probs[:, c]
        for k, g in grads.items():
            g = g.astype(mx.float32)
            shape = (-1,) + (1,) * (g.ndim - 1)
            total[k] = total[k] + (weight.reshape(shape) * g * g).sum(axis=0)
        mx.eval(total)
    n = x.shape[0]
    return {k: v / n for k, v in total.items()}


def fisher_per_unit(probe: Probe, head: tuple[mx.array, mx.array], x: mx.array
                    ) -> np.ndarray:
    """``per_unit(fisher_diagonal(probe, head, x), probe.base_names)``, computed from
    per-position output gradients (see the module docstring); equal to it up to float32
    rounding (the same sums in another order).

    Each layer that recorded its input (models/lora.py) gets a per-position copy of its
    bias (a "tap", zero plus the bias, shaped like the layer's output), and of its
    weight when that is elementwise (a layer norm's scale): one gradient of the class's
    log-probability summed over the examples, which do not interact, gives every
    example's gradient at every position. A weight matrix's per-unit sum of squares is
    then the Gram form above, a bias's or an elementwise weight's per-example gradient
    the sum over positions. Base weights of a layer that records nothing fall back to
    per-example gradients (as :func:`fisher_diagonal`)."""
    from metapeft_dist.models.lora import recording_inputs

    w, b = head
    ways, n = w.shape[0], x.shape[0]
    base = probe.base()
    with recording_inputs() as inputs:
        probs = mx.softmax(probe.forward(base, x) @ w.T + b, axis=-1)  # (n, ways)
    layers = {k: v for k, v in inputs.items() if k in base and v[1] in base}
    matrices = {k: v for k, v in layers.items() if base[k].ndim > 1}
    grams = {}
    taps = {}  # base key -> its per-position copy's shape
    for k, (inp, bias) in layers.items():
        out = (*inp.shape[:-1], base[bias].shape[0])
        taps[bias] = out
        if k in matrices:
            flat = inp.reshape(n, -1, inp.shape[-1]).astype(mx.float32)  # (n, P, fan_in)
            grams[k] = flat @ mx.swapaxes(flat, 1, 2)  # (n, P, P)
        else:
            taps[k] = out
    others = [k for k in base if k not in matrices and k not in taps]

    def log_probs(weights, xs):
        logits = probe.forward(weights, xs) @ w.T + b
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def class_log_prob(zeros, c):  # summed over the examples
        return log_probs({**base, **{k: base[k] + z for k, z in zeros.items()}}, x)[:, c].sum()

    total = {k: mx.zeros((base[matrices[k][1]].shape[0],) if k in matrices else base[k].shape)
             for k in base if k not in others}
    zeros = {k: mx.zeros(shape) for k, shape in taps.items()}
    for c in range(ways):
        weight = probs[:, c]
        grads = mx.grad(class_log_prob)(zeros, c) if zeros else {}
        for k, g in grads.items():  # per position: sum over them, per example
            g = g.reshape(n, -1, g.shape[-1])
            total[k] = total[k] + (weight[:, None] * g.sum(axis=1) ** 2).sum(axis=0)
        for k, (_, bias) in matrices.items():
            units = base[bias].shape[0]
            delta = grads[bias].reshape(n, -1, units)  # (n, P, out)
            squares = (delta * (grams[k] @ delta)).sum(axis=1)  # (n, out)
            total[k] = total[k] + (weight[:, None] * squares).sum(axis=0) / (
                base[k].size // units)
        mx.eval(total)
    fisher = {k: v / n for k, v in total.items() if k not in others}
    if others:
        fisher.update(fisher_diagonal(probe, head, x, others))
    return per_unit(fisher, probe.base_names)


class Task2Vec:
    """Fisher embeddings of tasks through ``probe``."""

    kind = "task2vec"

    def __init__(self, probe: Probe, head_steps: int = HEAD_STEPS):
        self.probe = probe
        self.head_steps = head_steps

    @property
    def dim(self) -> int:
        params = self.probe.params
        return int(sum(params[k].shape[units_axis(k)] for k in self.probe.base_names))

    def embed_one(self, task: TaskSample) -> np.ndarray:
        head = train_head(self.probe.features(task.x), task.y, task.ways, self.head_steps)
        probe, x = self.probe.narrow(task.x)  # the task's texts only, cut to the longest
        return fisher_per_unit(probe, head, x)

    def embed(self, tasks: Sequence[TaskSample]) -> np.ndarray:
        return np.stack([self.embed_one(t) for t in tasks])
