"""The hypernetwork run against a meta-learned init on the same held-out tasks (paired):
accuracy after 0, 1, 5 and 10 steps at 1 and 5 shots, and paired differences with 95%
CIs. Also the meta-learned and the standard init with the hypernetwork's prototype head
(``Hyper.init_hyper`` with zero maps generates exactly the given adapters plus that
head), which separates what the head gives from what the generated adapters give.

    python bench/hyper_compare.py [--local] HYPER_RUN META_RUN [TASKS]
    python bench/hyper_compare.py [--local] --prune 0.2,0.4,0.6 HYPER_RUN [TASKS]

The inits are adapted where the hypernetwork run's job runs, as its evaluation was: on
its Ray workers (an embedded Ray; sweeps.Sweep pieces of 20 tasks), in this process for
``runtime.mode: local`` or with ``--local``; the same numbers.

``--prune``: the dynamic-rank sweep. The hypernetwork run's generator with each
fraction as ``algorithm.hyper.prune`` (directions below it dropped), on the same tasks:
accuracy after 0 and 10 steps and the mean rank the tasks get, per adapted layer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metapeft_dist  # noqa: E402,F401  (loads OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from metapeft_dist.rundir import load_run  # noqa: E402
from metapeft_dist.curves import mean_ci95  # noqa: E402
from metapeft_dist.job import Init, build_job  # noqa: E402
from metapeft_dist.sweeps import Sweep, assemble, chunks  # noqa: E402

from select_bench import PIECE, Scorers  # noqa: E402  (bench/, the script's directory)

STEPS = 10
SHOWN = (0, 1, 5, 10)


def curves(scorer, inits: list, shots: int, tasks: int) -> dict:
    """Each init's accuracy after 0..STEPS steps on the meta-test tasks of stream
    ``shots`` (the final evaluation's), in pieces of PIECE tasks on ``scorer``."""
    sweep = Sweep("test", None, STEPS)
    todo = [p for init in inits for p in chunks(init.name, shots, tasks, PIECE, sweep)]
    done = scorer.run(inits, todo, lambda piece: None)
    return {init.name: assemble(done, todo, init.name, shots) for init in inits}


def compare(hyper_run: str, meta_run: str, tasks: int = 60, local: bool = False) -> dict:
    """The inits adapted where the hypernetwork run's job runs (its Ray workers on an
    embedded Ray; here for runtime.mode local), or here with ``local``."""
    with Scorers(local=local) as scorers:
        return _compare(hyper_run, meta_run, tasks, scorers)


def _compare(hyper_run: str, meta_run: str, tasks: int, scorers: Scorers) -> dict:
    spec, hyper_ckpt = load_run(hyper_run, text=False)
    if spec.algorithm.name != "hyper":
        sys.exit(f"{hyper_run} is not a hypernetwork run (algorithm.name hyper)")
    job, scorer = scorers.get(hyper_run, lambda: build_job(spec))
    other, meta_ckpt = load_run(meta_run, text=False)
    if other.model != spec.model:
        sys.exit("the two runs use different models")
    # An MLP's pretrained base is each run's own (stored in its checkpoint); a text
    # model's is the model directory the spec names.
    hyper_meta, meta = hyper_ckpt.meta, meta_ckpt.meta
    for frozen in (hyper_ckpt.frozen, meta_ckpt.frozen):
        if frozen and any(not mx.array_equal(frozen[k], job.frozen[k]) for k in job.frozen):
            sys.exit("a run's frozen base differs from the one this job builds")
    standard = job.baseline("random")
    proto = job.algorithm.init_hyper  # type: ignore[attr-defined]
    inits = {"hyper": Init("hyper", hyper_meta, job.frozen),
             "meta": Init("meta", meta, job.frozen),
             "meta+proto": Init("meta+proto", proto(mx.random.key(5), meta["params"]),
                                job.frozen),
             "standard": standard,
             "standard+proto": Init("standard+proto",
                                    proto(mx.random.key(5), standard.meta["params"]),
                                    job.frozen)}
    out: dict = {}
    for shots in (1, 5):
        t0 = time.time()
        by_init = curves(scorer, list(inits.values()), shots, tasks)
        for name, values in by_init.items():
            row = " ".join(f"{100 * values.mean(0)[s]:5.1f}" for s in SHOWN)
            print(f"{shots}-shot {name:<15} {row}", flush=True)
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
        result = {}
        for name, values in by_init.items():
            mean, ci = mean_ci95(values)
            result[name] = {"mean": mean.tolist(), "ci95": ci.tolist()}
        for other in ("meta", "meta+proto", "standard+proto"):
            mean, ci = mean_ci95(by_init["hyper"] - by_init[other])
            result[f"hyper-{other}"] = {"mean": mean.tolist(), "ci95": ci.tolist()}
            cells = ", ".join(f"{s} {100 * mean[s]:+.1f}±{100 * ci[s]:.1f}" for s in SHOWN)
            print(f"  hyper - {other}: {cells}", flush=True)
        out[str(shots)] = result
    return out


def prune_sweep(hyper_run: str, fractions: list[float], tasks: int = 60,
                local: bool = False) -> dict:
    with Scorers(local=local) as scorers:
        return _prune_sweep(hyper_run, fractions, tasks, scorers)


def _prune_sweep(hyper_run: str, fractions: list[float], tasks: int, scorers: Scorers) -> dict:
    import dataclasses

    import numpy as np

    from metapeft_dist.algorithms.hyper import ranks
    from metapeft_dist.job import to_mx

    spec, checkpoint = load_run(hyper_run, text=False)
    out: dict = {}
    for fraction in [0.0, *fractions]:
        pruned = dataclasses.replace(spec, algorithm=dataclasses.replace(
            spec.algorithm, hyper=dataclasses.replace(spec.algorithm.hyper, prune=fraction)))
        job, scorer = scorers.get(fraction, lambda s=pruned: build_job(s))
        init = Init("hyper", checkpoint.meta, checkpoint.frozen or job.frozen)
        row: dict = {}
        for shots in (1, 5):
            values = curves(scorer, [init], shots, tasks)["hyper"]
            sx, sy, _, _ = to_mx(job.episodes("test", shots, range(tasks), shots))
            kept = [ranks(job.algorithm.generate(init.meta, job.loss_fn(init.frozen),  # type: ignore
                                                 sx[i], sy[i])) for i in range(tasks)]
            mean, ci = mean_ci95(values)
            row[str(shots)] = {"mean": mean[[0, STEPS]].tolist(), "ci95": ci[[0, STEPS]].tolist(),
                               "rank": {k: float(np.mean([r[k] for r in kept])) for k in kept[0]}}
            print(f"prune {fraction:.2f} {shots}-shot: {100 * mean[0]:.1f} ± {100 * ci[0]:.1f} "
                  f"(0 steps), {100 * mean[STEPS]:.1f} ± {100 * ci[STEPS]:.1f} ({STEPS} steps); "
                  f"mean rank {row[str(shots)]['rank']}", flush=True)
        out[str(fraction)] = row
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    here = "--local" in args
    args = [a for a in args if a != "--local"]
    if args[:1] == ["--prune"] and len(args) >= 3:
        print(json.dumps(prune_sweep(args[2], [float(f) for f in args[1].split(",")],
                                     int(args[3]) if len(args) > 3 else 60, here)))
    elif len(args) >= 2:
        print(json.dumps(compare(args[0], args[1], int(args[2]) if len(args) > 2 else 60,
                                 here)))
    else:
        sys.exit(__doc__)
