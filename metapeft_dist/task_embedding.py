"""Tasks as vectors (``metapeft embed``): the embedding of a JSONL task file through an
encoder's top layer, the training of the learned task embedding (embed/learned.py) on
the shipped text families, and the encoder a set of runs' tasks are compared through.
The embeddings themselves are embed/'s; a run's tasks as a whole are centroids.py's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metapeft_dist.adapt import read_examples
from metapeft_dist.config import JobSpec
from metapeft_dist.rundir import AdaptError


def embed_file(data: str | Path, model_spec=None, kind: str = "task2vec",
               learned: str | Path | None = None) -> dict[str, Any]:
    """The embedding of the task in a JSONL file (all its lines are the support set),
    through the encoder ``model_spec`` names (default: all-MiniLM-L6-v2, top layer)."""
    from metapeft_dist.embed import TaskSample, make_embedder, text_probe

    if kind == "learned" and learned is None:
        raise AdaptError("the learned embedding needs its trained network: --learned FILE "
                         "(train one with metapeft embed --fit FILE)")
    texts, labels, names = read_examples(data)
    model_spec = model_spec or default_encoder()
    probe = text_probe(model_spec, texts)
    embedder = make_embedder(kind, probe, learned)
    sample = TaskSample(np.arange(len(texts), dtype=np.int32), labels, tuple(texts))
    vector = embedder.embed_one(sample)
    return {"task": str(data), "kind": kind, "probe": probe.name, "labels": names,
            "examples": len(texts), "dim": int(vector.shape[0]),
            "embedding": [float(v) for v in vector]}


def fit_learned_embedding(out: str | Path, families: Sequence[str] = ("wordnet", "fortunes"),
                          model_spec=None, steps: int = 400, ways: int = 5, shots: int = 5,
                          on_progress=None) -> dict[str, Any]:
    """Train the learned task embedding (embed/learned.py) on the meta-train categories
    of the shipped text ``families``, read through the encoder ``model_spec`` names
    (default: all-MiniLM-L6-v2, top layer), and save it to ``out``."""
    from metapeft_dist.config import from_dict
    from metapeft_dist.config.schema import to_plain
    from metapeft_dist.embed import ProbeError, learned, probe_from_job
    from metapeft_dist.job import build_job

    if Path(out).is_dir():  # found now, not after the training
        raise ProbeError(f"cannot save the learned embedding as {out}: it is a directory")
    model_spec = model_spec or default_encoder()
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


def default_encoder():
    """The model spec a task is embedded through unless a run names one: all-MiniLM-L6-v2's
    encoder, its top layer."""
    from metapeft_dist.config import from_dict

    return from_dict({"family": {"name": "wordnet"}, "algorithm": {"name": "fomaml"},
                      "model": {"kind": "encoder", "train": "lora", "lora": {"layers": 1}}}).model


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
