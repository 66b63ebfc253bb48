"""Reading a finished run's directory: its spec (``spec.yaml``), the checkpoint its
results select (``results.json``, else the newest good one in ``checkpoints/``; the
format is runtime/checkpoint.py's) and its own evaluation. Building a job (a
hypernetwork's base adapters), adapting a new task and evaluating an init elsewhere all
start here.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from metapeft_dist.config import JobSpec, load_spec
from metapeft_dist.models import is_head
from metapeft_dist.runtime.checkpoint import (Checkpoint, CheckpointError, load_checkpoint,
                                              newest_good_checkpoint)
from metapeft_dist.tree import Meta

TEXT_KINDS = ("encoder", "causal_lm")


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked (already holds a run, nothing to resume,
    a damaged history)."""


class AdaptError(ValueError):
    """The run or the task cannot be adapted: one line (exit status 2)."""


def run_spec(run_dir: str | Path, text: bool = True) -> JobSpec:
    """The spec of a run (``text``: a text run; no checkpoint is read)."""
    run_dir = Path(run_dir)
    if not (run_dir / "spec.yaml").is_file():
        raise AdaptError(f"{run_dir} is not a run directory (no spec.yaml)")
    spec = load_spec(run_dir / "spec.yaml")
    if text and spec.model.kind not in TEXT_KINDS:
        raise AdaptError(f"{run_dir} is a {spec.model.kind} run; adapt works on text runs "
                         "(model.kind encoder or causal_lm)")
    return spec


def load_init(run_dir: str | Path, text: bool = True) -> tuple[JobSpec, Meta, str]:
    """The run's spec, its selected meta-learned init (results.json names it; without
    results, the newest good checkpoint) and where it came from."""
    spec, checkpoint = load_run(run_dir, text)
    return spec, checkpoint.meta, checkpoint.path


def load_run(run_dir: str | Path, text: bool = True) -> tuple[JobSpec, Checkpoint]:
    """The run's spec and its selected checkpoint (``frozen`` holds the base of an MLP
    or conv run, pretrained in that run; text runs keep none)."""
    spec = run_spec(run_dir, text)
    run_dir = Path(run_dir)
    path = None
    try:
        results = json.loads((run_dir / "results.json").read_text())
        path = results["meta_training"]["selected_checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        if path is None or not Path(path).is_file():
            checkpoint = newest_good_checkpoint(run_dir / "checkpoints")
        else:
            checkpoint = load_checkpoint(path)
    except CheckpointError as err:
        raise AdaptError(str(err)) from None
    if checkpoint is None:
        raise AdaptError(f"{run_dir / 'checkpoints'} holds no usable checkpoint")
    return spec, checkpoint


def run_evaluation(run_dir: str | Path, shots: int) -> tuple[float, float] | None:
    """(meta-learned init, standard init) accuracy after the run's own evaluation steps
    on its meta-test tasks, at the evaluated shot count nearest ``shots``; None without
    a results.json that has both."""
    try:
        evaluation = json.loads((Path(run_dir) / "results.json").read_text())["evaluation"]
        nearest = min(evaluation["shots"], key=lambda s: (abs(int(s) - shots), int(s)))
        inits = evaluation["shots"][nearest]["inits"]
        return float(inits["meta"]["mean"][-1]), float(inits["random"]["mean"][-1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def narrow(meta: Meta, ways: int) -> Meta:
    """The init with its head cut to the task's ``ways`` outputs (rows of head.w and
    head.b, in every group of the meta-parameters, e.g. Meta-SGD's learning rates)."""
    def cut(name: str, value: mx.array) -> mx.array:
        return value[:ways] if is_head(name) else value

    return {group: {k: cut(k, v) for k, v in tree.items()} if isinstance(tree, dict) else tree
            for group, tree in meta.items()}
