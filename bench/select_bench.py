"""`make bench` section `select` (RQ2): does a task's embedding pick the configuration
that adapts it best?

Configurations: the meta-learned inits of a WordNet run and a fortunes run, the
standard LoRA init (A random, B zero, fresh head) and head-only tuning; each adapted
``STEPS`` steps at ``SHOTS`` shots, scored on ``QUERY`` query examples per class.
Outcomes are recorded on meta-validation tasks of both families (the predictor's
training data) and measured on meta-test tasks of both (held-out categories). Reported,
with 95% CIs:

  - how often the predictor's pick is the best configuration for the task, or within 1
    point of it (the seed's RQ2 hypothesis: >= 90%), against always choosing the single
    best configuration on the recorded tasks (the global choice);
  - mean accuracy of the predictor's pick, the similarity rule's pick (``--init auto``
    without records) and the global meta-learned init, paired on the same tasks.

    python bench/select_bench.py WORDNET_RUN FORTUNES_RUN [TASKS]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metapeft_dist  # noqa: E402,F401  (loads OpenBLAS before mlx)
import numpy as np  # noqa: E402

SHOTS = 5
QUERY = 15
STEPS = 10
STREAM = 100  # task streams no other evaluation uses
KIND = "task2vec"


def outcomes_for(runs: dict[str, str], family: str, split: str, tasks: int) -> dict:
    """Per task of ``family``'s ``split``: the Task2Vec embedding and every
    configuration's query accuracy after ``STEPS`` steps."""
    from metapeft_dist.adapt import _narrow, load_init
    from metapeft_dist.config import from_dict
    from metapeft_dist.embed import family_samples, make_embedder, probe_from_job
    from metapeft_dist.evaluate import Evaluator
    from metapeft_dist.job import Init, build_job

    first = next(iter(runs.values()))
    spec = load_init(first)[0].to_dict()
    spec["family"] = {**spec["family"], "name": family, "path": None}
    spec["eval"] = {**spec["eval"], "steps": STEPS}
    job = build_job(from_dict(spec))
    evaluator = Evaluator(job, STEPS)
    inits = {f"meta:{Path(r).name}": Init("meta", _narrow(load_init(r)[1], job.spec.family.ways),
                                          job.frozen) for r in runs.values()}
    inits["standard"] = job.baseline("random")
    inits["head"] = job.baseline("head")
    accuracy = {}
    for name, init in inits.items():
        t0 = time.time()
        curves = evaluator.curves(init, split, SHOTS, tasks, STREAM, 20, QUERY)
        accuracy[name] = curves[:, -1].tolist()
        print(f"  {family}/{split} {name}: {100 * np.mean(accuracy[name]):.1f}% "
              f"({time.time() - t0:.0f} s)", flush=True)
    t0 = time.time()
    probe = probe_from_job(job)
    embedder = make_embedder(KIND, probe)
    samples = family_samples(job, split, STREAM, tasks, SHOTS)
    embeddings = embedder.embed(samples)
    print(f"  {family}/{split}: {tasks} embeddings ({time.time() - t0:.0f} s)", flush=True)
    return {"embeddings": embeddings, "accuracy": accuracy, "probe": probe.name,
            "tasks": [f"{family}/{split}/{i}" for i in range(tasks)]}


def bench_select(wordnet_run: str, fortunes_run: str, tasks: int = 40) -> dict:
    from metapeft_dist.adapt import run_centroid
    from metapeft_dist.evaluate import mean_ci95
    from metapeft_dist.selection import (Outcome, OutcomePredictor, choose_by_similarity,
                                         global_best)

    runs = {"wordnet": wordnet_run, "fortunes": fortunes_run}
    data = {(f, s): outcomes_for(runs, f, s, tasks) for f in runs for s in ("val", "test")}
    records = [Outcome(d["tasks"][i], config, acc[i], d["embeddings"][i], KIND, d["probe"],
                       SHOTS, STEPS)
               for (f, s), d in data.items() if s == "val"
               for config, acc in d["accuracy"].items() for i in range(tasks)]
    predictor = OutcomePredictor(records)
    best_global = global_best(records)
    centroids = [run_centroid(r, KIND) for r in runs.values()]
    key_of = {r: f"meta:{Path(r).name}" for r in runs.values()}

    rows = {"predictor": [], "similarity": [], "global": [], "oracle": [],
            "meta:" + Path(wordnet_run).name: []}
    hits_predictor, hits_global, picks = [], [], {}
    for family in runs:
        d = data[(family, "test")]
        for i in range(tasks):
            scores = {c: acc[i] for c, acc in d["accuracy"].items()}
            best = max(scores.values())
            pick, _, _ = predictor.choose(d["embeddings"][i])
            choice, _, _ = choose_by_similarity(d["embeddings"][i], centroids)
            similar = key_of[choice.run_dir] if choice.init == "meta" else "standard"
            picks.setdefault(family, []).append(pick)
            rows["predictor"].append(scores[pick])
            rows["similarity"].append(scores[similar])
            rows["global"].append(scores[best_global])
            rows["oracle"].append(best)
            rows["meta:" + Path(wordnet_run).name].append(scores["meta:" + Path(wordnet_run).name])
            hits_predictor.append(scores[pick] >= best - 0.01)
            hits_global.append(scores[best_global] >= best - 0.01)
    out: dict = {"tasks_per_family": tasks, "shots": SHOTS, "query": QUERY, "steps": STEPS,
                 "global_best": best_global}
    for name, values in (("predictor_within_1pt", hits_predictor),
                         ("global_within_1pt", hits_global)):
        mean, ci = mean_ci95(np.array(values, dtype=float))
        out[name] = [float(mean), float(ci)]
        print(f"  {name}: {100 * mean:.1f}% ± {100 * ci:.1f}", flush=True)
    base = np.array(rows["meta:" + Path(wordnet_run).name])
    for name, values in rows.items():
        v = np.array(values)
        mean, ci = mean_ci95(v)
        gain, gain_ci = mean_ci95(v - base)
        out[name] = {"accuracy": [float(mean), float(ci)],
                     "gain_over_wordnet_meta": [float(gain), float(gain_ci)]}
        print(f"  {name:<22} {100 * mean:5.1f}% ± {100 * ci:.1f}   vs the WordNet meta init "
              f"{100 * gain:+5.1f} ± {100 * gain_ci:.1f}", flush=True)
    for family, chosen in picks.items():
        counts = {c: chosen.count(c) for c in sorted(set(chosen))}
        out[f"picks_{family}"] = counts
        print(f"  predictor's picks on {family} test tasks: {counts}", flush=True)
    out["mean_by_config"] = {f"{f}/{s}": {c: float(np.mean(a)) for c, a in d["accuracy"].items()}
                             for (f, s), d in data.items()}
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    result = bench_select(sys.argv[1], sys.argv[2], n)
    print(json.dumps(result, indent=1))
