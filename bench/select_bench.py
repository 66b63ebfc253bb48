"""`make bench` section `select` (RQ2): does a task's embedding pick the configuration
that adapts it best?

Configurations (metapeft_dist.selection.configurations): every run's meta-learned init
(a hypernetwork run's: the adapters it generates), the standard init of every distinct
PEFT configuration among the runs (LoRA rank, scale and layers; ``all`` weights for a
digits run), head-only tuning, and, on digits, fine-tuning every weight from the
pretrained base. A job spec file (.yaml) among the runs adds its PEFT configuration's
standard init only (a LoRA rank or layer count no run was meta-trained with). Each
configuration is adapted ``STEPS`` steps at ``--shots`` shots (default 5) and scored on
``--query`` examples per class (default 15), on the same tasks.

Outcomes are recorded on meta-validation tasks of every family (the predictor's training
data) and measured on meta-test tasks (held-out categories). Tasks are embedded with
Task2Vec through one probe (the text runs' shared encoder's top layer; the digits MLP
pretrained on the meta-train digits). Reported, with 95% CIs:

  - how often the predictor's pick is the best configuration for the task, or within 1
    point of it (the seed's RQ2 hypothesis: >= 90%), against always choosing the single
    best configuration on the recorded tasks (the global choice);
  - the same for the predictor given records of the test tasks' own distribution
    (``predictor_cv``: 5-fold over the test tasks, a task never among its records), so a
    miss is not the shift from meta-validation to meta-test categories;
  - with ``--support-cv``, two rules that need no records, each choosing between the
    global choice and its rival (below): the one with the better leave-one-shot-out
    accuracy on the task's own support set (``support_cv``; shots x the adaptations;
    not at 1 shot), and the one that fits the support set better, its accuracy on the
    support set after the STEPS steps (``support_fit``; on digits the best-correlated of
    the support-set landmarks tried, r ~0.8 with the per-task difference);
  - mean accuracy of the predictor's pick, the similarity rule's pick (``--init auto``
    without records; text runs only) and the global choice, paired on the same tasks;
  - the noise ceiling of the first figure: a task's accuracies are measured on
    ways x query examples (at 15 per class, 75: one example is 1.3 points), so even a
    predictor that knew each configuration's expected accuracy would miss the measured
    best by more than a point on some tasks. Estimated by taking the measured accuracies
    as the truth, redrawing each as binomial(n, p) / n (200 draws), and counting how
    often the truly best configuration is within 1 point of the redrawn best. A larger
    ``--query`` raises it (the largest a family allows: its smallest val or test class
    less the shots; 169 on digits, 46 on wordnet and fortunes); a task's support set is the
    same whatever the query size.
  - whether the tasks where the global choice loses are real or the query draw: the
    split-half reliability (``split_half``) of the per-task difference between the
    global choice and the configuration that beats it most often. Near 1, a second query
    set would crown the same winners, so the misses are the predictor's to fix.

The adaptations run where each run's job runs, as ``metapeft eval``'s: on the Ray
workers of the job (sweeps.Sweep pieces of 20 tasks through runtime/evaluation.py, as a
run's evaluation: an embedded local Ray, or the cluster at ``--address``), or in this
process for ``runtime.mode: local`` or with ``--local``; the same numbers either way.
Task2Vec's embeddings are computed here. Per-task accuracies are kept in CACHE (default
.bench/select-cache/), so adding a run re-measures only its configurations.

    python bench/select_bench.py [--tasks N] [--query Q] [--shots K] [--cache DIR]
                                 [--support-cv] [--address HOST:PORT | --local]
                                 FAMILIES RUN_OR_SPEC...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
# Cache entries name the task draws: 2 since a task's support set stopped depending on
# its query size (tasks.base.distinct); before, embeddings and scores drawn with different
# query sizes described different support sets.
DRAWS = 2
FOLDS = 5  # predictor_cv: records from the other folds of the test tasks
PIECE = 20  # tasks adapted at once (the cached scores were computed in pieces of 20)


def _sources(paths: list[str]) -> dict[str, tuple[object, object]]:
    """{path: (spec, checkpoint or None)} for run directories and job spec files."""
    from metapeft_dist.rundir import load_run
    from metapeft_dist.config import load_spec

    out = {}
    for path in paths:
        if Path(path).is_file():
            out[path] = (load_spec(path), None)
        else:
            out[path] = load_run(path, text=False)
    return out


def _configurations(sources) -> dict:
    """{key: (source path, init)}: metapeft_dist.selection.configurations of the runs,
    plus the standard init of each spec file's PEFT configuration and, for the MLP or
    conv net, full fine-tuning from the pretrained base."""
    from metapeft_dist.selection import Choice, configurations, peft_name

    runs = {p: spec for p, (spec, checkpoint) in sources.items() if checkpoint is not None}
    out = {key: (c.run_dir, c.init) for key, c in configurations(runs).items()
           if key != "head"}
    for path, (spec, _) in sources.items():
        out.setdefault(Choice(path, "standard", peft_name(spec.model)).key, (path, "standard"))
    first = next(iter(sources))
    out["head"] = (first, "head")
    if sources[first][0].model.kind in ("mlp", "conv"):
        out["pretrained:all"] = (first, "pretrained")
    return out


def _job(spec, family: str):
    from metapeft_dist.crossdomain import retarget
    from metapeft_dist.job import build_job

    overrides = [f"eval.steps={STEPS}"]
    if spec.model.kind in ("mlp", "conv"):
        overrides.append("model.base=pretrained")  # the pretrained baseline and the probe
    return build_job(retarget(spec, family, overrides=overrides))


class Scorers:
    """Where the configurations are adapted and scored: where each run's job runs, as
    ``metapeft eval`` does (the Ray workers of the job on a family: an embedded Ray
    started once, or the cluster at ``address``, one job's workers at a time; this
    process for runtime.mode local), or this process for every job with ``local``. The
    same bits either way (sweeps.Piece)."""

    def __init__(self, address: str | None = None, local: bool = False):
        self.address, self.local = address, local
        self.key: tuple | None = None
        self.job = self.scorer = None
        self._open = contextlib.ExitStack()
        self._ray = contextlib.ExitStack()

    def __enter__(self) -> "Scorers":
        return self

    def __exit__(self, *exc) -> None:
        self._open.close()
        self._ray.close()

    def get(self, key, build):
        """(job, scorer) of the job ``build()`` makes (built once per ``key``)."""
        from metapeft_dist.evaluate import LocalScorer

        if self.key != key:
            self._open.close()
            self.job = build()
            if self.local or self.job.spec.runtime.mode == "local":
                self.scorer = LocalScorer(self.job)
            else:
                self._start_ray()
                from metapeft_dist.runtime.driver import ray_scorer

                self.scorer = self._open.enter_context(ray_scorer(self.job, self.address))
            self.key = key
        return self.job, self.scorer

    def _start_ray(self) -> None:
        """Join the cluster, or start the embedded Ray, once for every job."""
        import ray

        from metapeft_dist.runtime.connection import connect

        if not ray.is_initialized() and connect(self.address, None):
            self._ray.callback(ray.shutdown)


def measure(sources, configs: dict, family: str, split: str, tasks: int, cache: Path,
            query: int = QUERY, on: str = "query", shots: int = SHOTS,
            scorers: Scorers | None = None) -> dict:
    """Per configuration, the query accuracy of ``tasks`` tasks after ``STEPS`` steps,
    or with ``on`` "support-cv" or "support-fit" their support-set accuracy
    (evaluate.on_support), computed by ``scorers`` (default: here) in pieces of 20
    tasks (cached per configuration, family, split and task count)."""
    from metapeft_dist.sweeps import Sweep, assemble, chunks
    from metapeft_dist.job import Init
    from metapeft_dist.rundir import narrow

    scorers = scorers or Scorers(local=True)
    sweep = Sweep(split, STREAM, STEPS, query if on == "query" else None, final_only=True,
                  on=on)
    accuracy = {}
    for key, (path, init) in configs.items():
        scored = query if on == "query" else on
        ident = hashlib.sha256(f"{key}|{Path(path).resolve()}|{family}|{split}|{tasks}|"
                               f"{shots}|{scored}|{STEPS}|{STREAM}|{DRAWS}".encode()
                               ).hexdigest()[:16]
        file = cache / f"{ident}.json"
        if file.is_file():
            accuracy[key] = json.loads(file.read_text())
            continue
        spec, checkpoint = sources[path]
        job, scorer = scorers.get((path, family), lambda s=spec: _job(s, family))
        if init == "meta":
            frozen = checkpoint.frozen or job.frozen  # an MLP run's own pretrained base
            start = Init("meta", narrow(checkpoint.meta, job.spec.family.ways), frozen)
        else:
            start = job.baseline({"standard": "random"}.get(init, init))
        t0 = time.time()
        todo = chunks(start.name, shots, tasks, PIECE, sweep)
        curves = scorer.run([start], todo, lambda piece: None)
        accuracy[key] = assemble(curves, todo, start.name, shots)[:, 0].tolist()
        file.write_text(json.dumps(accuracy[key]))
        print(f"  {family}/{split} {key}{'' if on == 'query' else f' ({on})'}: "
              f"{100 * np.mean(accuracy[key]):.1f}% "
              f"({time.time() - t0:.0f} s)", flush=True)
    return accuracy


def embed(probe_job, family: str, split: str, tasks: int, cache: Path, shots: int = SHOTS
          ) -> tuple[np.ndarray, str]:
    """The tasks' embeddings and the probe's name (cached per probe, family, split)."""
    from metapeft_dist.embed import family_samples, make_embedder, probe_from_job

    job = probe_job(family)
    probe = probe_from_job(job)
    ident = hashlib.sha256(f"{KIND}|{probe.name}|{family}|{split}|{tasks}|{shots}|{STREAM}|{DRAWS}"
                           .encode()).hexdigest()[:16]
    file = cache / f"embeddings-{ident}.npy"
    if file.is_file():
        return np.load(file), probe.name
    t0 = time.time()
    vectors = make_embedder(KIND, probe).embed(family_samples(job, split, STREAM, tasks, shots))
    np.save(file, vectors)
    print(f"  {family}/{split}: {tasks} embeddings ({time.time() - t0:.0f} s)", flush=True)
    return vectors, probe.name


def noise_ceiling(scores: np.ndarray, n: int, draws: int = 200, seed: int = 0) -> float:
    """Share of (task, draw) where the configuration with the highest accuracy in
    ``scores`` (tasks, configurations) stays within 1 point of the best after every
    accuracy is redrawn as binomial(n, p) / n."""
    rng = np.random.default_rng(seed)
    # configurations that scored the same on every task are one (the standard LoRA init
    # and head-only tuning of the encoder: B = 0 barely moves in 10 steps)
    scores = np.unique(scores, axis=1)
    truth = scores.argmax(axis=1)
    redrawn = rng.binomial(n, np.clip(scores, 0, 1), size=(draws, *scores.shape)) / n
    best = redrawn.max(axis=2)
    chosen = np.take_along_axis(redrawn, truth[None, :, None].repeat(draws, 0), 2)[..., 0]
    return float((chosen >= best - 0.01).mean())


def split_half(full: np.ndarray, half: np.ndarray, query: int) -> tuple[float, float]:
    """How much of the per-task accuracy difference between two configurations is the
    task's own rather than the query draw. ``full`` and ``half``: (tasks, 2) accuracies
    on ``query`` and on ``query // 2`` examples per class; a task's support set and
    first query examples are the same whatever the query size, so the second half's
    accuracy is (query * full - h * half) / (query - h). Returns (r, reliability): the
    correlation of the difference between the two disjoint halves, and by
    Spearman-Brown 2r / (1 + r), the share of the full query set's difference variance
    that a second query set would reproduce."""
    h = query // 2
    second = (query * full - h * half) / (query - h)
    r = float(np.corrcoef(half[:, 0] - half[:, 1], second[:, 0] - second[:, 1])[0, 1])
    return r, 2 * r / (1 + r)


def bench_select(families: list[str], paths: list[str], tasks: int = 40,
                 cache: Path | None = None, query: int = QUERY, cv: bool = False,
                 shots: int = SHOTS, address: str | None = None, local: bool = False
                 ) -> dict:
    """RQ2 on ``families`` for the configurations of ``paths``, the adaptations on the
    Ray workers (an embedded Ray, or the cluster at ``address``) or with ``local`` here."""
    with Scorers(address, local) as scorers:
        return _bench_select(families, paths, tasks, cache, query, cv, shots, scorers)


def _bench_select(families: list[str], paths: list[str], tasks: int, cache: Path | None,
                  query: int, cv: bool, shots: int, scorers: Scorers) -> dict:
    from metapeft_dist.centroids import run_centroid
    from metapeft_dist.curves import mean_ci95
    from metapeft_dist.sweeps import ON_SUPPORT
    from metapeft_dist.rundir import run_evaluation
    from metapeft_dist.selection import (Outcome, OutcomePredictor, choose_by_similarity,
                                         global_best)
    from metapeft_dist.task_embedding import probe_model, probe_spec

    cache = cache or ROOT / ".bench" / "select-cache"
    cache.mkdir(parents=True, exist_ok=True)
    sources = _sources(paths)
    configs = _configurations(sources)
    specs = [spec for spec, _ in sources.values()]
    text = all(s.model.kind == "encoder" for s in specs)
    first = specs[0]
    through = probe_spec(first, probe_model(specs) if text else first.model)

    def probe_job(family):
        return _job(through, family)

    data = {}
    for family in families:
        for split in ("val", "test"):
            vectors, probe = embed(probe_job, family, split, tasks, cache, shots)
            data[(family, split)] = {
                "accuracy": measure(sources, configs, family, split, tasks, cache, query,
                                    shots=shots, scorers=scorers),
                "embeddings": vectors, "probe": probe,
                "tasks": [f"{family}/{split}/{i}" for i in range(tasks)]}
    def outcomes(split: str, keep=lambda i: True) -> list:
        return [Outcome(d["tasks"][i], config, acc[i], d["embeddings"][i], KIND, d["probe"],
                        shots, STEPS)
                for (f, s), d in data.items() if s == split
                for config, acc in d["accuracy"].items() for i in range(tasks) if keep(i)]

    records = outcomes("val")
    predictor = OutcomePredictor(records)
    # the same predictor with records from the held-out tasks' own distribution: the
    # other folds of the test tasks (past adaptations of tasks like the user's)
    folded = [OutcomePredictor(outcomes("test", lambda i, k=k: i % FOLDS != k))
              for k in range(FOLDS)]
    best_global = global_best(records)
    runs = [p for p, (_, checkpoint) in sources.items() if checkpoint is not None]
    centroids = ([run_centroid(r, KIND, probe_model(specs), data[(families[0], "val")]["probe"],
                               shots) for r in runs] if text else [])
    evaluations = {r: e for r in runs if (e := run_evaluation(r, shots)) is not None}

    rows: dict[str, list[float]] = {"predictor": [], "predictor_cv": [], "global": [],
                                    "oracle": [],
                                    **{c: [] for c in configs if c.startswith("meta:")}}
    if centroids:
        rows["similarity"] = []
    picks: dict[str, list[str]] = {}
    for family in families:
        d = data[(family, "test")]
        for i in range(tasks):
            scores = {c: acc[i] for c, acc in d["accuracy"].items()}
            best = max(scores.values())
            pick, _, _ = predictor.choose(d["embeddings"][i])
            picks.setdefault(family, []).append(pick)
            rows["predictor"].append(scores[pick])
            pick_cv, _, _ = folded[i % FOLDS].choose(d["embeddings"][i])
            rows["predictor_cv"].append(scores[pick_cv])
            rows["global"].append(scores[best_global])
            rows["oracle"].append(best)
            for c in configs:
                if c.startswith("meta:"):
                    rows[c].append(scores[c])
            if centroids:
                choice, _, _ = choose_by_similarity(d["embeddings"][i], centroids, evaluations)
                rows["similarity"].append(scores[choice.key])
    out: dict = {"families": families, "tasks_per_family": tasks, "shots": shots,
                 "query": query, "steps": STEPS, "configurations": sorted(configs),
                 "global_best": best_global}
    print(f"  global best on the recorded tasks: {best_global}", flush=True)
    ways = sources[next(iter(sources))][0].family.ways
    test = np.concatenate([np.array([d["accuracy"][c] for c in configs]).T
                           for (f, s), d in data.items() if s == "test"])
    out["noise_ceiling_within_1pt"] = noise_ceiling(test, ways * query)
    print(f"  noise ceiling (a predictor that knew the expected accuracies): "
          f"{100 * out['noise_ceiling_within_1pt']:.1f}%", flush=True)
    # the global choice against the configuration that beats it most often
    test_tasks = [(f, d) for (f, s), d in data.items() if s == "test"]
    wins = {c: sum(int(np.sum(np.array(d["accuracy"][c]) > np.array(d["accuracy"][best_global])
                                + 0.01)) for _, d in test_tasks)
            for c in configs if c != best_global}
    rival = max(wins, key=wins.get)
    pair = {c: configs[c] for c in (best_global, rival)}
    full = np.concatenate([np.array([d["accuracy"][c] for c in pair]).T for _, d in test_tasks])
    half = np.concatenate([np.array([a[c] for c in pair]).T for f, _ in test_tasks
                           for a in [measure(sources, pair, f, "test", tasks, cache,
                                             query // 2, shots=shots, scorers=scorers)]])
    r, reliability = split_half(full, half, query)
    out["split_half"] = {"pair": list(pair), "r": r, "reliability": reliability}
    print(f"  {best_global} - {rival} per task: split-half r {r:.2f}, {100 * reliability:.0f}% "
          f"of its variance is the task's own (the rest: the query draw)", flush=True)
    if cv:  # the rival where it beats the global choice on the task's support set
        for on in ON_SUPPORT if shots > 1 else ["support-fit"]:  # no folds of one shot
            rule = rows[on.replace("-", "_")] = []
            for f, d in test_tasks:
                seen = measure(sources, pair, f, "test", tasks, cache, on=on, shots=shots,
                               scorers=scorers)
                for i in range(tasks):
                    pick = rival if seen[rival][i] > seen[best_global][i] else best_global
                    rule.append(d["accuracy"][pick][i])
    oracle = np.array(rows["oracle"])
    for name in ("predictor", "predictor_cv", "global", "support_cv", "support_fit"):
        if name in rows:  # best for the task, or within 1 point of it
            mean, ci = mean_ci95((np.array(rows[name]) >= oracle - 0.01).astype(float))
            out[f"{name}_within_1pt"] = [float(mean), float(ci)]
            print(f"  {name}_within_1pt: {100 * mean:.1f}% ± {100 * ci:.1f}", flush=True)
    base = np.array(rows["global"])
    for name, values in rows.items():
        v = np.array(values)
        mean, ci = mean_ci95(v)
        gain, gain_ci = mean_ci95(v - base)
        out[name] = {"accuracy": [float(mean), float(ci)],
                     "gain_over_global": [float(gain), float(gain_ci)]}
        print(f"  {name:<12} {100 * mean:5.1f}% ± {100 * ci:.1f}   vs the global choice "
              f"{100 * gain:+5.1f} ± {100 * gain_ci:.1f}", flush=True)
    for family, chosen in picks.items():
        counts = {c: chosen.count(c) for c in sorted(set(chosen))}
        out[f"picks_{family}"] = counts
        print(f"  predictor's picks on {family} test tasks: {counts}", flush=True)
    out["mean_by_config"] = {f"{f}/{s}": {c: float(np.mean(a)) for c, a in d["accuracy"].items()}
                             for (f, s), d in data.items()}
    for key, means in out["mean_by_config"].items():
        print(f"  {key}: " + ", ".join(f"{c} {100 * m:.1f}" for c, m in means.items()),
              flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", help="comma-separated families, e.g. wordnet,fortunes")
    parser.add_argument("runs", nargs="+", help="run directories or job spec files")
    parser.add_argument("--tasks", type=int, default=40, help="tasks per family and split")
    parser.add_argument("--query", type=int, default=QUERY, help="query examples per class")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--shots", type=int, default=SHOTS, help="support examples per class")
    parser.add_argument("--support-cv", action="store_true",
                        help="also choose between the global choice and its rival by "
                             "leave-one-shot-out accuracy on each task's support set, and "
                             "by accuracy on the support set after adapting to it")
    parser.add_argument("--address", default=None,
                        help="adapt on the workers of the Ray cluster at HOST:PORT "
                             "(default: an embedded local Ray's)")
    parser.add_argument("--local", action="store_true",
                        help="adapt in this process (the same numbers, one task piece "
                             "after another)")
    args = parser.parse_args(argv)
    result = bench_select(args.families.split(","), args.runs, args.tasks, args.cache,
                          args.query, args.support_cv, args.shots, args.address, args.local)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
