"""The LoRA hypernetwork (metapeft_dist/hyper.py) against a meta-learned LoRA init on
WordNet supersense tasks (5-way), held-out categories. Not a test: it trains for minutes.

    python bench/hyper_bench.py --init /tmp/bench6/wordnet-fomaml --iterations 300

Trains the hypernetwork in process on the job's meta-train tasks (alternating 5-shot and
1-shot batches, so it sees both support sizes it is evaluated at; its base adapters start
from the run's meta-learned adapters when ``--init`` names a finished run, else from the
standard LoRA init), then adapts on ``--tasks`` meta-test tasks (``job.episodes("test",
0, range(tasks), shots)``, the same tasks for every start) with the job's inner loop and
prints the query accuracy at 0, 5 and 10 steps, mean +- 95% CI, at 1 and 5 shots, for:

  hyper        the generated adapters and their prototype head (0 steps = zero-shot);
  init+proto   the init's adapters with the same prototype head (scale LOGIT_SCALE), the
               fair zero-shot comparison;
  init         the init as meta-learned (its own head: ~chance at 0 steps);

and the paired differences of hyper from both. With ``--val-every N`` the hypernetwork
evaluated is the iterate with the best zero-shot accuracy on meta-val tasks (checked
every N iterations, iteration 0 included), as a meta-training run selects its
checkpoint; otherwise the last one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metapeft_dist  # noqa: E402,F401  (loads OpenBLAS before mlx)


def main(argv=None) -> None:
    import mlx.core as mx
    import numpy as np

    from metapeft_dist import hyper as H
    from metapeft_dist.config import load_spec
    from metapeft_dist.evaluate import mean_ci95
    from metapeft_dist.job import build_job, to_mx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", help="a finished wordnet run directory (its meta-learned "
                        "init is the base and the comparison)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=0,
                        help="first-order inner steps in meta-training (0: zero-shot loss)")
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--chunk", type=int, default=10, help="tasks per evaluation batch")
    parser.add_argument("--val-every", type=int, default=0,
                        help="every N iterations, zero-shot accuracy on meta-val tasks; the "
                        "best iterate is the one evaluated (0: the last iterate)")
    parser.add_argument("--val-tasks", type=int, default=40)
    parser.add_argument("--save", help="write the trained hypernetwork here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.init:
        from metapeft_dist.adapt import _narrow, load_init

        spec, meta, source = load_init(args.init)
        job = build_job(spec)
        init = _narrow(meta, spec.family.ways)["params"]
    else:
        job = build_job(load_spec(ROOT / "jobs" / "wordnet-fomaml.yaml"))
        init, source = job.initial_meta["params"], "standard LoRA init (fresh head)"
    net = H.LoraHypernetwork(job)
    hyper = net.init(mx.random.key(job.spec.seed), init)
    batch = job.spec.algorithm.meta_batch
    print(f"hypernetwork: {H.count_parameters(hyper):,} parameters ({net.spec}); base "
          f"adapters and comparison: {source}", flush=True)
    print(f"meta-training: {args.iterations} iterations x {batch} tasks (5-shot and 1-shot "
          f"alternating, {job.spec.family.query} queries/class), {args.inner_steps} "
          f"first-order inner steps, Adam lr {args.outer_lr}; inner loop "
          f"{job.spec.inner.optimizer} lr {job.spec.inner.lr}", flush=True)

    def batches():
        for i in range(args.iterations):
            shots = 5 if i % 2 == 0 else 1
            yield to_mx(job.episodes("train", i, range(batch), shots))

    val = [[to_mx(job.episodes("val", 0, range(s, min(s + args.chunk, args.val_tasks)),
                               shots)) for s in range(0, args.val_tasks, args.chunk)]
           for shots in (1, 5)]

    def validate(params) -> tuple[float, float]:
        """Zero-shot accuracy on the meta-val tasks, 1-shot and 5-shot."""
        return tuple(float(np.mean(np.array(H.curves(net, net.generate, params, tasks, 0))))
                     for tasks in val)

    best = {"iteration": 0, "hyper": hyper, "score": -1.0}

    def consider(iteration: int, params) -> None:
        one, five = validate(params)
        score = (one + five) / 2
        if score > best["score"]:
            best.update(iteration=iteration, hyper=params, score=score)
        print(f"  iteration {iteration:4d}: meta-val zero-shot accuracy 1-shot "
              f"{100 * one:.1f}%, 5-shot {100 * five:.1f}%", flush=True)

    if args.val_every:
        consider(0, hyper)
    window: list[float] = []

    def report(i: int, loss: float, params) -> None:
        window.append(loss)
        if (i + 1) % 50 == 0 or i + 1 == args.iterations:
            print(f"  iteration {i + 1:4d}: mean query loss (last {len(window)}) "
                  f"{np.mean(window):.3f}  [{time.perf_counter() - t0:.0f} s]", flush=True)
            window.clear()
        if args.val_every and ((i + 1) % args.val_every == 0 or i + 1 == args.iterations):
            consider(i + 1, params)

    t0 = time.perf_counter()
    hyper, _ = H.meta_train(net, hyper, batches(), args.inner_steps, args.outer_lr,
                            on_step=report)
    if args.val_every:
        hyper = best["hyper"]
        print(f"selected iteration {best['iteration']} (best mean meta-val zero-shot "
              f"accuracy, {100 * best['score']:.1f}%)", flush=True)
    train_seconds = time.perf_counter() - t0
    print(f"meta-training took {train_seconds:.0f} s; metric scale "
          f"{float(mx.exp(hyper['metric.log_scale'])):.2f}", flush=True)
    if args.save:
        print(f"saved to {H.save_hypernetwork(args.save, net, hyper)}", flush=True)

    adapters = {k: init[k] for k in net.names}
    starts = {
        "hyper": (net.generate, hyper),
        "init+proto": (lambda a, sx, sy: net.with_proto_head(a, sx, sy), adapters),
        "init": (lambda p, sx, sy: p, init),
    }
    steps = 10
    marks = (0, 5, 10)
    for shots in (1, 5):
        tasks = [to_mx(job.episodes("test", 0, range(s, min(s + args.chunk, args.tasks)),
                                    shots)) for s in range(0, args.tasks, args.chunk)]
        print(f"\n{shots}-shot, {args.tasks} meta-test tasks, query accuracy % after "
              f"0 / 5 / 10 steps (mean +- 95% CI):", flush=True)
        curves = {}
        for name, (start, shared) in starts.items():
            t1 = time.perf_counter()
            curves[name] = np.array(H.curves(net, start, shared, tasks, steps))
            mean, ci = mean_ci95(curves[name])
            cells = "  ".join(f"{100 * mean[k]:5.1f} +- {100 * ci[k]:4.1f}" for k in marks)
            print(f"  {name:<11} {cells}   [{time.perf_counter() - t1:.0f} s]", flush=True)
        for other in ("init+proto", "init"):
            mean, ci = mean_ci95(curves["hyper"] - curves[other])
            cells = "  ".join(f"{100 * mean[k]:+5.1f} +- {100 * ci[k]:4.1f}" for k in marks)
            print(f"  hyper - {other:<10} {cells}   (paired)", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
