"""Choosing how to adapt a new task from its embedding (``metapeft adapt --init auto``).

Configurations (:class:`Choice`) a task can be adapted with: a finished run's
meta-learned init (``meta``; for a hypernetwork run, the adapters it generates), the
standard init of a run's PEFT configuration (``standard``: LoRA of that rank, scale and
layers with A random, B zero and a fresh head; or all weights), or tuning a fresh head
alone (``head``). Runs with different LoRA configurations of one model give different
``standard`` configurations, so choosing among them chooses the rank, scale and layers.

Two ways to choose, both explained in what they return:

* **by outcome** (:class:`OutcomePredictor`): the system records how well each
  configuration adapted past tasks (:class:`OutcomeStore`, one JSON line per task and
  configuration, with the task's embedding); a new task gets, for every configuration,
  the distance-weighted mean accuracy over its k nearest recorded tasks, and the best
  predicted configuration is chosen (Task2Vec's model selection, Achille et al. 2019,
  as nearest-neighbour regression);
* **by similarity** (:func:`choose_by_similarity`), when too few outcomes are recorded:
  among the runs the new task lies near (within a run's own radius: the 90th percentile
  of its held-out tasks' distances to its meta-train centroid), the one whose own
  held-out evaluation is best (several runs of one family: a hypernetwork and a FOMAML
  init), and its standard init instead when that evaluation found its meta-learned init
  worse than the standard one (meta-overfitting, as on fortune topics); near no run, the
  standard init, since a meta-learned init transfers poorly outside its family
  (measured: -3 to -5 points across WordNet and fortunes).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from metapeft_dist.embed import distance
from metapeft_dist.files import write_atomic

MIN_RECORDS = 20  # recorded tasks below which the predictor is not trusted
NEIGHBOURS = 7


class SelectionError(ValueError):
    """Candidates or records that cannot be used (one line)."""


def peft_name(model_spec) -> str:
    """The PEFT configuration of a model spec, as outcomes name it: ``lora-r4-s2-top1``
    (rank, scale alpha/r, adapted top layers of a text model) or ``all`` (every weight)."""
    if model_spec.train != "lora":
        return "all"
    lora = model_spec.lora
    name = f"lora-r{lora.rank}-s{lora.scale:g}"
    if model_spec.kind in ("encoder", "causal_lm"):
        name += f"-top{lora.layers}" if lora.layers is not None else "-all"
        if tuple(lora.targets) != ("query", "value"):
            name += "-" + "+".join(lora.targets)
    return name


@dataclass(frozen=True)
class Choice:
    """A configuration: ``init`` from ``run_dir``'s model (its meta-learned init, the
    standard init of its PEFT configuration ``peft``, or a fresh head alone)."""

    run_dir: str
    init: str
    peft: str = ""

    @property
    def key(self) -> str:
        """The name outcomes are recorded under: the meta init by its run's directory
        name; the standard init by its PEFT configuration; head-only as ``head``."""
        if self.init == "meta":
            return f"meta:{Path(self.run_dir).name}"
        if self.init == "standard":
            return f"standard:{self.peft}"
        return self.init


def configurations(runs: dict[str, Any]) -> dict[str, Choice]:
    """Every configuration the runs ``{run_dir: spec}`` offer: each run's meta-learned
    init, the standard init of each distinct PEFT configuration among them (from the
    first run that has it), and head-only tuning."""
    out: dict[str, Choice] = {}
    for run_dir, spec in runs.items():
        for choice in (Choice(str(run_dir), "meta"),
                       Choice(str(run_dir), "standard", peft_name(spec.model))):
            out.setdefault(choice.key, choice)
    if runs:
        out["head"] = Choice(str(next(iter(runs))), "head")
    return out


@dataclass(frozen=True)
class Outcome:
    task: str
    config: str
    accuracy: float
    embedding: np.ndarray
    kind: str
    probe: str
    shots: int
    steps: int


MAX_RECORDS = 2000  # outcome records a store keeps; appending more drops the oldest


def encode_embedding(vector: np.ndarray) -> str:
    """A float32 embedding as base64 of its little-endian bytes: 5.3 characters a number
    instead of ~20 as JSON decimals (a Task2Vec embedding of MiniLM's top layer has
    8,448 numbers: ~45 KB a record), and the value round-trips exactly."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_embedding(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4").astype(np.float64)


class OutcomeStore:
    """JSON lines of adaptation outcomes, one per (task, configuration), the embedding as
    base64 float32 (:func:`encode_embedding`; lines with a JSON list, as written before,
    are read too). At most ``max_records`` lines are kept: an append past that rewrites
    the file (atomically) without the oldest. A line that does not parse stops reading
    with its file:line, and an append then leaves the file as it is."""

    def __init__(self, path: str | Path, max_records: int = MAX_RECORDS):
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.path = Path(path).expanduser()
        self.max_records = max_records

    @staticmethod
    def _line(o: Outcome) -> str:
        return json.dumps({"task": o.task, "config": o.config, "accuracy": o.accuracy,
                           "kind": o.kind, "probe": o.probe, "shots": o.shots,
                           "steps": o.steps, "embedding_f32": encode_embedding(o.embedding),
                           "time": time.time()})

    def append(self, outcomes: Iterable[Outcome]) -> int:
        lines = [self._line(o) + "\n" for o in outcomes]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._lines()
        if len(kept) + len(lines) <= self.max_records:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(lines)
            return len(lines)
        self.read()  # refuses (and keeps) a file with a damaged line before rewriting it
        keep = (kept + lines)[-self.max_records:]
        write_atomic(self.path, "".join(keep))
        return len(lines)

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]

    def read(self, kind: str | None = None, probe: str | None = None) -> list[Outcome]:
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    embedding = (decode_embedding(row["embedding_f32"])
                                 if "embedding_f32" in row
                                 else np.asarray(row["embedding"], dtype=np.float64))
                    outcome = Outcome(str(row["task"]), str(row["config"]),
                                      float(row["accuracy"]), embedding,
                                      str(row["kind"]), str(row["probe"]), int(row["shots"]),
                                      int(row["steps"]))
                except (ValueError, KeyError, TypeError, binascii.Error) as err:
                    raise SelectionError(f"{self.path}:{number}: not an outcome record "
                                         f"({type(err).__name__}: {err})") from None
                if (kind is None or outcome.kind == kind) and \
                        (probe is None or outcome.probe == probe):
                    out.append(outcome)
        return out


class OutcomePredictor:
    """Distance-weighted k-nearest-neighbour regression of accuracy, per configuration,
    over recorded outcomes (weights 1 / (distance + 1e-3))."""

    def __init__(self, outcomes: Sequence[Outcome], neighbours: int = NEIGHBOURS):
        self.by_config: dict[str, list[Outcome]] = {}
        for o in outcomes:
            self.by_config.setdefault(o.config, []).append(o)
        self.neighbours = neighbours

    @property
    def tasks(self) -> int:
        return len({o.task for group in self.by_config.values() for o in group})

    def predict(self, embedding: np.ndarray) -> dict[str, dict[str, Any]]:
        """{config: {"accuracy": predicted, "neighbours": [(task, distance, accuracy)]}}."""
        out = {}
        for config, group in self.by_config.items():
            dists = np.array([distance(embedding, o.embedding) for o in group])
            nearest = np.argsort(dists, kind="stable")[:self.neighbours]
            weights = 1.0 / (dists[nearest] + 1e-3)
            values = np.array([group[i].accuracy for i in nearest])
            out[config] = {"accuracy": float(weights @ values / weights.sum()),
                           "neighbours": [(group[i].task, float(dists[i]), group[i].accuracy)
                                          for i in nearest]}
        return out

    def choose(self, embedding: np.ndarray, allowed: Sequence[str] | None = None
               ) -> tuple[str, str, dict[str, dict[str, Any]]]:
        """(config, why, predictions) among ``allowed`` configurations."""
        predictions = self.predict(embedding)
        if allowed is not None:
            predictions = {k: v for k, v in predictions.items() if k in allowed}
        if not predictions:
            raise SelectionError("no recorded outcomes for any of the candidate "
                                 "configurations")
        best = max(predictions, key=lambda k: predictions[k]["accuracy"])
        ranking = ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in
                            sorted(predictions.items(), key=lambda kv: -kv[1]["accuracy"]))
        why = (f"predicted from the {self.neighbours} nearest of {self.tasks} recorded tasks: "
               f"{ranking}")
        return best, why, predictions


def global_best(outcomes: Sequence[Outcome]) -> str:
    """The configuration with the highest mean recorded accuracy (the baseline a
    predictor must beat)."""
    means: dict[str, list[float]] = {}
    for o in outcomes:
        means.setdefault(o.config, []).append(o.accuracy)
    return max(means, key=lambda k: float(np.mean(means[k])))


@dataclass(frozen=True)
class Centroid:
    """Where a run's tasks lie: the mean embedding of its meta-train tasks, and the 90th
    percentile of its held-out tasks' distances to it; ``peft``: the run's PEFT
    configuration (:func:`peft_name`), whose standard init the similarity rule falls
    back to."""

    run_dir: str
    kind: str
    probe: str
    vector: np.ndarray
    radius: float
    peft: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "probe": self.probe, "radius": self.radius,
                "vector": [float(v) for v in self.vector]}


def choose_by_similarity(embedding: np.ndarray, centroids: Sequence[Centroid],
                         evaluations: dict[str, tuple[float, float]] | None = None
                         ) -> tuple[Choice, str, dict[str, float]]:
    """Among the runs whose radius holds the task, the one with the best own held-out
    accuracy (``evaluations``: run_dir -> (meta-learned init, standard init) accuracy;
    runs without one rank by distance) and its meta-learned init, or its standard init
    when its evaluation found that better; near no run, the standard init of the
    nearest run's PEFT configuration. With the reason and every distance."""
    if not centroids:
        raise SelectionError("no candidate runs to choose from")
    dists = {c.run_dir: distance(embedding, c.vector) for c in centroids}
    nearest = min(centroids, key=lambda c: dists[c.run_dir])
    evaluations = evaluations or {}
    near = [c for c in centroids if dists[c.run_dir] <= c.radius]
    if near:
        scored = [c for c in near if c.run_dir in evaluations]
        best = (max(scored, key=lambda c: evaluations[c.run_dir][0]) if scored
                else min(near, key=lambda c: dists[c.run_dir]))
        d, name = dists[best.run_dir], Path(best.run_dir).name
        why = f"run {name}'s tasks are near (distance {d:.4f} within its radius {best.radius:.4f})"
        if best.run_dir not in evaluations:
            return Choice(best.run_dir, "meta"), why, dists
        meta, standard = evaluations[best.run_dir]
        why += (f"; its own held-out evaluation: meta-learned init {100 * meta:.1f}%, "
                f"standard init {100 * standard:.1f}%")
        if len(near) > 1:
            why += f", the best of the {len(near)} runs near"
        if meta < standard:
            return (Choice(best.run_dir, "standard", best.peft),
                    why + ": the standard init", dists)
        return Choice(best.run_dir, "meta"), why, dists
    d, name = dists[nearest.run_dir], Path(nearest.run_dir).name
    return (Choice(nearest.run_dir, "standard", nearest.peft),
            f"no run's tasks are near: nearest {name} at {d:.4f}, beyond its radius "
            f"{nearest.radius:.4f}; a meta-learned init transfers poorly outside its family",
            dists)
