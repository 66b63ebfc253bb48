"""Zero-shot and in-context few-shot prompting of SmolLM2-135M-Instruct on a job's
meta-test tasks: the prompting baselines a meta-learned LoRA init is compared with.

  python bench/prompting.py [--spec jobs/smollm2-wordnet-fomaml.yaml] [--tasks 20]
                            [--shots 1 5] [--set KEY=VALUE ...]

On the same meta-test tasks as the job's evaluation (stream = shots, as evaluate_job
draws them) and the same verbalizer, per shot setting: zero-shot accuracy twice (the
standard init's step 0, B = 0 through the cached lower layers; and the in-context prompt
with no examples through every layer; they agree up to the float16 cache), in-context
accuracy with the support set in the prompt, each mean +- 95% CI over tasks, the paired
gain of in-context over zero-shot, and seconds per task. Builds the job (the corpus cache
once: ~9 min for WordNet in float32 on 2 cores, then read from $METAPEFT_CACHE).
"""

from __future__ import annotations

import argparse
import time

import metapeft_dist  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np

from metapeft_dist.config import load_spec
from metapeft_dist.curves import mean_ci95
from metapeft_dist.job import build_job
from metapeft_dist.models.in_context import InContext


def accuracy(logits: mx.array, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(np.array(logits), axis=-1) == labels))


def pct(values) -> str:
    mean, ci = mean_ci95(np.asarray(values))
    return f"{100 * mean:5.1f}% +- {100 * ci:4.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="jobs/smollm2-wordnet-fomaml.yaml")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    spec = load_spec(args.spec, args.overrides)
    start = time.perf_counter()
    job = build_job(spec)
    print(f"{spec.name}: job built in {time.perf_counter() - start:.1f} s "
          f"({len(job.model.texts)} texts, {spec.model.dtype} -> {job.model.path})")
    standard = job.baseline("random")
    adapters = standard.meta["params"]
    scorer = InContext(job.model, job.frozen["inputs.ids"], job.frozen["inputs.mask"])
    none = np.array([], dtype=np.int32)
    print(f"{spec.family.ways}-way, {args.tasks} meta-test tasks, "
          f"{spec.eval.query or spec.family.query} queries per class; mean +- 95% CI")
    for shots in args.shots:
        sx, sy, qx, qy = job.episodes("test", shots, range(args.tasks), shots,
                                      spec.eval.query).arrays()
        cached, zero, context, seconds = [], [], [], []
        for i in range(args.tasks):
            cached.append(accuracy(job.model({**job.frozen, **adapters}, mx.array(qx[i])),
                                   qy[i]))
            zero.append(accuracy(scorer.logits(adapters, none, none, qx[i]), qy[i]))
            t0 = time.perf_counter()
            context.append(accuracy(scorer.logits(adapters, sx[i], sy[i], qx[i]), qy[i]))
            seconds.append(time.perf_counter() - t0)
        prefix = np.mean([len(scorer.prefix(sx[i], sy[i])) for i in range(args.tasks)])
        print(f"{shots} shot{'s' if shots != 1 else ''}:")
        print(f"  zero-shot, standard init step 0 (cached): {pct(cached)}")
        print(f"  zero-shot, prompt with no examples:       {pct(zero)}")
        print(f"  in-context ({shots} per class in the prompt): {pct(context)}"
              f"   ({np.median(seconds):.1f} s per task, prefix {prefix:.0f} tokens)")
        print(f"  in-context - zero-shot (paired):          "
              f"{pct(np.array(context) - np.array(zero))}")


if __name__ == "__main__":
    main()
