"""Sinusoid regression (Finn et al. 2017, section 5.1).

A task is y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi]; inputs x ~ U[-5, 5].
The family is continuous, so the splits share one distribution and are kept apart by
their sampling streams (the split is part of every task key).
"""

from __future__ import annotations

import numpy as np

from metapeft_dist.tasks.base import Episode, TaskKey
from metapeft_dist.tasks.catalog import FAMILIES

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


class Sinusoid:
    info = FAMILIES["sinusoid"]
    ways = None
    pretrain_outputs = 1
    files = None

    @staticmethod
    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        amplitude = rng.uniform(*AMPLITUDE)
        phase = rng.uniform(*PHASE)
        x = rng.uniform(*X_RANGE, size=(n, 1))
        y = amplitude * np.sin(x - phase)
        return x.astype(np.float32), y.astype(np.float32), amplitude, phase

    def sample(self, key: TaskKey, shots: int, query: int) -> Episode:
        x, y, _, _ = self.draw(key.rng(), shots + query)
        return Episode(x[:shots], y[:shots], x[shots:], y[shots:])

    def pretrain_batch(self, rng: np.random.Generator, size: int):
        x, y, _, _ = self.draw(rng, size)
        return x, y
