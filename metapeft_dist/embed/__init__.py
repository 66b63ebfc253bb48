"""Task embeddings: a task as a vector, computed from its support set.

Three kinds behind one interface (``embed(tasks) -> (tasks, dim)`` over
:class:`TaskSample` s, all read through the same :class:`Probe`, the job's frozen base):

* ``handcrafted`` (handcrafted.py): size, classes, label balance, how the probe's
  features cluster by label, text length, vocabulary and its overlap between classes,
  input statistics;
* ``task2vec`` (task2vec.py): the diagonal Fisher information of the probe with a head
  trained on the task, averaged per output unit (Achille et al., 2019);
* ``learned`` (learned.py): a set-pooling network over class prototypes of the probe's
  features (Snell et al., 2017), trained contrastively over the task distribution.

Similarity is :func:`distance`, the normalized cosine distance.
"""

from __future__ import annotations

import numpy as np

from metapeft_dist.embed.probe import (Probe, ProbeError, TaskSample, family_samples,
                                       probe_from_job, probe_from_model, text_probe)

KINDS = ("handcrafted", "task2vec", "learned")


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized cosine distance in [0, 2]. For non-negative embeddings (Fisher
    information, the handcrafted features) Task2Vec's symmetric form,
    ``d_cos(a / (a + b), b / (a + b))`` elementwise, so each coordinate counts by the
    ratio of the two tasks' values and not by its scale; otherwise the plain cosine
    distance."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes: {a.shape} and {b.shape}")
    if (a >= 0).all() and (b >= 0).all():
        total = a + b
        total[total == 0] = 1.0
        a, b = a / total, b / total
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0
    return float(1.0 - a @ b / (na * nb))


def distance_matrix(rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    cols = rows if cols is None else cols
    return np.array([[distance(a, b) for b in cols] for a in rows])


def make_embedder(kind: str, probe: Probe, learned_file=None):
    """The embedder of ``kind`` over ``probe``; ``learned`` loads its trained network
    from ``learned_file``."""
    if kind == "handcrafted":
        from metapeft_dist.embed.handcrafted import Handcrafted

        return Handcrafted(probe)
    if kind == "task2vec":
        from metapeft_dist.embed.task2vec import Task2Vec

        return Task2Vec(probe)
    if kind == "learned":
        from metapeft_dist.embed.learned import LearnedEmbedder

        if learned_file is None:
            raise ValueError("the learned embedding needs its trained network (a file)")
        return LearnedEmbedder.load(learned_file, probe)
    raise ValueError(f"unknown embedding kind {kind!r}; one of {', '.join(KINDS)}")


__all__ = ["KINDS", "Probe", "ProbeError", "TaskSample", "distance", "distance_matrix",
           "family_samples", "make_embedder", "probe_from_job", "probe_from_model",
           "text_probe"]
