"""N-way K-shot classification on scikit-learn's bundled 8x8 digits.

As Omniglot benchmarks do with characters, each digit seen at 0, 90, 180 and 270
degrees is its own class, except that 0, 1 and 8 look the same turned by 180 degrees
(a 5-shot nearest-prototype classifier tells 8 from 8-turned-180 apart only 65-70% of
the time), so they keep only their 0 and 90 degree classes: 34 classes of 174-183
images. Splits are by digit, so meta-test digits are never seen, in any rotation,
during meta-training: digits 0-4 meta-train (16 classes), 5-6 meta-val (8), 7-9
meta-test (10). Pixels are scaled from 0..16 to 0..1.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from metapeft_dist.tasks.base import Episode, TaskKey, distinct
from metapeft_dist.tasks.catalog import FAMILIES

SPLIT_DIGITS = {"train": (0, 1, 2, 3, 4), "val": (5, 6), "test": (7, 8, 9)}
ROTATIONS = (0, 1, 2, 3)  # quarter turns
HALF_TURN_SYMMETRIC = (0, 1, 8)  # these keep quarter turns 0 and 1 only


def rotations(digit: int) -> tuple[int, ...]:
    return ROTATIONS[:2] if digit in HALF_TURN_SYMMETRIC else ROTATIONS


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, digits (1797,)): scikit-learn's bundled
    copy, read as ``sklearn.datasets.load_digits`` reads it but without importing
    scikit-learn, which takes a second or more (a Ray worker builds this family as it
    starts)."""
    import gzip
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("sklearn")  # finds the package; runs none of it
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError("the digits family reads scikit-learn's bundled digits: "
                                  "pip install scikit-learn")
    path = Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@lru_cache(maxsize=1)
def load_classes() -> dict[tuple[int, int], np.ndarray]:
    """{(digit, quarter_turns): images (n, 8, 8, 1) float32}, from sklearn's bundled copy."""
    pixels, target = bundled_digits()
    images = (pixels / 16.0).astype(np.float32)
    classes = {}
    for digit in range(10):
        base = images[target == digit]
        for turns in rotations(digit):
            rotated = np.rot90(base, k=turns, axes=(1, 2))
            classes[(digit, turns)] = np.ascontiguousarray(rotated[..., None])
    return classes


def split_classes(split: str) -> list[tuple[int, int]]:
    return [(d, r) for d in SPLIT_DIGITS[split] for r in rotations(d)]


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images (n, H, W, C) moved by (dy, dx) whole pixels, zero-filled."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class Digits:
    info = FAMILIES["digits"]
    files = None

    def __init__(self, ways: int, augment: bool = False):
        self.ways = ways
        self.augment = augment
        self.classes = load_classes()
        self.pretrain_outputs = len(split_classes("train"))

    def sample(self, key: TaskKey, shots: int, query: int) -> Episode:
        rng = key.rng()
        pool = split_classes(key.split)
        chosen = rng.choice(len(pool), size=self.ways, replace=False)
        per_class = []
        for cls in chosen:
            images = self.classes[pool[cls]]
            per_class.append(distinct(rng, images, shots + query))
        if self.augment and key.split == "train":
            # One shift per class, drawn after the images so an augmented episode is the
            # plain one moved: a new variant of each class, not noise within it (task
            # augmentation against meta-overfitting to the 16 meta-train classes).
            offsets = rng.integers(-1, 2, size=(self.ways, 2))
            per_class = [shift(x, int(dy), int(dx)) for x, (dy, dx) in zip(per_class, offsets,
                                                                             strict=True)]
        support_x = [x[:shots] for x in per_class]
        query_x = [x[shots:] for x in per_class]
        labels = np.arange(self.ways, dtype=np.int32)
        return Episode(
            np.concatenate(support_x), np.repeat(labels, shots),
            np.concatenate(query_x), np.repeat(labels, query),
        )

    def pretrain_batch(self, rng: np.random.Generator, size: int):
        pool = split_classes("train")
        labels = rng.integers(len(pool), size=size)
        x = np.stack([self.classes[pool[c]][rng.integers(len(self.classes[pool[c]]))]
                      for c in labels])
        return x, labels.astype(np.int32)
