"""What an evaluation computes, cut into pieces a scorer (evaluate.py) or a Ray worker
(runtime/evaluation.py) computes: a :class:`Sweep` says which tasks and what is scored,
a :data:`Piece` is one chunk of its tasks for one init at one shot count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metapeft_dist.config.schema import JobSpec
from metapeft_dist.job import Init

VAL_STREAM = 0  # meta-validation always uses the same tasks


@dataclass(frozen=True)
class Sweep:
    """Which tasks a piece draws and what it scores: tasks of ``split`` and ``stream``
    (None: the shot count, as the final evaluation's) with ``query`` examples per class
    (None: the family's), adapted ``steps`` steps; the metric after every step, or with
    ``final_only`` after the last alone; with ``with_loss`` also the query loss after
    the last. ``on`` "query" scores the query set; "support-cv" and "support-fit" score
    the task's own support set (evaluate.on_support: what a user can measure without a
    query set)."""

    split: str
    stream: int | None
    steps: int
    query: int | None = None
    final_only: bool = False
    with_loss: bool = False
    on: str = "query"


ON_SUPPORT = ("support-cv", "support-fit")


def named_sweep(spec: JobSpec, name: str) -> Sweep:
    """The job's two sweeps: "test", the final evaluation (meta-test tasks, stream = the
    shot count, the metric after each of eval.steps steps), and "val", meta-validation
    (meta-val tasks of stream VAL_STREAM, the metric after each of inner.steps steps and
    the query loss after the last)."""
    if name == "test":
        return Sweep("test", None, spec.eval.steps, spec.eval.query)
    if name == "val":
        return Sweep("val", VAL_STREAM, spec.inner.steps, with_loss=True)
    raise ValueError(f"unknown evaluation sweep {name!r} (test, val or a Sweep)")


# A piece of an evaluation: (init name, shot count, first task, tasks, sweep), one
# ``eval.chunk`` of the tasks at that shot count; the unit a scorer computes and, on the
# Ray runtime, a worker (runtime/evaluation.py). Its curves are the same bits wherever
# it is computed on one kind of machine: the same tasks, the same shapes. The sweep is
# "test" or "val" (:func:`named_sweep`: the final evaluation at each shot count,
# meta-validation at family.shots) or any other :class:`Sweep` (the selection bench's).
Piece = tuple[str, int, int, int, str | Sweep]


def pieces(spec: JobSpec, inits: list[Init], sweep: str = "test") -> list[Piece]:
    """Every piece of a final evaluation (or of a meta-validation), in the order their
    curves are assembled."""
    if sweep == "test":
        tasks, shot_counts = spec.eval.tasks, spec.eval.shots
    else:
        tasks, shot_counts = spec.eval.val_tasks, (spec.family.shots,)
    return [piece for shots in shot_counts for init in inits
            for piece in chunks(init.name, shots, tasks, spec.eval.chunk, sweep)]


def chunks(name: str, shots: int, tasks: int, chunk: int, sweep: str | Sweep) -> list[Piece]:
    """The pieces of ``tasks`` tasks of one init at one shot count, ``chunk`` at a time."""
    return [(name, shots, start, min(chunk, tasks - start), sweep)
            for start in range(0, tasks, chunk)]


def assemble(curves: dict[Piece, np.ndarray], todo: list[Piece], name: str,
             shots: int) -> np.ndarray:
    """One init's curves at one shot count, in task order, from its pieces."""
    return np.concatenate([curves[p] for p in todo if p[0] == name and p[1] == shots])
