"""Sinusoid regression (Finn et al. 2017, section 5.1).

A task is y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi]; inputs x ~ U[-5, 5].
The family is continuous, so the splits share one distribution and are kept apart by
their sampling streams (the split is part of every task key).

A task takes ``2 + n`` uniform draws from its key's counter-based stream
(tasks/base.py ``keyed_uniforms``), in order: the amplitude, the phase, the n inputs,
each ``low + (high - low) * u``. A batch of tasks (``sample_many``) is drawn in one
vectorized pass, the same bits as each task drawn alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metapeft_dist.tasks.base import Episode, TaskKey, keyed_uniforms
from metapeft_dist.tasks.catalog import FAMILIES

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


def _scaled(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    low, high = bounds
    return low + (high - low) * u


def from_uniforms(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tasks from their uniform doubles ``u`` (tasks, 2 + n): inputs and targets as
    float32 (tasks, n, 1), amplitudes and phases as float64 (tasks,)."""
    amplitude, phase = _scaled(u[:, 0], AMPLITUDE), _scaled(u[:, 1], PHASE)
    x = _scaled(u[:, 2:, None], X_RANGE)
    y = amplitude[:, None, None] * np.sin(x - phase[:, None, None])
    return x.astype(np.float32), y.astype(np.float32), amplitude, phase


class Sinusoid:
    info = FAMILIES["sinusoid"]
    ways = None
    pretrain_outputs = 1
    files = None

    @staticmethod
    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        x, y, amplitude, phase = from_uniforms(rng.random((1, 2 + n)))
        return x[0], y[0], float(amplitude[0]), float(phase[0])

    def sample(self, key: TaskKey, shots: int, query: int) -> Episode:
        episode = self.sample_many([key], shots, query)
        return Episode(*(part[0] for part in episode.arrays()))

    def sample_many(self, keys: Sequence[TaskKey], shots: int, query: int) -> Episode:
        """The tasks of ``keys``, stacked: the same arrays as ``sample`` of each."""
        if len({(k.seed, k.split, k.iteration) for k in keys}) == 1:
            first = keys[0]
            u = keyed_uniforms(first.seed, first.split, first.iteration,
                               [k.index for k in keys], 2 + shots + query)
        else:
            u = np.concatenate([keyed_uniforms(k.seed, k.split, k.iteration, [k.index],
                                               2 + shots + query) for k in keys])
        x, y, _, _ = from_uniforms(u)
        return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    def pretrain_batch(self, rng: np.random.Generator, size: int):
        x, y, _, _ = self.draw(rng, size)
        return x, y
