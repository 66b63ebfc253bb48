"""Task losses and metrics, by family kind: MSE for regression, cross-entropy for
classification (accuracy as its metric)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx


def mse(pred: mx.array, y: mx.array) -> mx.array:
    return mx.mean(mx.square(pred - y))


def cross_entropy(logits: mx.array, y: mx.array) -> mx.array:
    logz = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return mx.mean(logz - picked)


def accuracy(logits: mx.array, y: mx.array) -> mx.array:
    return mx.mean((mx.argmax(logits, axis=-1) == y).astype(mx.float32))


@dataclass(frozen=True)
class Objective:
    loss: Callable[[mx.array, mx.array], mx.array]
    metric: Callable[[mx.array, mx.array], mx.array]
    metric_name: str
    higher_is_better: bool


REGRESSION = Objective(mse, mse, "mse", higher_is_better=False)
CLASSIFICATION = Objective(cross_entropy, accuracy, "accuracy", higher_is_better=True)


def objective_for(kind: str) -> Objective:
    return CLASSIFICATION if kind == "classification" else REGRESSION
