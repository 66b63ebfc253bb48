"""Where a text run's tasks lie in task-embedding space: the centroid of its meta-train
tasks and the radius of its meta-validation tasks around it (``--init auto`` compares a
new task with each candidate run's), cached in the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metapeft_dist.rundir import run_spec
from metapeft_dist.task_embedding import probe_model, probe_spec

# Meta-train tasks averaged into a run's centroid; as many val tasks set its radius. With
# 8, the radius was the 2nd largest of 8 distances and moved by more than the gap between
# families from one draw to the next (on the text bench, 5 shots: similarity rule -0.3 or
# -1.6 points vs the global choice with two draws of 8; -0.6 ± 0.7 with 32).
CENTROID_TASKS = 32
RADIUS_QUANTILE = 90  # percentile of the held-out tasks' distances that bounds the run


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
