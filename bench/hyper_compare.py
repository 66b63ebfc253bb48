"""The hypernetwork run against a meta-learned init on the same held-out tasks (paired):
accuracy after 0, 1, 5 and 10 steps at 1 and 5 shots, and paired differences with 95%
CIs. Also the meta-learned and the standard init with the hypernetwork's prototype head
(``Hyper.init_hyper`` with zero maps generates exactly the given adapters plus that
head), which separates what the head gives from what the generated adapters give.

    python bench/hyper_compare.py HYPER_RUN META_RUN [TASKS]
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

from metapeft_dist.adapt import load_run  # noqa: E402
from metapeft_dist.evaluate import Evaluator, mean_ci95  # noqa: E402
from metapeft_dist.job import Init, build_job  # noqa: E402

STEPS = 10
SHOWN = (0, 1, 5, 10)


def compare(hyper_run: str, meta_run: str, tasks: int = 60) -> dict:
    spec, hyper_ckpt = load_run(hyper_run, text=False)
    if spec.algorithm.name != "hyper":
        sys.exit(f"{hyper_run} is not a hypernetwork run (algorithm.name hyper)")
    job = build_job(spec)
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
    evaluator = Evaluator(job, STEPS)
    out: dict = {}
    for shots in (1, 5):
        curves = {}
        for name, init in inits.items():
            t0 = time.time()
            curves[name] = evaluator.curves(init, "test", shots, tasks, shots, 20)
            row = " ".join(f"{100 * curves[name].mean(0)[s]:5.1f}" for s in SHOWN)
            print(f"{shots}-shot {name:<15} {row}   ({time.time() - t0:.0f} s)", flush=True)
        result = {}
        for name, values in curves.items():
            mean, ci = mean_ci95(values)
            result[name] = {"mean": mean.tolist(), "ci95": ci.tolist()}
        for other in ("meta", "meta+proto", "standard+proto"):
            mean, ci = mean_ci95(curves["hyper"] - curves[other])
            result[f"hyper-{other}"] = {"mean": mean.tolist(), "ci95": ci.tolist()}
            cells = ", ".join(f"{s} {100 * mean[s]:+.1f}±{100 * ci[s]:.1f}" for s in SHOWN)
            print(f"  hyper - {other}: {cells}", flush=True)
        out[str(shots)] = result
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(json.dumps(compare(sys.argv[1], sys.argv[2],
                             int(sys.argv[3]) if len(sys.argv) > 3 else 60)))
