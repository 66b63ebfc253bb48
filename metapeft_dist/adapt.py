"""A new task from a finished text run's meta-learned init (``metapeft adapt``): read
the task's few labelled examples (a JSONL file, lines ``{"text": ..., "label": ...}``),
adapt the init with the run's own inner loop, write the adapted adapter, and, given
held-out examples of the same task, say how well it does before and after.

The adapter is written as the run's model exports it: a causal LM's in mlx-lm's format
(adapters.safetensors + adapter_config.json, for ``mlx_lm.load(base,
adapter_path=...)``, ``mlx_lm.generate --adapter-path`` and ``mlx_lm.lora
--resume-adapter-file``); the encoder's as adapters.safetensors (adapters and head) with
its own adapter_config.json. ``labels.json`` maps output index to label (a causal LM
answers with the letter of that index).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np

from metapeft_dist.algorithms import make_algorithm
from metapeft_dist.files import failure_reason
from metapeft_dist.job import TaskLoss
from metapeft_dist.models import build_model, is_head
from metapeft_dist.objectives import CLASSIFICATION
from metapeft_dist.rundir import AdaptError, load_init, narrow
from metapeft_dist.tasks.text import read_task
from metapeft_dist.tree import Meta, Params


def read_examples(file: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, int labels, label names) of one JSONL task file; a bad line is one
    ConfigError naming file:line."""
    file = Path(file)
    if not file.is_file():
        raise AdaptError(f"task file not found: {file}")
    texts: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    read_task(file.name, file.read_bytes(), str(file), texts, labels, names)
    return texts, np.array(labels, dtype=np.int32), [n.split(":", 1)[1] for n in names]


def _read_holdout(holdout: str | Path | None, data: str | Path,
                  names: list) -> tuple[list[str], np.ndarray]:
    """The held-out examples' texts and labels (as indices into the task's ``names``)."""
    if holdout is None:
        return [], np.zeros(0, dtype=np.int32)
    held_texts, held, held_names = read_examples(holdout)
    unknown = sorted(set(held_names) - set(names))
    if unknown:
        raise AdaptError(f"{holdout} has labels the task file {data} lacks: "
                         f"{', '.join(map(str, unknown))}")
    return held_texts, np.array([names.index(held_names[i]) for i in held], dtype=np.int32)


def _starting_point(spec, model, algorithm, meta: Meta, start_from: str,
                    ways: int) -> tuple[Meta, Params]:
    """(meta-parameters to adapt from, the frozen rest) for ``start_from``."""
    fresh = model.init(mx.random.key(spec.seed))
    if start_from == "meta":
        start = narrow(meta, ways)
    else:  # as Job.baseline builds them: the same key, so the same start as evaluation's
        standard = model.init(mx.random.key(spec.seed + 1))
        keep = (is_head if start_from == "head"
                else lambda k: k in meta["params"])  # the trainable names of the run
        start = narrow(algorithm.init_meta({k: v for k, v in standard.items() if keep(k)}),
                       ways)
        fresh = {**fresh, **{k: v for k, v in standard.items() if not keep(k)
                             and not k.startswith("inputs.")}}
    return start, {k: v for k, v in fresh.items() if k not in start["params"]}


def adapt_task(run_dir: str | Path, data: str | Path, out_dir: str | Path | None = None,
               steps: int | None = None, holdout: str | Path | None = None,
               start_from: str = "meta") -> dict[str, Any]:
    """Adapt the run's init to the task in ``data`` for ``steps`` steps (default: the
    run's ``eval.steps``), write the adapter to ``out_dir`` (default
    ``RUN_DIR/adapted/<task file stem>``) and return what happened. ``start_from``:
    the run's meta-learned init (``meta``), the standard LoRA init of its model
    (``standard``: A random, B zero, fresh head) or its fresh head alone (``head``)."""
    if start_from not in ("meta", "standard", "head"):
        raise AdaptError(f"start_from must be meta, standard or head, got {start_from!r}")
    spec, meta, source = load_init(run_dir)
    texts, labels, names = read_examples(data)
    held_texts, held_labels = _read_holdout(holdout, data, names)
    ways = len(names)
    out_dim = ways if spec.model.kind == "causal_lm" else spec.family.ways
    if ways > out_dim:
        raise AdaptError(f"{data} has {ways} labels; the run's head has {out_dim} outputs "
                         f"(family.ways = {spec.family.ways})")
    steps = spec.eval.steps if steps is None else steps
    if steps < 0:
        raise AdaptError(f"steps must be >= 0, got {steps}")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "adapted" / Path(data).stem
    if out.exists() and not out.is_dir():
        raise AdaptError(f"cannot write the adapter to {out}: it is a file")

    corpus = SimpleNamespace(corpus=SimpleNamespace(texts=tuple(texts + held_texts)))
    model = build_model(spec.model, (), out_dim, corpus)
    algorithm = make_algorithm(spec)
    start, frozen = _starting_point(spec, model, algorithm, meta, start_from, ways)
    if start_from != "meta":
        source = f"{start_from} init of {run_dir}'s model"
    loss_fn = TaskLoss(model, frozen, CLASSIFICATION.loss, ways)

    support_x = mx.arange(len(texts))
    support_y = mx.array(labels)
    started = time.perf_counter()
    trajectory = algorithm.adapt(start, loss_fn, support_x, support_y, steps)
    # The adaptation's start: the init itself, or what the hypernetwork generated for
    # this support set (algorithm.name hyper).
    initial, adapted = trajectory[0], trajectory[-1]
    mx.eval(adapted)
    seconds = time.perf_counter() - started

    def accuracy(params, x, y) -> float:
        logits = model({**frozen, **params}, x)[..., :ways]
        return float(CLASSIFICATION.metric(logits, y))

    try:
        model.export(adapted, out)
        (out / "labels.json").write_text(json.dumps(
            {str(i): name for i, name in enumerate(names)}, indent=1) + "\n")
    except (OSError, RuntimeError) as err:  # a full disk, a folder not writable
        raise AdaptError(f"cannot write the adapter to {out}: {failure_reason(err)}") \
            from None
    report: dict[str, Any] = {
        "run_dir": str(run_dir), "init": source, "start_from": start_from,
        "task": str(data), "labels": names,
        "examples": len(texts), "steps": steps, "seconds": seconds, "adapter": str(out),
        "generated": "hyper" in start,
        "support_loss": [float(loss_fn(initial, support_x, support_y)),
                         float(loss_fn(adapted, support_x, support_y))],
        "support_accuracy": [accuracy(initial, support_x, support_y),
                             accuracy(adapted, support_x, support_y)],
    }
    if holdout is not None:
        held_x = mx.arange(len(texts), len(texts) + len(held_texts))
        held_y = mx.array(held_labels)
        report["holdout"] = str(holdout)
        report["holdout_accuracy"] = [accuracy(initial, held_x, held_y),
                                      accuracy(adapted, held_x, held_y)]
    return report
