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

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from metapeft_dist.algorithms import make_algorithm
from metapeft_dist.config import ConfigError, JobSpec, load_spec
from metapeft_dist.job import TaskLoss
from metapeft_dist.models import build_model, is_head
from metapeft_dist.objectives import CLASSIFICATION
from metapeft_dist.runtime.checkpoint import (Checkpoint, CheckpointError, load_checkpoint,
                                              newest_good_checkpoint)
from metapeft_dist.tasks.text import read_task
from metapeft_dist.tree import Meta

TEXT_KINDS = ("encoder", "causal_lm")


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
    held_texts, held_labels = [], np.zeros(0, dtype=np.int32)
    if holdout is not None:
        held_texts, held, held_names = read_examples(holdout)
        unknown = sorted(set(held_names) - set(names))
        if unknown:
            raise AdaptError(f"{holdout} has labels the task file {data} lacks: "
                             f"{', '.join(map(str, unknown))}")
        held_labels = np.array([names.index(held_names[i]) for i in held], dtype=np.int32)
    ways = len(names)
    out_dim = ways if spec.model.kind == "causal_lm" else spec.family.ways
    if ways > out_dim:
        raise AdaptError(f"{data} has {ways} labels; the run's head has {out_dim} outputs "
                         f"(family.ways = {spec.family.ways})")
    steps = spec.eval.steps if steps is None else steps
    if steps < 0:
        raise AdaptError(f"steps must be >= 0, got {steps}")

    corpus = SimpleNamespace(corpus=SimpleNamespace(texts=tuple(texts + held_texts)))
    model = build_model(spec.model, (), out_dim, corpus)
    fresh = model.init(mx.random.key(spec.seed))
    algorithm = make_algorithm(spec)
    if start_from == "meta":
        start = _narrow(meta, ways)
    else:  # as Job.baseline builds them: the same key, so the same start as evaluation's
        standard = model.init(mx.random.key(spec.seed + 1))
        keep = (is_head if start_from == "head"
                else lambda k: k in meta["params"])  # the trainable names of the run
        start = _narrow(algorithm.init_meta({k: v for k, v in standard.items() if keep(k)}),
                        ways)
        fresh = {**fresh, **{k: v for k, v in standard.items() if not keep(k)
                             and not k.startswith("inputs.")}}
        source = f"{start_from} init of {run_dir}'s model"
    frozen = {k: v for k, v in fresh.items() if k not in start["params"]}
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

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "adapted" / Path(data).stem
    model.export(adapted, out)
    (out / "labels.json").write_text(json.dumps(
        {str(i): name for i, name in enumerate(names)}, indent=1) + "\n")
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


# --- task embeddings and --init auto ---------------------------------------------------

# Meta-train tasks averaged into a run's centroid; as many val tasks set its radius. With
# 8, the radius was the 2nd largest of 8 distances and moved by more than the gap between
# families from one draw to the next (on the text bench, 5 shots: similarity rule -0.3 or
# -1.6 points vs the global choice with two draws of 8; -0.6 ± 0.7 with 32).
CENTROID_TASKS = 32
RADIUS_QUANTILE = 90  # percentile of the held-out tasks' distances that bounds the run


def embed_file(data: str | Path, model_spec=None, kind: str = "task2vec",
               learned: str | Path | None = None) -> dict[str, Any]:
    """The embedding of the task in a JSONL file (all its lines are the support set),
    through the encoder ``model_spec`` names (default: all-MiniLM-L6-v2, top layer)."""
    from metapeft_dist.embed import TaskSample, make_embedder, text_probe

    if kind == "learned" and learned is None:
        raise AdaptError("the learned embedding needs its trained network: --learned FILE "
                         "(train one with metapeft embed --fit FILE)")
    texts, labels, names = read_examples(data)
    model_spec = model_spec or _default_encoder()
    probe = text_probe(model_spec, texts)
    embedder = make_embedder(kind, probe, learned)
    sample = TaskSample(np.arange(len(texts), dtype=np.int32), labels, tuple(texts))
    vector = embedder.embed_one(sample)
    return {"task": str(data), "kind": kind, "probe": probe.name, "labels": names,
            "examples": len(texts), "dim": int(vector.shape[0]),
            "embedding": [float(v) for v in vector]}


def _default_encoder():
    from metapeft_dist.config import from_dict

    return from_dict({"family": {"name": "wordnet"}, "algorithm": {"name": "fomaml"},
                      "model": {"kind": "encoder", "train": "lora", "lora": {"layers": 1}}}).model


def fit_learned_embedding(out: str | Path, families: Sequence[str] = ("wordnet", "fortunes"),
                          model_spec=None, steps: int = 400, ways: int = 5, shots: int = 5,
                          on_progress=None) -> dict[str, Any]:
    """Train the learned task embedding (embed/learned.py) on the meta-train categories
    of the shipped text ``families``, read through the encoder ``model_spec`` names
    (default: all-MiniLM-L6-v2, top layer), and save it to ``out``."""
    from metapeft_dist.config import from_dict
    from metapeft_dist.config.schema import to_plain
    from metapeft_dist.embed import learned, probe_from_job
    from metapeft_dist.job import build_job

    model_spec = model_spec or _default_encoder()
    sources, probe = [], None
    for name in families:
        spec = from_dict({"family": {"name": name, "ways": ways}, "algorithm": {"name": "fomaml"},
                          "model": to_plain(dataclasses.asdict(model_spec))})
        job = build_job(spec)
        probe = probe_from_job(job)
        family = job.family
        sources.append(learned.class_features(probe, [family.members[c]
                                                      for c in family.splits["train"]]))
    embedder, losses = learned.fit(probe, sources, ways, shots, names=list(families),
                                   steps=steps, on_progress=on_progress)
    path = embedder.save(out)
    return {"file": str(path), "families": list(families), "steps": steps,
            "loss": [losses[0], losses[-1]], "dim": embedder.dim, "probe": probe.name}


def probe_model(specs: Sequence[JobSpec]):
    """The model spec every task of ``specs``' runs is embedded through: their shared
    encoder's top layer (whatever layers each run adapts, so runs with different LoRA
    configurations are compared in one space)."""
    encoders = {(s.model.path, s.model.max_len) for s in specs}
    if len(encoders) != 1 or any(s.model.kind != "encoder" for s in specs):
        raise AdaptError("the candidate runs must share one encoder (model.kind encoder, "
                         "the same model.path and max_len): tasks are compared through it")
    model = specs[0].model
    return dataclasses.replace(model, lora=dataclasses.replace(model.lora, layers=1))


def probe_spec(spec: JobSpec, model) -> JobSpec:
    """``spec`` with the probe's model spec ``model``, as a plain meta-learning job (a
    hypernetwork run's tasks are sampled as any run's; no hypernetwork is built)."""
    algorithm = spec.algorithm
    if algorithm.name == "hyper":
        algorithm = dataclasses.replace(algorithm, name="fomaml", hyper=None)
    return dataclasses.replace(spec, model=model, algorithm=algorithm)


def run_centroid(run_dir: str | Path, kind: str = "task2vec", probe=None,
                 probe_name: str | None = None, shots: int | None = None):
    """Where a text run's tasks lie (:class:`metapeft_dist.selection.Centroid`), cached
    in ``RUN_DIR/task-embedding-<kind>-<shots>shot.json``: the mean embedding of its
    first ``CENTROID_TASKS`` meta-train tasks and the ``RADIUS_QUANTILE``th percentile of
    its meta-validation tasks' distances to it, through the model spec ``probe``
    (default: :func:`probe_model` of the run), their support sets drawn at ``shots``
    examples per class (default: the run's own). Compare a task with the centroid of its
    own shot count: an embedding of fewer examples lies farther from any centroid (at 1
    shot, outside the 5-shot radius of its own family). A cache of another probe than
    ``probe_name`` is computed again."""
    from metapeft_dist.embed import distance, family_samples, make_embedder, probe_from_job
    from metapeft_dist.job import build_job
    from metapeft_dist.selection import Centroid, peft_name

    run_dir = Path(run_dir)
    spec = run_spec(run_dir)
    peft = peft_name(spec.model)
    shots = shots or spec.family.shots
    cache = run_dir / f"task-embedding-{kind}-{shots}shot.json"
    try:
        saved = json.loads(cache.read_text())
        if probe_name is None or saved["probe"] == probe_name:
            return Centroid(str(run_dir), saved["kind"], saved["probe"],
                            np.asarray(saved["vector"]), float(saved["radius"]), peft)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: computed again below
    job = build_job(probe_spec(spec, probe if probe is not None else probe_model([spec])))
    probe = probe_from_job(job)
    embedder = make_embedder(kind, probe)
    train = embedder.embed(family_samples(job, "train", 0, CENTROID_TASKS, shots))
    held = embedder.embed(family_samples(job, "val", 0, CENTROID_TASKS, shots))
    vector = train.mean(axis=0)
    radius = float(np.percentile([distance(v, vector) for v in held], RADIUS_QUANTILE))
    centroid = Centroid(str(run_dir), kind, probe.name, vector, radius, peft)
    cache.write_text(json.dumps(centroid.to_dict()) + "\n")
    return centroid


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


def adapt_hyper(candidates: Sequence[str | Path], data: str | Path,
                out_dir: str | Path | None = None, steps: int | None = None,
                holdout: str | Path | None = None) -> dict[str, Any]:
    """``metapeft adapt --init hyper``: the task's adapters and head generated by the
    hypernetwork run among ``candidates`` (algorithm.name hyper), then ``steps`` steps."""
    hyper = [c for c in candidates if run_spec(c).algorithm.name == "hyper"]
    if len(hyper) != 1:
        raise AdaptError(f"--init hyper needs exactly one hypernetwork run (algorithm.name "
                         f"hyper) among the --candidate runs; found {len(hyper)}")
    report = adapt_task(hyper[0], data, out_dir, steps, holdout)
    report["selection"] = {"method": "hyper", "chosen": f"meta:{Path(hyper[0]).name}",
                           "run_dir": str(hyper[0]), "init": "meta",
                           "why": f"generated from the task's {report['examples']} examples by "
                                  f"the hypernetwork of {Path(hyper[0]).name}"}
    return report


def adapt_auto(candidates: Sequence[str | Path], data: str | Path,
               out_dir: str | Path | None = None, steps: int | None = None,
               holdout: str | Path | None = None, outcomes: str | Path | None = None,
               kind: str = "task2vec") -> dict[str, Any]:
    """``metapeft adapt --init auto``: embed the task, choose among the configurations
    the candidate runs offer (each run's meta-learned init or hypernetwork, the standard
    init of each of their LoRA configurations, head-only tuning; by recorded outcomes
    when ``outcomes`` holds enough for this embedding, else by similarity), adapt from
    the choice, and say what was chosen and why. With ``holdout`` and ``outcomes`` the
    result is recorded, so later choices learn from it. Tasks are embedded through the
    candidates' shared encoder's top layer (:func:`probe_model`)."""
    from metapeft_dist.selection import (MIN_RECORDS, Outcome, OutcomePredictor,
                                         OutcomeStore, SelectionError, choose_by_similarity,
                                         configurations)

    if not candidates:
        raise AdaptError("--init auto needs candidate runs (--candidate RUN_DIR)")
    specs = {str(c): run_spec(c) for c in candidates}
    if len(specs) != len(candidates):
        raise AdaptError("a --candidate run is given twice")
    names = [Path(c).name for c in specs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise AdaptError(f"two --candidate runs share the directory name {twice[0]}: "
                         "outcomes name a run's meta-learned init by it")
    if any(s.model.kind != "encoder" for s in specs.values()):
        raise AdaptError("--init auto chooses among encoder runs (task embeddings need a "
                         "classification head)")
    probe = probe_model(list(specs.values()))
    task = embed_file(data, probe, kind)
    embedding = np.asarray(task["embedding"])
    shots = max(1, round(task["examples"] / len(task["labels"])))
    centroids = [run_centroid(c, kind, probe, task["probe"], shots) for c in specs]
    store = OutcomeStore(outcomes) if outcomes else None
    choices = configurations(specs)
    try:
        predictor = OutcomePredictor(store.read(kind, task["probe"]) if store else [])
        if predictor.tasks >= MIN_RECORDS:
            key, why, predictions = predictor.choose(embedding, list(choices))
            choice, method, detail = choices[key], "outcomes", predictions
        else:
            evaluations = {c: e for c in specs if (e := run_evaluation(c, shots)) is not None}
            choice, why, detail = choose_by_similarity(embedding, centroids, evaluations)
            method = "similarity"
            if store is not None:
                why += f" ({predictor.tasks} recorded tasks; the predictor needs {MIN_RECORDS})"
    except SelectionError as err:
        raise AdaptError(str(err)) from None
    report = adapt_task(choice.run_dir, data, out_dir, steps, holdout, choice.init)
    report["selection"] = {"method": method, "chosen": choice.key, "run_dir": choice.run_dir,
                           "init": choice.init, "why": why, "kind": kind,
                           "detail": detail if method == "similarity" else
                           {k: v["accuracy"] for k, v in detail.items()}}
    if store is not None and holdout is not None:
        store.append([Outcome(str(data), choice.key, report["holdout_accuracy"][1], embedding,
                              kind, task["probe"], int(report["examples"]), report["steps"])])
        report["selection"]["recorded"] = str(store.path)
    return report


def retarget(spec: JobSpec, family: str | None = None, data: str | Path | None = None,
             overrides: Sequence[str] = ()) -> JobSpec:
    """``spec`` on another family (``family``, or ``data``: a directory of JSONL tasks)
    with ``overrides`` (``eval.tasks=100`` ...) applied; its heads keep their size."""
    from metapeft_dist.config import from_dict
    from metapeft_dist.config.loader import _apply_override

    if family is not None and data is not None:
        raise AdaptError("give --family or --data, not both")
    plain = spec.to_dict()
    if family is not None or data is not None:
        plain["family"] = {**plain["family"], "name": "jsonl" if data else family,
                           "path": str(data) if data else None}
    errors: list[tuple[str, str]] = []
    for item in overrides:
        _apply_override(plain, item, errors)
    if errors:
        raise ConfigError(errors)
    target = from_dict(plain)
    if target.family.ways != spec.family.ways:
        raise AdaptError(f"the init has {spec.family.ways} outputs; family.ways must stay "
                         f"{spec.family.ways}")
    return target


def evaluate_init(run_dir: str | Path, family: str | None = None, data: str | None = None,
                  overrides: Sequence[str] = (), on_progress=None) -> dict[str, Any]:
    """The run's meta-learned init against its baselines on the meta-test tasks of
    ``family`` (another text family: the cross-domain test), of ``data`` (a directory of
    your JSONL tasks; its meta-test files), or of the run's own family. ``overrides``
    (``eval.tasks=100``, ``eval.shots=[1,5]`` ...) apply to the run's spec. Returns a
    results-shaped dict (``evaluation`` as in results.json)."""
    from metapeft_dist.job import build_job
    from metapeft_dist.runner import evaluate_job

    spec, meta, source = load_init(run_dir)
    target = retarget(spec, family, data, overrides)
    job = build_job(target)
    progress = on_progress or (lambda *args: None)
    started = time.perf_counter()
    evaluation = evaluate_job(job, _narrow(meta, target.family.ways), progress)
    return {"job": f"{spec.name} on {target.family.name}", "run_dir": str(run_dir),
            "init": source, "spec": target.to_dict(), "evaluation": evaluation,
            "meta_training": {}, "seconds": time.perf_counter() - started}


def _narrow(meta: Meta, ways: int) -> Meta:
    """The init with its head cut to the task's ``ways`` outputs (rows of head.w and
    head.b, in every group of the meta-parameters, e.g. Meta-SGD's learning rates)."""
    def cut(name: str, value: mx.array) -> mx.array:
        return value[:ways] if is_head(name) else value

    return {group: {k: cut(k, v) for k, v in tree.items()} if isinstance(tree, dict) else tree
            for group, tree in meta.items()}


__all__ = ["AdaptError", "ConfigError", "adapt_task", "load_init", "load_run",
           "read_examples", "run_spec"]
