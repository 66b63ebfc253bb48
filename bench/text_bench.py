"""`make bench` section `text`: LoRA initializations for a pretrained sentence encoder
(all-MiniLM-L6-v2), meta-learned over text task families.

  - jobs/wordnet-fomaml.yaml, wordnet-reptile.yaml, fortunes-fomaml.yaml, each
    evaluated on held-out categories at 1, 5 and 10 shots: accuracy after 0, k and 10
    adaptation steps for the meta-learned init, the standard LoRA init (A random, B
    zero, fresh head) and head-only tuning, 95% CIs; steps each needs to reach the
    standard init's final accuracy, and the ratio (the seed's Experiment 2 asks for 5x);
  - cross-domain: the WordNet init evaluated on fortune topics, and the reverse;
  - the cost model's amortized cost at 50 tasks against per-task fine-tuning (RQ3: 5x);
  - peak memory of one meta-step of Reptile, first-order and second-order MAML.

Long: about an hour per job on two cores (meta-training, then 3 inits x 3 shot settings
x ``TASKS`` tasks x 10 steps of evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

TASKS = 60
OVERRIDES = [f"eval.tasks={TASKS}", "eval.shots=[1, 5, 10]", "eval.every=100",
             "eval.val_tasks=20"]
JOBS = ("wordnet-fomaml", "wordnet-reptile", "fortunes-fomaml")


def _shots_table(results: dict) -> dict:
    ev = results["evaluation"]
    k, last = ev["inner_steps"], ev["steps"]
    out = {}
    for shots, summary in ev["shots"].items():
        row = {}
        for name, entry in summary["inits"].items():
            row[name] = {"at_0": [entry["mean"][0], entry["ci95"][0]],
                         "at_k": [entry["mean"][k], entry["ci95"][k]],
                         "at_last": [entry["mean"][last], entry["ci95"][last]],
                         "steps_to_target": entry.get("steps_to_target")}
        meta, standard = row["meta"]["steps_to_target"], row["random"]["steps_to_target"]
        row["step_ratio"] = (standard / meta) if meta and standard else None
        row["target"] = summary["target"]
        out[shots] = row
        cells = "  ".join(
            f"{name} {100 * v['at_0'][0]:.1f}/{100 * v['at_k'][0]:.1f}±{100 * v['at_k'][1]:.1f}"
            f"/{100 * v['at_last'][0]:.1f}±{100 * v['at_last'][1]:.1f} "
            f"(steps {v['steps_to_target'] if v['steps_to_target'] is not None else '>10'})"
            for name, v in row.items() if isinstance(v, dict))
        ratio = row["step_ratio"]
        print(f"  {shots:>2}-shot: {cells}; standard/meta steps "
              f"{ratio:.1f}x" if ratio else f"  {shots:>2}-shot: {cells}", flush=True)
    return out


def peak_memory(spec_path: Path) -> dict:
    """Peak bytes of one in-process meta-step per algorithm on the job's tasks."""
    import mlx.core as mx

    from metapeft_dist.config import load_spec
    from metapeft_dist.job import build_job
    from metapeft_dist.trainer import MetaTrainer

    out = {}
    for name in ("reptile", "fomaml", "maml"):
        spec = load_spec(spec_path, [f"algorithm.name={name}", "runtime.mode=local",
                                     "outer.optimizer=adam", "outer.lr=0.001"])
        trainer = MetaTrainer(build_job(spec))
        trainer.step(0)  # compile and warm up
        mx.eval(trainer.meta)
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        trainer.step(1)
        mx.eval(trainer.meta)
        out[name] = {"peak_bytes": mx.get_peak_memory(),
                     "step_seconds": time.perf_counter() - t0}
        print(f"  {name:<8} peak {mx.get_peak_memory() / 2**20:8.1f} MiB, one meta-step "
              f"({spec.algorithm.meta_batch} tasks) {out[name]['step_seconds']:.2f} s",
              flush=True)
    return out


def bench_text(run, root: Path) -> dict:
    from metapeft_dist.crossdomain import evaluate_init

    out: dict = {"tasks": TASKS}
    runs = {}
    for name in JOBS:
        t0 = time.time()
        print(f"{name}:", flush=True)
        results = run(root / "jobs" / f"{name}.yaml", OVERRIDES)
        runs[name] = results["run_dir"]
        cost = results["cost"]
        out[name] = {"run_dir": results["run_dir"], "shots": _shots_table(results),
                     "rq3": cost["rq3"], "break_even_tasks": cost["break_even_tasks"],
                     "spend_usd": cost["spend_usd"],
                     "minutes": (time.time() - t0) / 60}
        r = cost["rq3"]["ratio"]
        print(f"  cost: spend {cost['spend_usd']:.3g} USD, break-even "
              f"{cost['break_even_tasks']}, RQ3 ratio at 50 tasks {r} (goal 5x); "
              f"{out[name]['minutes']:.0f} min", flush=True)
    for source, target in (("wordnet-fomaml", "fortunes"), ("fortunes-fomaml", "wordnet")):
        print(f"cross-domain: {source} init on {target}:", flush=True)
        results = evaluate_init(runs[source], family=target,
                                overrides=[f"eval.tasks={TASKS}", "eval.shots=[1, 5]"])
        out[f"{source}->{target}"] = _shots_table(results)
    print("peak memory (wordnet, 4 tasks per meta-step):", flush=True)
    out["peak_memory"] = peak_memory(root / "jobs" / "wordnet-fomaml.yaml")
    return out
