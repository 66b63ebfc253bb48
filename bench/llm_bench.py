"""Meta-learned LoRA for a real LLM (SmolLM2-135M-Instruct) against what a practitioner
would do instead: the standard LoRA init fine-tuned, zero-shot prompting and in-context
few-shot prompting, on the same meta-test tasks and verbalizer.

  python bench/llm_bench.py [--families wordnet fortunes] [--run FAMILY=RUN_DIR ...]
                            [--tasks 100] [--set KEY=VALUE ...]

Per family: meta-trains jobs/smollm2-FAMILY-fomaml.yaml (unless ``--run`` names a finished
run of it), then evaluates the run's selected init on ``--tasks`` meta-test tasks at 1 and
5 shots (evaluate.evaluate_job, the final evaluation of every run):

- accuracy after 0 / 1 / 5 / 10 steps of the meta-learned init and of the standard LoRA
  init (A random, B zero, stepped with the run's inner SGD), zero-shot prompting (the
  standard init's step 0) and in-context prompting (the support set in the prompt), with
  paired 95% CIs of meta - standard and meta - in-context, and the RQ1 verdict (over 80%
  with under 10 examples, over 20 points above the standard init);
- Experiment 2, steps to the target (what the meta-learned init reaches after its inner
  steps): the meta-learned init vs the standard init fine-tuned with mlx-lm's Adam
  (finetune.Finetune, up to eval.finetune.steps) at the job's shot count;
- RQ3: the amortized cost at 50 tasks against the standard init's per-task cost, and the
  break-even task count, from the run's measured meta-training spend and the measured
  seconds per step of one task;
- peak memory of one meta-step (the run's meta-batch on one process).

The speed of one inner step (cached vs all layers, float32 vs 4-bit) is
bench/causal_lm_step.py's, run by ``make bench``'s llm section too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metapeft_dist  # noqa: E402,F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402

STEPS = (0, 1, 5, 10)
RQ1_ACCURACY, RQ1_GAIN, RQ1_EXAMPLES = 0.8, 0.2, 10


def evaluate_run(run_dir: str | Path, tasks: int, overrides: list[str],
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """The run's init on ``tasks`` meta-test tasks at 1 and 5 shots against the
    standard init, zero-shot and in-context prompting; the cost figures from the run's
    spend; peak memory of one meta-step."""
    from metapeft_dist.crossdomain import retarget
    from metapeft_dist.evaluate import evaluate_job
    from metapeft_dist.job import build_job
    from metapeft_dist.rundir import load_init
    from metapeft_dist.runner import adaptation_cost

    spec, meta, source = load_init(run_dir)
    spec = retarget(spec, overrides=[f"eval.tasks={tasks}", "eval.shots=[1,5]",
                                     "eval.steps=10", "eval.baselines=[random,in_context]",
                                     # the run may have skipped it (this bench's own
                                     # meta-training does): the standard init's fine-tune
                                     "eval.finetune.steps=200", *overrides])
    job = build_job(spec)
    started = time.perf_counter()

    def progress(stage, done, total, info):
        detail = f": {info['detail']}" if "detail" in info else ""
        log(f"  evaluating {done}/{total}: {info['init']}, {info['shots']}-shot{detail} "
            f"({time.perf_counter() - started:.0f} s)")

    if spec.runtime.mode == "local":
        evaluation = evaluate_job(job, meta, progress)
    else:  # on the embedded Ray's workers, one per core (runtime/evaluation.py)
        from metapeft_dist.runtime.driver import evaluate_on_ray

        evaluation, work = evaluate_on_ray(job, meta, progress)
        log(f"  evaluated on {len(work['per_worker'])} workers: {work['completed']} pieces, "
            f"{work['lost']} lost")
    results = json.loads((Path(run_dir) / "results.json").read_text())
    run_cost = results["cost"]  # the run's measured meta-training spend and node rate
    cost = adaptation_cost(job, meta, evaluation, run_cost["spend_usd"],
                           run_cost["rate_usd_per_hour"])
    return {"run_dir": str(run_dir), "init": source, "evaluation": evaluation,
            "cost": cost, "meta_training": results["meta_training"],
            "peak_memory": meta_step_memory(job, meta)}


def meta_step_memory(job, meta) -> dict[str, float]:
    """MiB resident before one meta-step of the job's meta-batch (the model, the corpus
    states) and the peak during it."""
    loss_fn = job.loss_fn()
    batch = job.batch(0)
    inputs = job.algorithm.step_inputs(0)
    mx.eval(batch)
    mx.reset_peak_memory()
    resident = mx.get_active_memory()
    grad, loss = job.algorithm.batch_grad(meta, loss_fn, batch, inputs,
                                          vmap=job.spec.run.batching == "vmap")
    mx.eval(grad, loss)
    return {"resident_mib": resident / 2**20, "peak_mib": mx.get_peak_memory() / 2**20,
            "tasks": int(batch[0].shape[0])}


def table(name: str, out: dict[str, Any]) -> list[str]:
    """The comparison as printed lines."""
    ev = out["evaluation"]
    lines = [f"{name}: {ev['tasks']} meta-test tasks per shot count, 5-way, accuracy % "
             "(mean +- 95% CI; gains paired over the same tasks)"]
    header = f"  {'shots':>5} {'init':<22}" + "".join(f"{f'{s} steps':>15}" for s in STEPS)
    lines.append(header)
    for shots, summary in ev["shots"].items():
        inits = summary["inits"]
        rows = [("meta-learned", inits["meta"]), ("standard LoRA", inits["random"]),
                ("in-context prompting", inits["in_context"])]
        for label, entry in rows:
            lines.append(f"  {shots:>5} {label:<22}" + "".join(
                f"{100 * entry['mean'][s]:8.1f} +-{100 * entry['ci95'][s]:4.1f}" for s in STEPS))
        zero = inits["random"]
        lines.append(f"  {shots:>5} {'zero-shot prompting':<22}"
                     f"{100 * zero['mean'][0]:8.1f} +-{100 * zero['ci95'][0]:4.1f}")
        for other, label in (("random", "standard LoRA"), ("in_context", "in-context")):
            gain = summary["gain_over"][other]
            lines.append(f"  {shots:>5} {'meta - ' + label:<22}" + "".join(
                f"{100 * gain['mean'][s]:+8.1f} +-{100 * gain['ci95'][s]:4.1f}" for s in STEPS))
    lines.extend(verdicts(out))
    return lines


def verdicts(out: dict[str, Any]) -> list[str]:
    """RQ1, Experiment 2 and RQ3, stated from the numbers."""
    ev, cost = out["evaluation"], out["cost"]
    lines = []
    for shots, summary in ev["shots"].items():
        examples = 5 * int(shots)
        if examples >= RQ1_EXAMPLES:
            continue
        meta = summary["inits"]["meta"]["mean"][10]
        gain = summary["gain_over"]["random"]["mean"][10]
        holds = meta > RQ1_ACCURACY and gain > RQ1_GAIN
        lines.append(f"  RQ1 ({shots}-shot, {examples} examples): {100 * meta:.1f}% after 10 "
                     f"steps, {100 * gain:+.1f} points over the standard init: "
                     f"{'holds' if holds else 'does not hold'}")
    ft = ev["finetune"]
    meta_steps = cost["per_task"]["meta"]["steps_to_target"]
    standard = ft["steps_to_target"]
    target = 100 * ft["target"]
    if standard is None:
        ratio = f"not reached in {ft['budget']} steps ({100 * ft['mean'][-1]:.1f}% at the end)"
    else:
        ratio = f"{standard} steps"
    faster = ("" if meta_steps in (None, 0) or standard is None
              else f", {standard / meta_steps:.1f}x fewer")
    lines.append(f"  Experiment 2 ({ft['shots']}-shot, target {target:.1f}%): meta-learned "
                 f"init {meta_steps} steps, standard init (Adam lr {ft['lr']:.3g}, "
                 f"{ft['tasks']} tasks) {ratio}{faster}")
    rq3 = cost["rq3"]
    bound = "at least " if rq3.get("lower_bound") else ""
    even = cost["break_even_tasks"]
    lines.append(f"  RQ3: at {rq3['tasks']} tasks the standard init costs "
                 + (f"{bound}{rq3['ratio']:.3g}x" if rq3["ratio"] else "n/a")
                 + f" the amortized meta-learned init (goal {rq3['goal_ratio']:g}x: "
                 f"{'met' if rq3['met'] else 'not met'}); break-even after "
                 + (f"{'at most ' if cost['bounds'] else ''}{even:,.1f} tasks"
                    if even is not None else "never")
                 + f"; meta-training spend {cost['spend_usd']:.3g} USD, a step "
                 f"{1e3 * cost['step_seconds']:.0f} ms (meta) / "
                 f"{1e3 * cost['per_task']['standard']['step_seconds']:.0f} ms (standard)")
    memory = out["peak_memory"]
    lines.append(f"  peak memory of one meta-step ({memory['tasks']} tasks): "
                 f"{memory['peak_mib']:.0f} MiB ({memory['resident_mib']:.0f} MiB resident "
                 "before it: the model and the corpus states)")
    return lines


def bench_llm(run_job: Callable[[Path, list[str]], dict], families=("wordnet", "fortunes"),
              runs: dict[str, str] | None = None, tasks: int = 100,
              overrides: list[str] | None = None) -> dict[str, Any]:
    """Meta-train (unless ``runs`` names the run) and evaluate each family's job."""
    out: dict[str, Any] = {}
    for family in families:
        spec_path = ROOT / "jobs" / f"smollm2-{family}-fomaml.yaml"
        run_dir = (runs or {}).get(family)
        if run_dir is None:
            print(f"  meta-training {spec_path.name} (the final evaluation is this bench's)",
                  flush=True)
            trained = run_job(spec_path, ["eval.tasks=5", "eval.finetune.steps=0"])
            run_dir = trained["run_dir"]
        result = evaluate_run(run_dir, tasks, list(overrides or ()),
                              lambda line: print(line, flush=True))
        out[family] = result
        for line in table(family, result):
            print(line, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=["wordnet", "fortunes"])
    parser.add_argument("--run", action="append", default=[], metavar="FAMILY=RUN_DIR",
                        help="a finished run of jobs/smollm2-FAMILY-fomaml.yaml to evaluate")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the evaluated spec")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.run)

    def run_job(spec_path: Path, overrides: list[str]) -> dict:
        from metapeft_dist.config import load_spec
        from metapeft_dist.runner import run_job as run

        spec = load_spec(spec_path, overrides)
        run_dir = ROOT / ".bench" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return run(spec, run_dir)

    out = bench_llm(run_job, args.families, runs, args.tasks, args.set)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
