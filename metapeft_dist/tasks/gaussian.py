"""Binary classification between two Gaussians (the seed's Experiment 1).

Each task draws, in 8 dimensions:
  - a centre c ~ N(0, I);
  - a direction u, uniform on the unit circle of the first two coordinates;
  - a separation s ~ U[1, 4];
  - per class, a diagonal covariance with standard deviations ~ U[0.5, 1.5];
and puts class 0 at c - (s/2) u and class 1 at c + (s/2) u. Only the first two
coordinates ever separate the classes: that is the structure a meta-learned
initialization can pick up and a random one cannot from five examples. The family is
continuous; the splits are kept apart by their sampling streams.
"""

from __future__ import annotations

import numpy as np

from metapeft_dist.tasks.base import Episode, TaskKey
from metapeft_dist.tasks.catalog import FAMILIES

DIM = FAMILIES["gaussian"].input_shape[0]
SEPARATION = (1.0, 4.0)
STD = (0.5, 1.5)


class Gaussian:
    info = FAMILIES["gaussian"]
    ways = 2
    pretrain_outputs = 2
    files = None

    @staticmethod
    def draw_task(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(means (2, DIM), stds (2, DIM)) of one task."""
        centre = rng.normal(size=DIM)
        angle = rng.uniform(0.0, 2 * np.pi)
        direction = np.zeros(DIM)
        direction[:2] = np.cos(angle), np.sin(angle)
        half = 0.5 * rng.uniform(*SEPARATION) * direction
        means = np.stack([centre - half, centre + half])
        stds = rng.uniform(*STD, size=(2, DIM))
        return means, stds

    @staticmethod
    def draw_points(rng: np.random.Generator, means: np.ndarray, stds: np.ndarray,
                    per_class: int) -> tuple[np.ndarray, np.ndarray]:
        x = means[:, None, :] + stds[:, None, :] * rng.normal(size=(2, per_class, DIM))
        y = np.repeat(np.arange(2, dtype=np.int32), per_class)
        return x.reshape(-1, DIM).astype(np.float32), y

    def sample(self, key: TaskKey, shots: int, query: int) -> Episode:
        rng = key.rng()
        means, stds = self.draw_task(rng)
        sx, sy = self.draw_points(rng, means, stds, shots)
        qx, qy = self.draw_points(rng, means, stds, query)
        return Episode(sx, sy, qx, qy)

    def pretrain_batch(self, rng: np.random.Generator, size: int):
        means, stds = self.draw_task(rng)
        return self.draw_points(rng, means, stds, max(1, size // 2))
