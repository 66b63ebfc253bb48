"""Handcrafted task features: what a practitioner would look at first.

Every feature is non-negative (so :func:`metapeft_dist.embed.distance` compares them by
ratio, whatever their scale), and a feature that does not apply (text statistics of an
image task, pixel statistics of a text task) is 0. ``NAMES`` lists them in order.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from metapeft_dist.embed.probe import Probe, TaskSample

NAMES = (
    "log_examples",  # log(1 + support size)
    "classes",
    "balance",  # smallest class / largest class
    "label_entropy",  # entropy of the labels / log(classes)
    "within_class_similarity",  # mean cosine of same-label probe features, as (1 + cos) / 2
    "between_class_similarity",  # mean cosine of class prototypes, as (1 + cos) / 2
    "prototype_accuracy",  # leave-one-out nearest-prototype accuracy on the support set
    "feature_norm",  # mean L2 norm of the probe features
    "feature_spread",  # mean per-dimension standard deviation of the probe features
    "text_chars",  # mean characters per text / 100
    "text_words",  # mean words per text / 20
    "type_token_ratio",  # distinct words / words
    "class_vocabulary_overlap",  # mean Jaccard overlap of the classes' word sets
    "capitalized_words",  # fraction of words starting with a capital
    "non_letters",  # fraction of non-space characters that are not letters
    "input_mean",  # array inputs (images): mean value
    "input_std",
    "input_zeros",  # fraction of exact zeros
)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def label_features(y: np.ndarray) -> list[float]:
    counts = np.bincount(y)
    counts = counts[counts > 0]
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum() / np.log(len(p))) if len(p) > 1 else 0.0
    return [float(np.log1p(len(y))), float(len(p)), float(counts.min() / counts.max()), entropy]


def feature_statistics(features: np.ndarray, y: np.ndarray) -> list[float]:
    """How the probe's features of the support set cluster by label."""
    classes = np.unique(y)
    protos = np.stack([features[y == c].mean(axis=0) for c in classes])
    within = []
    for c in classes:
        members = features[y == c]
        within.append(_cosines(members, members)[np.triu_indices(len(members), 1)])
    within_all = np.concatenate(within) if within else np.zeros(0)
    between = _cosines(protos, protos)[np.triu_indices(len(classes), 1)]
    correct = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        sims = []
        for c in classes:
            members = keep & (y == c)
            if not members.any():
                sims.append(-np.inf)
                continue
            sims.append(_cosines(features[i:i + 1], features[members].mean(axis=0)[None])[0, 0])
        correct += classes[int(np.argmax(sims))] == y[i]
    return [float((1 + within_all.mean()) / 2) if within_all.size else 1.0,
            float((1 + between.mean()) / 2) if between.size else 0.0,
            correct / len(y),
            float(np.linalg.norm(features, axis=-1).mean()),
            float(features.std(axis=0).mean())]


def text_statistics(texts: Sequence[str], y: np.ndarray) -> list[float]:
    words = [_WORD.findall(t) for t in texts]
    flat = [w for ws in words for w in ws]
    lower = [w.lower() for w in flat]
    vocab = [set(w.lower() for w in ws) for ws in words]
    class_vocab = [set().union(*(vocab[i] for i in np.flatnonzero(y == c)))
                   for c in np.unique(y)]
    overlaps = [len(a & b) / max(len(a | b), 1)
                for i, a in enumerate(class_vocab) for b in class_vocab[i + 1:]]
    chars = [c for t in texts for c in t if not c.isspace()]
    return [float(np.mean([len(t) for t in texts])) / 100,
            float(np.mean([len(ws) for ws in words])) / 20,
            len(set(lower)) / max(len(lower), 1),
            float(np.mean(overlaps)) if overlaps else 0.0,
            sum(w[0].isupper() for w in flat) / max(len(flat), 1),
            sum(not c.isalpha() for c in chars) / max(len(chars), 1)]


def input_statistics(x: np.ndarray) -> list[float]:
    x = np.asarray(x, dtype=np.float64)
    return [float(np.abs(x.mean())), float(x.std()), float((x == 0).mean())]


class Handcrafted:
    """Handcrafted features of tasks (``NAMES``), read through ``probe``."""

    kind = "handcrafted"
    dim = len(NAMES)

    def __init__(self, probe: Probe):
        self.probe = probe

    def embed_one(self, task: TaskSample) -> np.ndarray:
        features = self.probe.features(task.x)
        values = label_features(task.y) + feature_statistics(features, task.y)
        values += text_statistics(task.texts, task.y) if task.texts else [0.0] * 6
        text_task = task.texts is not None or np.issubdtype(task.x.dtype, np.integer)
        values += [0.0] * 3 if text_task else input_statistics(task.x)
        return np.array(values, dtype=np.float64)

    def embed(self, tasks: Sequence[TaskSample]) -> np.ndarray:
        return np.stack([self.embed_one(t) for t in tasks])
