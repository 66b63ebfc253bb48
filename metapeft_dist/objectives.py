"""Task losses and metrics, by family kind: MSE for regression, cross-entropy for
classification (accuracy as its metric; the negative log-likelihood when the model's
outputs are log-probabilities already)."""

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


def nll(log_probs: mx.array, y: mx.array) -> mx.array:
    """Mean negative log-likelihood of the labels: ``log_probs`` are log-probabilities
    already normalized over more outcomes than the columns (a causal LM's letters
    under its whole vocabulary), so they are not normalized again."""
    return -mx.mean(mx.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0])


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
# a causal LM with model.label_loss: vocabulary: its outputs are the letters'
# log-probabilities over the whole vocabulary
LOG_PROB_CLASSIFICATION = Objective(nll, accuracy, "accuracy", higher_is_better=True)


def objective_for(kind: str, log_probs: bool = False) -> Objective:
    """The objective of a family kind; ``log_probs``: the model's outputs are
    normalized log-probabilities (classification only)."""
    if kind != "classification":
        return REGRESSION
    return LOG_PROB_CLASSIFICATION if log_probs else CLASSIFICATION
