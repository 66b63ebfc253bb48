"""Task2Vec (Achille et al., 2019): a task is the diagonal Fisher information of a fixed
probe network whose head was trained on the task.

    F = 1/n sum_i  sum_c p(c | x_i) (d/d theta log p(c | x_i))^2

over the support set, theta the probe's base weights, p the probe with the task's
head. The expectation over labels is taken exactly under the model's own predictive
distribution (the true Fisher, not the empirical one; the paper samples labels). Each
weight matrix's Fisher is averaged per output unit (per filter for a conv kernel), so
the embedding's size is fixed by the probe, not by the task.

Distances between two Fisher embeddings use the paper's symmetric normalization (see
:func:`metapeft_dist.embed.distance`).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from metapeft_dist.embed.probe import Probe, TaskSample

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


def per_unit(fisher: dict[str, mx.array], names: Sequence[str]) -> np.ndarray:
    """Each weight's Fisher averaged over all axes but the first (the output unit);
    vectors (biases, norms) as they are; concatenated in ``names`` order."""
    parts = []
    for name in names:
        value = fisher[name]
        if value.ndim > 1:
            value = value.mean(axis=tuple(range(1, value.ndim)))
        parts.append(np.array(value.astype(mx.float32)).reshape(-1))
    return np.concatenate(parts).astype(np.float64)


def fisher_diagonal(probe: Probe, head: tuple[mx.array, mx.array], x: mx.array
                    ) -> dict[str, mx.array]:
    """Diagonal Fisher information of the probe's base weights, labels drawn from the
    model (exact expectation over the ``ways`` classes), averaged over the inputs."""
    w, b = head
    ways = w.shape[0]
    base = probe.base()

    def log_probs(base_weights, xi):
        logits = probe.forward(base_weights, xi[None]) @ w.T + b
        return (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]

    probs = mx.softmax(probe.forward(base, x) @ w.T + b, axis=-1)  # (n, ways)
    total = {k: mx.zeros(v.shape, dtype=mx.float32) for k, v in base.items()}
    for c in range(ways):
        grads = mx.vmap(mx.grad(lambda p, xi, c=c: log_probs(p, xi)[c]),
                        in_axes=(None, 0))(base, x)
        weight = probs[:, c]
        for k, g in grads.items():
            g = g.astype(mx.float32)
            shape = (-1,) + (1,) * (g.ndim - 1)
            total[k] = total[k] + (weight.reshape(shape) * g * g).sum(axis=0)
        mx.eval(total)
    n = x.shape[0]
    return {k: v / n for k, v in total.items()}


class Task2Vec:
    """Fisher embeddings of tasks through ``probe``."""

    kind = "task2vec"

    def __init__(self, probe: Probe, head_steps: int = HEAD_STEPS):
        self.probe = probe
        self.head_steps = head_steps

    @property
    def dim(self) -> int:
        return int(sum(self.probe.params[k].shape[0] for k in self.probe.base_names))

    def embed_one(self, task: TaskSample) -> np.ndarray:
        x = mx.array(task.x)
        head = train_head(self.probe.features(x), task.y, task.ways, self.head_steps)
        return per_unit(fisher_diagonal(self.probe, head, x), self.probe.base_names)

    def embed(self, tasks: Sequence[TaskSample]) -> np.ndarray:
        return np.stack([self.embed_one(t) for t in tasks])
