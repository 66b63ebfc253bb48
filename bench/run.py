"""`make bench`: the speed and quality figures the acceptance criteria name, measured in
one run on this machine, printed as tables and saved to .bench/bench-TIMESTAMP.json.
RQ1-RQ3 and Experiments 1-3, which the sections measure: docs/research-questions.md.

    python bench/run.py                  # every section
    python bench/run.py speed sinusoid   # some sections

Sections:
  blas      1024x1024 float32 matmul: MLX's bundled BLAS vs OpenBLAS (median of 5)
  speed     sinusoid second-order MAML (K=10, meta-batch 25, 1 inner step) meta-iterations
            per second: per-task loop vs mx.vmap vs mx.compile vs both (median of 3);
            where an iteration's time goes (sampling, copying, building the graph, MLX
            dispatching it, the wait for its kernels, reading the loss; the trainer's
            step and each thread's CPU time in it; the graph's size); then
            first and second order against the same MAML in JAX (bench/jax_maml.py, in
            .bench/jax-venv), three alternating rounds, the median ratio and each
            side's CPU time per meta-iteration
  sinusoid  jobs/sinusoid-maml.yaml end to end: MSE after 1 and 10 steps, 600 tasks
  digits    jobs/digits-*.yaml, five algorithms: 1-shot gain over random init and
            5-shot accuracy after the inner-loop step count, with 95% CIs
  gaussian  jobs/gaussian-*.yaml: accuracy with 5 examples per class
  distributed  tasks/s with 1 and 2 Ray workers on ~0.2 s tasks, framework overhead
            per task against the same computation in-process, parameter-server update
            latency and wire bytes per task
  evaluation  a final evaluation of the quickstart's size on 1 and 2 Ray workers (cold:
            with their compile; warm) and in-process, paired per round, and whether the
            curves are the same bits
  jsonl     a user's text job on 40 JSONL tasks of WordNet glosses (MiniLM, LoRA, FOMAML,
            200 iterations, 60 meta-test tasks at 1 and 5 shots, validated every 50) on
            the embedded Ray with 2 workers: its wall time from `metapeft run` and where
            it went (~15 minutes)
  flops     the MiniLM encoder's LoRA inner step (jobs/wordnet-fomaml.yaml, 2 and 20 tasks)
            and SmolLM2-135M's (cached path, float32, 25 prompts): FLOPs counted per step,
            the FLOP/s achieved and the float32 GEMM rate of the same products, timed
            alternately (bench/flops.py)
  metrics   tasks/s with metrics recorded, served and scraped vs metrics off (embedded
            Ray with 2 workers, and in-process), paired per round
  text      LoRA inits for the MiniLM encoder meta-learned on WordNet supersenses and
            fortune topics vs the standard LoRA init and head-only tuning, cross-domain,
            amortized cost, peak memory per algorithm (bench/text_bench.py; hours)
  select    RQ2 on the text runs: the outcome predictor's pick vs the single best
            configuration and the similarity rule, among the WordNet and fortunes inits,
            the standard LoRA init at rank 4 on the top layer and at rank 8 on the top
            two, and head-only tuning, 45 query texts per class (bench/select_bench.py;
            ~50 minutes)
  llm       SmolLM2-135M-Instruct: the meta-learned LoRA init (jobs/smollm2-wordnet- and
            -fortunes-fomaml.yaml, meta-trained here) vs standard LoRA, zero-shot and
            in-context prompting on 100 meta-test tasks at 1 and 5 shots, steps to the
            target against the standard init fine-tuned with mlx-lm's Adam, RQ3, peak
            memory (bench/llm_bench.py), then one inner step cached vs all layers, float32
            vs 4-bit (bench/causal_lm_step.py); hours on two cores. BENCH_LLM_WORDNET_RUN /
            BENCH_LLM_FORTUNES_RUN name finished runs to evaluate instead of training
  hyper     on digits: the LoRA hypernetwork (jobs/digits-hyper.yaml) against first-order
            MAML of the same adapters (jobs/digits-lora-fomaml.yaml), 0-10 steps at 1 and
            5 shots, paired (bench/hyper_compare.py); then RQ2 on digits among those two,
            digits-fomaml (all weights), standard LoRA at ranks 4 and 8, head-only and
            full fine-tuning from the pretrained base, and the support-set rules, at 5
            and at 1 shot, for meta-training seeds 0, 1 and 2 (~12 minutes)
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metapeft_dist  # noqa: E402,F401  (loads OpenBLAS before mlx)
from metapeft_dist.config import load_spec  # noqa: E402
from metapeft_dist.job import build_job  # noqa: E402
from metapeft_dist.runner import run_job  # noqa: E402
from metapeft_dist.training import meta_train  # noqa: E402
from metapeft_dist.trainer import MetaTrainer  # noqa: E402
from hyper_compare import compare as hyper_compare  # noqa: E402  (bench/)
from llm_bench import bench_llm  # noqa: E402
from select_bench import bench_select  # noqa: E402  (bench/, the script's directory)
from text_bench import bench_text  # noqa: E402

OUT = ROOT / ".bench"
REFERENCE_ITERATIONS_PER_SECOND = 42.0  # the PyTorch library on this setup (issue text)
ALGORITHMS = ("reptile", "fomaml", "maml", "metasgd", "mamlpp")


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def bench_blas() -> dict:
    code = ("import time, metapeft_dist, mlx.core as mx\n"
            "a = mx.random.normal((1024, 1024)); mx.eval(a @ a)\n"
            "ts = []\n"
            "for _ in range(5):\n"
            "    t = time.perf_counter(); mx.eval(a @ a); ts.append(time.perf_counter() - t)\n"
            "print(sorted(ts)[2])\n")
    out = {}
    for label, env in (("bundled", {"METAPEFT_OPENBLAS": "off"}), ("openblas", {})):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, **env), check=True)
        out[label] = float(run.stdout.strip())
    out["speedup"] = out["bundled"] / out["openblas"]
    print(f"matmul 1024^3 float32: bundled BLAS {1000 * out['bundled']:.1f} ms, "
          f"OpenBLAS {1000 * out['openblas']:.1f} ms ({out['speedup']:.1f}x)")
    return out


def bench_speed() -> dict:
    variants = [("loop", "false", 150), ("vmap", "false", 600), ("loop", "true", 150),
                ("vmap", "true", 1500)]
    out = {}
    print(f"{'batching':<10}{'compile':<9}{'it/s (median of 3)':>20}{'x reference':>13}")
    for batching, compiled, iterations in variants:
        rates = []
        for _ in range(3):
            rates.append(_sinusoid_rate(iterations, [f"run.batching={batching}",
                                                     f"run.compile={compiled}"])[0])
        rate = statistics.median(rates)
        key = f"{batching}{'+compile' if compiled == 'true' else ''}"
        out[key] = {"iterations_per_second": rate, "runs": rates}
        ratio = rate / REFERENCE_ITERATIONS_PER_SECOND
        print(f"{batching:<10}{compiled:<9}{rate:>20.1f}{ratio:>12.1f}x", flush=True)
    best = max(out, key=lambda k: out[k]["iterations_per_second"])
    print(f"fastest: {best}; vs the per-task loop: "
          f"{out[best]['iterations_per_second'] / out['loop']['iterations_per_second']:.1f}x; "
          f"target >= {5 * REFERENCE_ITERATIONS_PER_SECOND:.0f} it/s")
    out["breakdown"] = bench_step_breakdown()
    out["jax"] = bench_against_jax()
    return out


def bench_step_breakdown(iterations: int = 400, steps: int = 2000) -> dict:
    """Where a sinusoid meta-iteration's time goes on the fastest path, second and first
    order: sampling the tasks (numpy), copying them into MLX, building the compiled
    step's graph (the call, lazy), MLX dispatching it (``mx.async_eval``: walking the
    graph, allocating each primitive's output and queueing its kernel, on the calling
    thread), the wait for the kernels still queued, reading the loss and gradient norm
    back; each alone, one iteration at a time (medians of ``iterations``, microseconds).
    Then ``steps`` of the trainer's own step in order, which queues each iteration
    behind the one before (trainer.py): its time, and the CPU time each thread spent
    per step (the calling thread, MLX's stream thread, the task sampler; Linux only);
    and the size of the step's graph before compilation fuses it (primitives)."""
    import io

    import mlx.core as mx

    from metapeft_dist.job import to_mx

    out = {}
    for order, algorithm in (("second", "maml"), ("first", "fomaml")):
        spec = load_spec(ROOT / "jobs" / "sinusoid-maml.yaml",
                         ["runtime.mode=local", f"algorithm.name={algorithm}",
                          f"algorithm.iterations={10 * steps}", "eval.every=0"])
        job = build_job(spec)
        trainer = MetaTrainer(job)
        for i in range(20):
            trainer.step(i)
        parts: dict[str, list[float]] = {k: [] for k in
                                         ("sample", "copy", "build", "dispatch", "wait",
                                          "read")}
        fn, inputs = trainer.step_fn(None), job.algorithm.step_inputs(0)
        for i in range(iterations):
            t0 = time.perf_counter()
            episode = job.episodes("train", i, range(spec.algorithm.meta_batch))
            t1 = time.perf_counter()
            batch = to_mx(episode)
            mx.eval(batch)
            t2 = time.perf_counter()
            loss, norm = fn(batch, inputs)
            t3 = time.perf_counter()
            mx.async_eval(loss, norm, trainer.holder, trainer.optimizer.state)
            t4 = time.perf_counter()
            mx.eval(loss, norm, trainer.holder, trainer.optimizer.state)
            t5 = time.perf_counter()
            loss.item(), norm.item()
            t6 = time.perf_counter()
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4,
                                            t6 - t5), strict=True):
                parts[key].append(seconds)
        row = {k: 1e6 * statistics.median(v) for k, v in parts.items()}
        before, start = _thread_cpu(), time.perf_counter()
        for i in range(20, 20 + steps):
            trainer.step(i)
        row["step"] = 1e6 * (time.perf_counter() - start) / steps
        row.update({f"cpu_{role}": 1e6 * seconds / steps
                    for role, seconds in _cpu_by_role(before, _thread_cpu()).items()})
        trainer.close()
        grad, loss = job.algorithm.batch_grad(job.initial_meta, job.loss_fn(), batch, inputs)
        dot = io.StringIO()
        mx.export_to_dot(dot, loss, grad)
        row["primitives"] = dot.getvalue().count("shape=rectangle")
        out[order] = row
    print(f"where a meta-iteration's time goes (us, median of {iterations}):")
    columns = ("sample", "copy", "build", "dispatch", "wait", "read", "step", "primitives")
    print(f"{'':<10}" + "".join(f"{k:>11}" for k in columns))
    for order, row in out.items():
        print(f"{order:<10}" + "".join(f"{row[k]:>11.0f}" for k in columns))
    print("(dispatch: mx.async_eval's own time on the calling thread; wait: until the "
          "kernels queued are done; step: the trainer's, in order, the next iteration "
          "queued behind each; primitives: the step's graph before compilation fuses it)",
          flush=True)
    if "cpu_caller" in out["second"]:
        print("CPU per trainer step by thread (us): " + "; ".join(
            f"{order} order: calling thread {row['cpu_caller']:.0f}, MLX's stream thread "
            f"{row['cpu_mlx']:.0f}, task sampler {row['cpu_sampler']:.0f}"
            for order, row in out.items()))
        print("(MLX runs a CPU stream's kernels on a thread of its own, fed by the calling "
              "thread's dispatch, which blocks while more than ~100 are queued; the "
              "sampler prefetches the next iteration's tasks; all three share the cores)",
              flush=True)
    return out


def _thread_cpu() -> dict[int, float] | None:
    """CPU seconds each thread of this process has used, by native thread id (Linux's
    /proc; None elsewhere)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def _cpu_by_role(before: dict[int, float] | None,
                 after: dict[int, float] | None) -> dict[str, float]:
    """The CPU seconds used between two :func:`_thread_cpu` readings: the calling
    (main) thread's, the task sampler's and the rest (MLX's stream thread: no Python
    thread but the two runs code here), empty where threads can't be read."""
    if before is None or after is None:
        return {}
    python = {t.native_id: t.name for t in threading.enumerate()}
    used = {"caller": 0.0, "sampler": 0.0, "mlx": 0.0}
    for tid, seconds in after.items():
        name = python.get(tid, "")
        role = ("caller" if tid == threading.get_native_id() else
                "sampler" if name.startswith("task-sampler") else
                "mlx" if not name else None)
        if role is not None:
            used[role] += seconds - before.get(tid, 0.0)
    return used


JAX_VERSION = "0.10.2"


def _jax_python() -> Path | None:
    """The interpreter of .bench/jax-venv (made here, with JAX, the first time): JAX is
    installed for the bench only, never into the package's environment."""
    venv = OUT / "jax-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing JAX {JAX_VERSION} into {venv} (the bench's reference only)",
              flush=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)])
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q",
                              f"jax=={JAX_VERSION}"]) if made.returncode == 0 else made
        if pip.returncode != 0:
            import shutil

            shutil.rmtree(venv, ignore_errors=True)
            return None
    return python


def _sinusoid_rate(iterations: int, overrides: list[str]) -> tuple[float, float]:
    """jobs/sinusoid-maml.yaml's meta-iterations per second in process, as a run reports
    them, after 10 warm-up steps (compilation, caches); ``overrides`` on top (default:
    the fastest path, vmap + compile); and the process's CPU seconds per meta-iteration
    (all its threads)."""
    spec = load_spec(ROOT / "jobs" / "sinusoid-maml.yaml",
                     ["runtime.mode=local", f"algorithm.iterations={iterations}",
                      "eval.every=0", "eval.select=last", "checkpoint.every=0", *overrides])
    job = build_job(spec)
    trainer = MetaTrainer(job)
    for i in range(10):
        trainer.step(i)
    start = time.process_time()
    summary, _ = meta_train(job, trainer, OUT / "tmp-run")
    return summary["iterations_per_second"], (time.process_time() - start) / iterations


def bench_against_jax(rounds: int = 3, iterations: int = 1500) -> dict:
    """The same MAML written in JAX (bench/jax_maml.py) against metapeft's fastest path,
    first and second order, alternating within each round; the median of the rounds'
    ratios (the goal: at least 1.0)."""
    python = _jax_python()
    if python is None:
        print("  JAX reference skipped: JAX could not be installed", flush=True)
        return {"skipped": "JAX could not be installed"}
    out = {}
    for order, algorithm in (("second", "maml"), ("first", "fomaml")):
        rows = []
        for _ in range(rounds):
            ours, cpu = _sinusoid_rate(iterations, [f"algorithm.name={algorithm}"])
            run = subprocess.run([str(python), str(ROOT / "bench" / "jax_maml.py"),
                                  "--order", order, "--iterations", str(iterations)],
                                 capture_output=True, text=True, check=True)
            theirs = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append({"metapeft": ours, "jax": theirs["iterations_per_second"],
                         "ratio": ours / theirs["iterations_per_second"],
                         "metapeft_cpu_us": 1e6 * cpu,
                         "jax_cpu_us": 1e6 * theirs["cpu_seconds_per_iteration"]})
        ratio = statistics.median(r["ratio"] for r in rows)
        out[order] = {"rounds": rows, "median_ratio": ratio,
                      "metapeft_cpu_us": statistics.median(r["metapeft_cpu_us"] for r in rows),
                      "jax_cpu_us": statistics.median(r["jax_cpu_us"] for r in rows)}
        print(f"{order}-order MAML, meta-it/s per round: metapeft "
              + " / ".join(f"{r['metapeft']:.0f}" for r in rows) + ", JAX "
              + " / ".join(f"{r['jax']:.0f}" for r in rows)
              + f"; median ratio {ratio:.2f}x (goal >= 1.0); CPU per meta-iteration "
              f"(all threads, median): metapeft {out[order]['metapeft_cpu_us']:.0f} us, "
              f"JAX {out[order]['jax_cpu_us']:.0f} us", flush=True)
    return out


def _run(spec_path: Path, overrides=()) -> dict:
    spec = load_spec(spec_path, overrides)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return run_job(spec, OUT / "runs" / f"{spec.name}-{stamp}")


def _at(summary: dict, init: str, step: int) -> tuple[float, float]:
    entry = summary["inits"][init]
    return entry["mean"][step], entry["ci95"][step]


def bench_sinusoid() -> dict:
    results = _run(ROOT / "jobs" / "sinusoid-maml.yaml")
    s10 = results["evaluation"]["shots"]["10"]
    (m1, c1), (m10, c10) = _at(s10, "meta", 1), _at(s10, "meta", 10)
    rate = results["meta_training"]["iterations_per_second"]
    print(f"K=10, 600 tasks x 100 query points: MSE after 1 step {m1:.3f} ± {c1:.3f} "
          f"(target <= 0.55), after 10 steps {m10:.3f} ± {c10:.3f} (target <= 0.15); "
          f"meta-training {rate:.0f} it/s")
    return {"mse_1_step": [m1, c1], "mse_10_steps": [m10, c10], "iterations_per_second": rate,
            "run_dir": results["run_dir"]}


def bench_digits() -> dict:
    out = {}
    print(f"{'algorithm':<10}{'k':>3}{'1-shot meta':>15}{'1-shot random':>15}"
          f"{'gain (paired)':>15}{'5-shot meta':>14}{'5-shot @10':>13}{'minutes':>9}")
    for name in ALGORITHMS:
        t0 = time.time()
        results = _run(ROOT / "jobs" / f"digits-{name}.yaml")
        ev = results["evaluation"]
        k = ev["inner_steps"]
        one, five = ev["shots"]["1"], ev["shots"]["5"]
        m1, r1 = _at(one, "meta", k), _at(one, "random", k)
        gain = (one["gain_over"]["random"]["mean"][k], one["gain_over"]["random"]["ci95"][k])
        m5, m5_10 = _at(five, "meta", k), _at(five, "meta", ev["steps"])
        out[name] = {"k": k, "one_shot_meta": m1, "one_shot_random": r1, "one_shot_gain": gain,
                     "five_shot_meta": m5, "five_shot_meta_10_steps": m5_10,
                     "selected_iteration": results["meta_training"]["selected_iteration"],
                     "run_dir": results["run_dir"]}
        pct = lambda v: f"{100 * v[0]:.1f}±{100 * v[1]:.1f}"  # noqa: E731
        print(f"{name:<10}{k:>3}{pct(m1):>15}{pct(r1):>15}{pct(gain):>15}{pct(m5):>14}"
              f"{pct(m5_10):>13}{(time.time() - t0) / 60:>9.1f}", flush=True)
    print("targets: 1-shot gain >= 20 points, 5-shot >= 80%, both after k steps (the "
          "inner-loop count the init was meta-trained for)")
    return out


def bench_gaussian() -> dict:
    out = {}
    for path in sorted((ROOT / "jobs").glob("gaussian-*.yaml")):
        results = _run(path)
        ev = results["evaluation"]
        k = ev["inner_steps"]
        five = ev["shots"]["5"]
        m, r = _at(five, "meta", k), _at(five, "random", k)
        m10 = _at(five, "meta", ev["steps"])
        out[path.stem] = {"k": k, "meta": m, "random": r, "meta_10_steps": m10}
        print(f"{path.stem}: 5 examples per class, after {k} steps: meta {100 * m[0]:.1f} ± "
              f"{100 * m[1]:.1f}%, random {100 * r[0]:.1f} ± {100 * r[1]:.1f}%; after "
              f"{ev['steps']} steps: meta {100 * m10[0]:.1f}% (target >= 70%)", flush=True)
    return out


DISTRIBUTED_SPEC = """
name: bench-distributed
family: {name: digits, ways: 5, shots: 5, query: 15}
model: {kind: mlp, hidden: [1024, 1024], lora: {rank: 8, alpha: 16}, train: lora}
algorithm: {name: maml, meta_batch: 8, iterations: 12}
inner: {steps: 15, lr: 0.1}
runtime: {mode: sync, chunk: 1}
"""


def bench_distributed(rounds: int = 5) -> dict:
    """Sync meta-iterations of ~0.1 s tasks (second-order MAML, 15 inner steps, LoRA on a
    1024-wide MLP) with 1 and 2 Ray workers, against the same per-task computation called
    in this process. This machine's speed drifts by tens of percent over minutes, so each
    round measures all three back to back and the ratios are paired within a round."""
    import ray

    from metapeft_dist.config import parse_spec
    from metapeft_dist.runtime.connection import connect
    from metapeft_dist.runtime.driver import RayExecutor
    from metapeft_dist.runtime.worker import Worker
    from metapeft_dist.wire import TreeSpec, encode

    spec = parse_spec(DISTRIBUTED_SPEC)
    job = build_job(spec)
    batch = spec.algorithm.meta_batch
    warmup, timed = 2, 6
    in_process = Worker(spec.to_dict())
    frame = encode(job.initial_meta, 0)
    in_process.run(0, frame, 0, 0, 1)

    def in_process_seconds(iteration: int) -> float:
        times = []
        for index in range(batch):
            t0 = time.perf_counter()
            in_process.run(0, frame, iteration, index, 1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def ray_run(workers: int, iteration: int) -> dict:
        """Timed sync iterations; for one worker, the in-process loop is timed in the
        same Ray session (cluster idle) right before and after, to cancel drift."""
        connect(None, workers)  # the embedded Ray a user's `metapeft run` starts
        try:
            executor = RayExecutor(job)
            for it in range(warmup):
                executor.step(it)
            before = in_process_seconds(iteration) if workers == 1 else None
            t0 = time.perf_counter()
            for it in range(warmup, warmup + timed):
                executor.step(it)
            seconds = time.perf_counter() - t0
            after = in_process_seconds(iteration) if workers == 1 else None
            stats = executor.stats()
            executor.close()
        finally:
            ray.shutdown()
        chunks = sum(w["chunks"] for w in stats["per_worker"].values())
        compute = sum(w["compute_seconds"] for w in stats["per_worker"].values())
        return {"seconds_per_task": seconds / (timed * batch), "stats": stats,
                "worker_compute_per_task": compute / chunks,
                "in_process": (before + after) / 2 if workers == 1 else None}

    rows = []
    for r in range(rounds):
        one, two = ray_run(1, 1 + r), ray_run(2, 1 + r)
        row = {"in_process": one["in_process"], "one": one["seconds_per_task"],
               "two": two["seconds_per_task"], "one_compute": one["worker_compute_per_task"],
               "update": one["stats"]["update_seconds_median"],
               "bytes_out": one["stats"]["bytes_out_per_task"],
               "bytes_in": one["stats"]["bytes_in_per_chunk"]}
        row["speedup"] = row["one"] / row["two"]
        row["overhead"] = row["one"] / row["in_process"] - 1
        row["overhead_vs_worker"] = row["one"] / row["one_compute"] - 1
        rows.append(row)
        print(f"round {r + 1}: in-process {1000 * row['in_process']:.0f} ms/task, 1 worker "
              f"{1000 * row['one']:.0f} ms/task (its own compute {1000 * row['one_compute']:.0f}"
              f" ms), 2 workers {1000 * row['two']:.0f} ms/task: speedup {row['speedup']:.2f}x,"
              f" overhead {100 * row['overhead']:+.1f}% ({100 * row['overhead_vs_worker']:+.1f}%"
              " against the worker's own compute)", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    full = TreeSpec.of(job.model.init(mx_key(0))).nbytes
    print(f"median of {rounds} rounds: speedup {med['speedup']:.2f}x (target >= 1.6x); overhead "
          f"{100 * med['overhead']:+.1f}% against in-process, "
          f"{100 * med['overhead_vs_worker']:+.1f}%"
          f" against the worker's own compute (target <= 5%); 2 workers "
          f"{1 / med['two']:.1f} tasks/s, 1 worker {1 / med['one']:.1f}; parameter-server update "
          f"{1000 * med['update']:.1f} ms; wire {med['bytes_out']:.0f} B out and "
          f"{med['bytes_in']:.0f} B in per task (LoRA adapters and head only; the whole "
          f"network is {full} B)")
    return {"rounds": rows, "median": med, "full_weights_bytes": full}


EVALUATION_SPEC = """
name: bench-evaluation
family: {name: digits, ways: 5, shots: 1, query: 15}
model: {kind: mlp, hidden: [64, 64]}
algorithm: {name: maml, meta_batch: 16, iterations: 1}
runtime: {mode: sync, chunk: 8}
inner: {steps: 3, lr: 0.4}
eval: {tasks: 600, shots: [1, 5], steps: 10, chunk: 50, baselines: [random, head],
       finetune: {steps: 0}}
"""


def bench_evaluation(rounds: int = 3) -> dict:
    """The final evaluation of the quickstart's size (600 digits tasks at 1 and 5 shots,
    3 inits, 10 steps, no fine-tune) on the embedded Ray's workers, 1 and 2 of them,
    and in this process; per round all three back to back, the ratios paired within it.
    Each Ray evaluation is timed twice on the same workers: cold (their first, which
    compiles, as in a run) and warm."""
    import ray

    from metapeft_dist.config import parse_spec
    from metapeft_dist.evaluate import evaluate_job
    from metapeft_dist.runtime.connection import connect
    from metapeft_dist.runtime.driver import RayExecutor

    job = build_job(parse_spec(EVALUATION_SPEC))
    meta = job.initial_meta

    def on_ray(workers: int) -> tuple[float, float, dict]:
        connect(None, workers)
        try:
            executor = RayExecutor(job)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                result = evaluate_job(job, meta, scorer=executor.scorer())
                times.append(time.perf_counter() - t0)
            executor.close()
        finally:
            ray.shutdown()
        return times[0], times[1], result

    def here() -> tuple[float, dict]:
        t0 = time.perf_counter()
        result = evaluate_job(job, meta)
        return time.perf_counter() - t0, result

    rows = []
    for r in range(rounds):
        local_seconds, local = here()
        one_cold, one_warm, one = on_ray(1)
        two_cold, two_warm, two = on_ray(2)
        same = one["shots"] == local["shots"] == two["shots"]
        row = {"in_process": local_seconds, "one_cold": one_cold, "one_warm": one_warm,
               "two_cold": two_cold, "two_warm": two_warm,
               "speedup_cold": one_cold / two_cold, "speedup_warm": one_warm / two_warm,
               "equal_to_in_process": same}
        rows.append(row)
        print(f"round {r + 1}: in-process {local_seconds:.2f} s; 1 worker {one_cold:.2f} s "
              f"cold, {one_warm:.2f} s warm; 2 workers {two_cold:.2f} s cold, "
              f"{two_warm:.2f} s warm: speedup {row['speedup_cold']:.2f}x cold, "
              f"{row['speedup_warm']:.2f}x warm; curves equal to in-process: {same}",
              flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]
           if k != "equal_to_in_process"}
    print(f"median of {rounds} rounds: 2 workers over 1 {med['speedup_cold']:.2f}x cold, "
          f"{med['speedup_warm']:.2f}x warm (target >= 1.6x); 2 workers "
          f"{med['two_cold']:.2f} s cold against {med['in_process']:.2f} s in-process")
    return {"rounds": rows, "median": med}


JSONL_SPEC = """
name: bench-jsonl-40
family: {{name: jsonl, path: {path}, ways: 5, shots: 5, query: 10}}
model: {{kind: encoder, train: lora, lora: {{rank: 4, layers: 1}}}}
algorithm: {{name: fomaml, meta_batch: 10, iterations: 200}}
runtime: {{mode: sync, workers: 2}}
eval: {{tasks: 60, shots: [1, 5], every: 50, val_tasks: 20}}
"""


def write_jsonl_tasks(directory: Path, tasks: int = 40, ways: int = 5, per_label: int = 20,
                      seed: int = 0) -> Path:
    """``tasks`` JSONL task files a user could have written: each ``ways`` WordNet
    supersenses (the shipped corpus) with ``per_label`` of their glosses, drawn with
    ``seed`` (the same files on every machine)."""
    import numpy as np

    from metapeft_dist.tasks.text import shipped_corpus

    corpus = shipped_corpus("wordnet")
    members = corpus.members()
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for t in range(tasks):
        lines = []
        for c in sorted(rng.choice(len(corpus.names), ways, replace=False)):
            for i in rng.choice(members[c], per_label, replace=False):
                lines.append(json.dumps({"text": corpus.texts[i], "label": corpus.names[c]}))
        (directory / f"task-{t:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def bench_jsonl() -> dict:
    """A user's text job on a directory of 40 JSONL tasks (issue 21's: 5-way, MiniLM,
    LoRA rank 4 on the top layer, FOMAML, meta-batch 10, 200 iterations, 60 meta-test
    tasks at 1 and 5 shots, 20 meta-validation tasks every 50 iterations, the embedded
    Ray with 2 workers), run as `metapeft run` runs it: the job's wall time and where it
    went."""
    data = write_jsonl_tasks(OUT / "jsonl-40")
    spec_path = OUT / "bench-jsonl-40.yaml"
    spec_path.write_text(JSONL_SPEC.format(path=data))
    run_dir = OUT / "runs" / f"bench-jsonl-40-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "metapeft"), "run", str(spec_path),
                    "--run-dir", str(run_dir)], check=True)
    wall = time.perf_counter() - t0
    results = json.loads((run_dir / "results.json").read_text())
    timing = results["timing"]
    print(f"the 40-task JSONL job: {wall:.0f} s wall ({wall / 60:.1f} min) from `metapeft "
          f"run`; meta-training {timing['meta_training']:.0f} s, waiting for "
          f"meta-validation {timing['validation']:.0f} s, final evaluation "
          f"{timing['evaluation']:.0f} s; spec {spec_path}", flush=True)
    return {"wall_seconds": wall, "timing": timing, "run_dir": str(run_dir),
            "spec": str(spec_path)}


def bench_flops() -> dict:
    """The encoder's and SmolLM2's LoRA inner steps against this machine's float32 GEMM
    rate at the same shapes (bench/flops.py)."""
    from flops import main as flops_main  # bench/

    return flops_main(["--llm"])


METRICS_SPEC = """
name: bench-metrics
family: {name: digits, ways: 5, shots: 1, query: 15}
model: {kind: mlp, hidden: [64, 64]}
algorithm: {name: maml, meta_batch: 16, iterations: 100000}
runtime: {mode: sync, chunk: 4}
inner: {steps: 3, lr: 0.4}
"""


def bench_metrics(pairs: int = 16) -> dict:
    """Tasks per second with metrics recorded, served and scraped every second (harder
    than monitoring/prometheus.yml's 5 s) against metrics off, on small tasks (~1 ms
    chunks of 4 digit tasks: the most results, so the most recording, per second), on
    the embedded Ray with 2 workers and in-process (runtime.mode: local).

    One executor runs throughout; its metrics are switched on and off every block of
    iterations (about a second: 40 iterations on Ray, 400 in-process), and each
    on-block is paired with the off-block beside it (order alternating), so this
    machine's drift cancels within a pair. Also: the driver's
    recording cost per chunk, timed directly."""
    import threading
    import urllib.request

    import ray

    from metapeft_dist.config import parse_spec
    from metapeft_dist.cost import SpendMeter
    from metapeft_dist.metrics import JobMetrics, MetricsServer, NoMetrics
    from metapeft_dist.runtime.connection import connect
    from metapeft_dist.runtime.driver import RayExecutor

    spend = SpendMeter({})
    on = JobMetrics("bench", "maml", spend=spend)
    off = NoMetrics()
    on.job_started("digits", "sync", 10**6, 2, None, None)
    server, stop = MetricsServer(on.registry, "127.0.0.1", 0), threading.Event()

    def scrape() -> None:
        while not stop.wait(1.0):
            urllib.request.urlopen(server.url, timeout=5).read()

    threading.Thread(target=scrape, daemon=True).start()
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        on.chunk_done("node", 4, 3, 0.001, 0.001, 0.002, 1000, 1000)
    record_seconds = (time.perf_counter() - t0) / n
    print(f"recording one chunk's metrics: {1e6 * record_seconds:.1f} us", flush=True)

    out: dict = {"record_seconds_per_chunk": record_seconds}
    try:
        for mode in ("sync", "local"):
            spec = parse_spec(METRICS_SPEC.replace("mode: sync", f"mode: {mode}"))
            job = build_job(spec)
            if mode == "sync":
                connect(None, 2)
                executor = RayExecutor(job, metrics=off, spend=spend)
            else:
                executor = MetaTrainer(job, metrics=off, spend=spend)
            it = 0
            block = 40 if mode == "sync" else 400

            def run_block(metrics, executor=executor, spec=spec, block=block) -> float:
                nonlocal it
                executor.metrics = metrics
                t0 = time.perf_counter()
                for _ in range(block):
                    executor.step(it)
                    it += 1
                return block * spec.algorithm.meta_batch / (time.perf_counter() - t0)

            try:
                for _ in range(3):  # warm-up: workers up, graphs compiled
                    run_block(off)
                rows = []
                for p in range(pairs):
                    order = (on, off) if p % 2 == 0 else (off, on)
                    rate = {id(m): run_block(m) for m in order}
                    rows.append({"on": rate[id(on)], "off": rate[id(off)],
                                 "ratio": rate[id(on)] / rate[id(off)]})
            finally:
                executor.close()
                if mode == "sync":
                    ray.shutdown()
            med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
            chunks_per_second = med["off"] / (spec.runtime.chunk if mode == "sync"
                                              else spec.algorithm.meta_batch)
            print(f"{mode}: {pairs} paired blocks of {block} iterations: median metrics on "
                  f"{med['on']:.0f} tasks/s, off {med['off']:.0f}; on/off {med['ratio']:.3f} "
                  f"({100 * (med['ratio'] - 1):+.1f}%; target: within 2%); recording costs "
                  f"{100 * record_seconds * chunks_per_second:.2f}% of the driver's time at "
                  f"{chunks_per_second:.0f} results/s", flush=True)
            out[mode] = {"pairs": rows, "median": med, "results_per_second": chunks_per_second}
    finally:
        stop.set()
        server.stop()
    return out


def mx_key(seed: int):
    import mlx.core as mx

    return mx.random.key(seed)


_TEXT_RUNS: dict[str, str] = {}


def bench_text_section() -> dict:
    out = bench_text(_run, ROOT)
    _TEXT_RUNS.update({k: v["run_dir"] for k, v in out.items()
                       if isinstance(v, dict) and "run_dir" in v})
    return out


def bench_select_section() -> dict:
    """RQ2 on the text section's WordNet and fortunes runs (run `text` first, or name
    finished runs in BENCH_WORDNET_RUN and BENCH_FORTUNES_RUN)."""
    wordnet = os.environ.get("BENCH_WORDNET_RUN") or _TEXT_RUNS.get("wordnet-fomaml")
    fortunes = os.environ.get("BENCH_FORTUNES_RUN") or _TEXT_RUNS.get("fortunes-fomaml")
    if not (wordnet and fortunes):
        print("  skipped: needs the text section's runs, or BENCH_WORDNET_RUN and "
              "BENCH_FORTUNES_RUN", flush=True)
        return {"skipped": "no text runs"}
    # a LoRA configuration no run was meta-trained with: rank 8 on the top two layers
    wider = _variant("wordnet-fomaml", "wordnet-lora-r8-top2",
                     {"rank": 8, "alpha": 8.0, "layers": 2})
    # 45 query texts per class (WordNet's smallest test category has 51): one example is
    # 0.4 points, so the "within 1 point" figure measures the predictor, not the query draw
    return bench_select(["wordnet", "fortunes"], [wordnet, fortunes, str(wider)],
                        cache=OUT / "select-cache", query=45)


def _variant(job: str, name: str, lora: dict) -> Path:
    """A copy of jobs/JOB.yaml with other LoRA settings, written to .bench/NAME.yaml."""
    import yaml

    plain = load_spec(ROOT / "jobs" / f"{job}.yaml").to_dict()
    plain["name"] = name
    plain["model"]["lora"] = {**plain["model"]["lora"], **lora}
    path = OUT / f"{name}.yaml"
    OUT.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    return path


RQ2_SEEDS = (0, 1, 2)  # meta-training seeds of the digits RQ2 measurement
RQ2_RULES = ("predictor", "predictor_cv", "global", "support_cv", "support_fit")


def bench_hyper_section() -> dict:
    """The digits hypernetwork against FOMAML of the same adapters, and RQ2 on digits at 5
    and 1 shots, for three meta-training seeds of the three runs (the task draws and the
    standard configurations stay the same)."""
    runs = {name: _run(ROOT / "jobs" / f"{name}.yaml")["run_dir"]
            for name in ("digits-lora-fomaml", "digits-hyper", "digits-fomaml")}
    out: dict = {"runs": runs,
                 "compare": hyper_compare(runs["digits-hyper"], runs["digits-lora-fomaml"], 300)}
    rank8 = _variant("digits-lora-fomaml", "digits-lora-r8", {"rank": 8, "alpha": 8.0})
    by_seed: dict = {}
    for seed in RQ2_SEEDS:
        if seed:  # selection needs the selected checkpoint only: a short evaluation
            runs = {name: _run(ROOT / "jobs" / f"{name}.yaml",
                               [f"seed={seed}", "eval.tasks=20"])["run_dir"]
                    for name in ("digits-lora-fomaml", "digits-hyper", "digits-fomaml")}
        for shots, name in ((5, "select"), (1, "select_1shot")):
            print(f"RQ2 on digits, meta-training seed {seed}, {shots} shot(s):", flush=True)
            # query 169: every image of a class's smallest (174) but the shots
            result = bench_select(["digits"], [runs["digits-lora-fomaml"], runs["digits-hyper"],
                                               runs["digits-fomaml"], str(rank8)],
                                  tasks=150, cache=OUT / "select-cache", query=169, cv=True,
                                  shots=shots)
            if seed == RQ2_SEEDS[0]:
                out[name] = result
            by_seed.setdefault(shots, {})[seed] = {
                "runs": dict(runs), "noise_ceiling": result["noise_ceiling_within_1pt"],
                **{rule: result[f"{rule}_within_1pt"] for rule in RQ2_RULES
                   if f"{rule}_within_1pt" in result}}
    out["rq2_seeds"] = by_seed
    print("RQ2 on digits: best or within 1 point of it, per meta-training seed "
          f"{', '.join(map(str, RQ2_SEEDS))} (150 meta-test tasks each)", flush=True)
    for shots, seeds in by_seed.items():
        rows = {rule: [seeds[s][rule][0] for s in RQ2_SEEDS]  # a rule's rate: [mean, ci95]
                for rule in RQ2_RULES if rule in seeds[RQ2_SEEDS[0]]}
        rows["noise_ceiling"] = [seeds[s]["noise_ceiling"] for s in RQ2_SEEDS]
        for rule, values in rows.items():
            print(f"  {shots} shot(s) {rule:<14} "
                  + "  ".join(f"{100 * v:5.1f}%" for v in values)
                  + f"   mean {100 * statistics.mean(values):5.1f}%", flush=True)
    return out


def bench_llm_section() -> dict:
    names = {family: f"BENCH_LLM_{family.upper()}_RUN" for family in ("wordnet", "fortunes")}
    runs = {family: os.environ[name] for family, name in names.items() if os.environ.get(name)}
    out = bench_llm(_run, runs=runs)
    step = subprocess.run([sys.executable, str(ROOT / "bench" / "causal_lm_step.py"),
                           "--build-texts", "200"], capture_output=True, text=True)
    print(step.stdout, end="", flush=True)
    out["step"] = step.stdout.splitlines()
    return out


SECTIONS = {"blas": bench_blas, "speed": bench_speed, "sinusoid": bench_sinusoid,
            "digits": bench_digits, "gaussian": bench_gaussian,
            "distributed": bench_distributed, "evaluation": bench_evaluation,
            "jsonl": bench_jsonl, "flops": bench_flops, "metrics": bench_metrics,
            "text": bench_text_section, "select": bench_select_section,
            "hyper": bench_hyper_section, "llm": bench_llm_section}


def main(argv: list[str]) -> None:
    chosen = argv or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    OUT.mkdir(exist_ok=True)
    report = {"started": datetime.now().isoformat(), "machine": os.uname().nodename,
              "cpus": os.cpu_count()}
    for name in chosen:
        section(name)
        report[name] = SECTIONS[name]()
    path = OUT / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
