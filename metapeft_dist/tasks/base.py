"""Episodes and keyed task sampling.

A task is identified by ``(seed, split, iteration, index)`` and sampled from a numpy
generator seeded with exactly that key, so any task can be rebuilt on its own, on any
machine, without sampling the others: the distributed runtime sends keys, not data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from metapeft_dist.tasks.catalog import SPLITS, FamilyInfo

SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class TaskKey:
    seed: int
    split: str
    iteration: int
    index: int

    def rng(self) -> np.random.Generator:
        return task_rng(self.seed, self.split, self.iteration, self.index)


def task_rng(seed: int, split: str, iteration: int, index: int) -> np.random.Generator:
    if min(seed, iteration, index) < 0:
        raise ValueError(f"task key parts must be >= 0, got {(seed, iteration, index)}")
    return np.random.default_rng([seed, SPLIT_IDS[split], iteration, index])


# SplitMix64 (Steele, Lea and Flood 2014): a Weyl step and its output mix
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, element-wise on uint64 (multiplication wraps mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def keyed_uniforms(seed: int, split: str, iteration: int, indices: Sequence[int],
                   count: int) -> np.ndarray:
    """(len(indices), count) float64 in [0, 1): the first ``count`` draws of each task
    ``(seed, split, iteration, i)``. A counter-based stream: draw j of a task is SplitMix64's
    output for the task's key hashed from those four numbers and j, so a task's draws
    are made on their own or with any others (the same bits), any prefix is the same
    whatever ``count`` is, and a batch takes a few vectorized numpy passes instead of a
    generator per task. Integer arithmetic only: the same bits on every machine."""
    if min(seed, iteration, *indices) < 0:
        raise ValueError(f"task key parts must be >= 0, got {(seed, iteration, min(indices))}")
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) + _GAMMA)
        for part in (SPLIT_IDS[split], iteration):
            key = _mix(key ^ (np.uint64(part) + _GAMMA))
        keys = _mix(key ^ (np.asarray(indices, dtype=np.uint64) + _GAMMA))
        steps = _GAMMA * np.arange(1, count + 1, dtype=np.uint64)
        bits = _mix(keys[:, None] + steps[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def distinct(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct items of ``pool``: the first ``n`` of a random permutation. A task's
    first items (its support set) are the same however many are drawn, so evaluating
    with more query examples scores the same support sets (``rng.choice(..., n,
    replace=False)`` draws a different sample for every ``n``)."""
    if n > len(pool):
        raise ValueError(f"cannot draw {n} distinct items from {len(pool)}")
    return pool[rng.permutation(len(pool))[:n]]


@dataclass(frozen=True)
class Episode:
    """One task (arrays (n, ...)) or a stack of tasks (arrays (tasks, n, ...)).

    Classification labels are int32 class indices in [0, ways); regression targets are
    float32 of shape (n, 1).
    """

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.support_x, self.support_y, self.query_x, self.query_y


def stack(episodes: Sequence[Episode]) -> Episode:
    parts = zip(*(e.arrays() for e in episodes), strict=True)
    return Episode(*(np.stack(p) for p in parts))


class TaskFamily(Protocol):
    info: FamilyInfo
    ways: int | None  # None for regression
    # the user's task files the family was built from, by name (jsonl); None for the
    # built-in families, which every machine has
    files: dict[str, bytes] | None

    def sample(self, key: TaskKey, shots: int, query: int) -> Episode: ...

    def pretrain_batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Examples from the meta-train split with labels over all its classes."""
        ...

    @property
    def pretrain_outputs(self) -> int: ...


def sample_batch(family: TaskFamily, seed: int, split: str, iteration: int,
                 indices: Sequence[int], shots: int, query: int) -> Episode:
    """The tasks ``(seed, split, iteration, i)`` for i in ``indices``, stacked (by the
    family's ``sample_many`` where it has one: the same arrays, drawn together)."""
    if hasattr(family, "sample_many"):
        return family.sample_many([TaskKey(seed, split, iteration, i) for i in indices],
                                  shots, query)
    return stack([family.sample(TaskKey(seed, split, iteration, i), shots, query)
                  for i in indices])
