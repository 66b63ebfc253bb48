"""The Ray runtime on a real multi-node cluster on this machine (ray.cluster_utils: a
head plus three nodes that each declare `mlx: 1`): sync results are bitwise identical
for any worker count and any faults; a killed node or worker costs nothing but time;
a SIGKILLed driver resumes bitwise; async never applies a result staler than S; on
nodes of two machine kinds sync agrees to float32 rounding, not to the bit."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from metapeft_dist.config import parse_spec
from metapeft_dist.runner import run_job
from metapeft_dist.runtime.checkpoint import list_checkpoints, load_checkpoint

from conftest import TOPICS

SPEC = """
name: cluster
family: {name: sinusoid, shots: 5, query: 5}
model: {hidden: [32, 32]}
algorithm: {name: maml, meta_batch: 6, iterations: 16}
inner: {steps: 2, lr: 0.01}
eval: {tasks: 8, shots: [5], steps: 2, every: 0, select: last, baselines: [random], chunk: 1,
       target: 0.01, finetune: {steps: 12}}
checkpoint: {every: 4, keep: 3}
runtime: {chunk: 2}
"""
# eval.target: an MSE no init reaches here, so the standard init's fine-tune takes its
# whole (12-step) budget: 5 scored steps (0, 1, 2, 10, 12)
CHUNKS_PER_ITERATION = 3


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    # A node's death is noticed in ~1.5 s instead of Ray's default ~15 s (five missed
    # health checks 3 s apart): the fault tests wait for it.
    health = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
              "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": health})
    for _ in range(3):
        c.add_node(num_cpus=1, resources={"mlx": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _spec(*overrides):
    return parse_spec(SPEC, overrides=list(overrides))


def _final_meta(results):
    return load_checkpoint(results["meta_training"]["checkpoint"]).meta


def _evaluation(results) -> dict:
    """results.json's evaluation without its timings (measured, so never equal)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        return value

    return strip(results["evaluation"])


def _bitwise_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[g].keys() == b[g].keys() and all(mx.array_equal(a[g][n], b[g][n]) for n in a[g])
        for g in a)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The fault-free run with three workers."""
    return run_job(_spec("runtime.workers=3"), tmp_path_factory.mktemp("ref") / "run")


def test_the_embedded_default_starts_its_own_ray_beside_another(cluster):
    """With this module's 3-node cluster running on the machine (it is Ray's "latest
    cluster" here), a job without --address still gets an embedded Ray of its own, with
    the `mlx` resources it asked for, instead of joining that cluster (where ray.init
    refused the resources and the job died). Ray's note that it turned on token
    authentication is not printed; the authentication stays on."""
    code = ("import os, ray; from metapeft_dist.runtime.connection import Connecting; "
            "connecting = Connecting(None, 2); started = connecting.result(); "
            "print(started, ray.cluster_resources().get('mlx'), len(ray.nodes()), "
            "os.environ.get('RAY_AUTH_MODE')); "
            "ray.shutdown(); connecting.release()")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "2.0", "1", "token"]
    assert "Token authentication" not in out.stderr, out.stderr[-2000:]


def test_sync_is_bitwise_identical_for_1_2_3_workers(cluster, reference, tmp_path):
    ref = _final_meta(reference)
    stats = reference["runtime"]
    assert stats["workers"] == 3 and len(stats["per_worker"]) >= 2  # the work was shared
    assert stats["parameter_server"]["accepted"] == 16 * CHUNKS_PER_ITERATION
    # the evaluation ran on the workers too: 8 one-task pieces for each of 2 inits, and
    # the standard init's fine-tune, a segment of each of its 4 five-task pieces (20
    # tasks) per scored step
    evaluation = stats["evaluation"]
    assert evaluation["completed"] == 16 and len(evaluation["per_worker"]) >= 2
    assert reference["evaluation"]["finetune"]["steps"] == [0, 1, 2, 10, 12]
    assert evaluation["finetune"]["completed"] == 4 * 5
    assert len(evaluation["finetune"]["per_worker"]) >= 2
    for workers in (1, 2):
        results = run_job(_spec(f"runtime.workers={workers}"), tmp_path / f"w{workers}")
        assert results["runtime"]["workers"] == workers
        assert _bitwise_equal(_final_meta(results), ref), f"{workers} workers differ"
        assert _evaluation(results) == _evaluation(reference), f"{workers} workers differ"


def test_the_evaluation_on_the_workers_equals_the_one_in_process(cluster, reference):
    """The same job's evaluation computed here, one piece after another, from the
    init the run selected: the same numbers, bit for bit (one kind of machine), the
    standard init's fine-tune among them."""
    from metapeft_dist.evaluate import evaluate_job
    from metapeft_dist.job import build_job

    selected = load_checkpoint(reference["meta_training"]["selected_checkpoint"]).meta
    here = evaluate_job(build_job(_spec("runtime.workers=3")), selected)
    assert "finetune" in here
    assert _evaluation({"evaluation": here}) == _evaluation(reference)


def _run_in_thread(spec, run_dir, when_iteration, action, pace_after=0.0,
                   when_stage="meta-train"):
    """Run the job on a thread; call ``action()`` once it has finished
    ``when_iteration`` iterations (or, with ``when_stage`` "evaluate", pieces of the
    evaluation); return the results. ``pace_after`` seconds are spent in the progress
    callback of every step after the action, so that a short job outlasts slow
    recoveries (the driver itself is not changed)."""
    reached = threading.Event()
    acted = threading.Event()
    out: dict = {}

    def progress(stage, done, total, info):
        if stage == when_stage and done >= when_iteration:
            reached.set()
            if acted.is_set():
                time.sleep(pace_after)

    def target():
        try:
            out["results"] = run_job(spec, run_dir, progress)
        except BaseException as err:  # surfaced below
            out["error"] = err
        reached.set()

    thread = threading.Thread(target=target)
    thread.start()
    assert reached.wait(120)
    action()
    acted.set()
    thread.join(300)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out["results"]


def _worker_nodes(cluster):
    return [n for n in cluster.list_all_nodes() if n is not cluster.head_node]


def test_a_node_killed_mid_run_costs_nothing_but_time(cluster, reference, tmp_path):
    victim = _worker_nodes(cluster)[0]
    results = _run_in_thread(_spec("runtime.workers=3"), tmp_path / "run", 3,
                             lambda: cluster.remove_node(victim, allow_graceful=False))
    stats = results["runtime"]
    ps = stats["parameter_server"]
    # Every planned chunk applied exactly once, none twice, whatever was lost.
    assert ps["accepted"] == 16 * CHUNKS_PER_ITERATION and ps["applied"] == 16
    assert ps["duplicates"] == 0 and stats["duplicates"] == 0
    assert stats["completed"] == stats["dispatched"] - stats["lost"]
    assert _bitwise_equal(_final_meta(results), _final_meta(reference))
    cluster.add_node(num_cpus=1, resources={"mlx": 1})  # restore for the next tests
    cluster.wait_for_nodes()


def test_meta_validation_on_the_workers_equals_it_in_process(cluster, tmp_path):
    """Meta-validation every 4 iterations runs on the workers beside the next steps
    (sync mode): each score is recorded under the iteration it measured, after later
    steps ran, and equals the one computed here from the checkpoint of that iteration,
    bit for bit. A run resumed from a checkpoint whose iteration's validation was still
    out does that validation again: the same scores and the same selected init."""
    from metapeft_dist.job import build_job
    from metapeft_dist.evaluate import LocalScorer
    from metapeft_dist.training import validate

    spec = _spec("runtime.workers=3", "eval.every=4", "eval.val_tasks=6", "eval.select=best",
                 "checkpoint.keep=4")
    ended: dict[int, int] = {}  # validated iteration -> the step it was recorded after

    def on_progress(stage, done, total, info):
        if stage == "meta-train":
            for iteration, _ in info.get("validated", []):
                ended[iteration] = done

    run = tmp_path / "run"
    results = run_job(spec, run, on_progress)
    training = results["meta_training"]
    assert training["validation_on"] == "workers"
    # each is recorded after later steps ran (the last ones, on a loaded machine, when
    # the run waits for them at its end)
    assert set(ended) == {4, 8, 12, 16} and ended[16] == 16
    assert all(ended[i] > i for i in (4, 8, 12))
    job = build_job(spec)
    here = LocalScorer(job)
    scores = {v["iteration"]: v["mse"] for v in training["validation"]}
    assert sorted(scores) == [4, 8, 12, 16]
    checkpoints = dict(list_checkpoints(run / "checkpoints"))
    for iteration, path in checkpoints.items():
        assert validate(job, here, load_checkpoint(path).meta)[0] == scores[iteration]
    # iteration 8's validation was out when its checkpoint was written
    assert load_checkpoint(checkpoints[8]).info["validating"] == 8
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for iteration in (12, 16):
        (resumed / "checkpoints" / checkpoints[iteration].name).unlink()
    (resumed / "results.json").unlink()
    history = resumed / "history.jsonl"  # as if the driver died before it ended
    lines = history.read_text().splitlines(True)
    kept = [line for line in lines
            if (json.loads(line)["kind"], json.loads(line)["iteration"]) != ("validation", 8)]
    assert len(kept) == len(lines) - 1
    history.write_text("".join(kept))
    again = run_job(spec, resumed, resume=load_checkpoint(resumed / "checkpoints" /
                                                          checkpoints[8].name))
    assert again["meta_training"]["validation"] == training["validation"]
    assert again["meta_training"]["selected_iteration"] == training["selected_iteration"]
    assert _bitwise_equal(
        load_checkpoint(again["meta_training"]["selected_checkpoint"]).meta,
        load_checkpoint(training["selected_checkpoint"]).meta)


def test_a_node_killed_during_the_evaluation_changes_no_bit_of_it(cluster, reference,
                                                                 tmp_path):
    """A node leaves after the first piece of the evaluation is in: the pieces its
    worker held are computed again by the others, and the evaluation is the fault-free
    one."""
    victim = _worker_nodes(cluster)[0]
    results = _run_in_thread(_spec("runtime.workers=3"), tmp_path / "run", 1,
                             lambda: cluster.remove_node(victim, allow_graceful=False),
                             pace_after=0.2, when_stage="evaluate")
    evaluation = results["runtime"]["evaluation"]
    assert evaluation["lost"] >= 1 and evaluation["completed"] == 16
    assert _evaluation(results) == _evaluation(reference)
    cluster.add_node(num_cpus=1, resources={"mlx": 1})  # restore for the next tests
    cluster.wait_for_nodes()


def _workers(**where):
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayWorker")] + [(k, "=", v) for k, v in where.items()]
    # this module's cluster by its address: without one, Ray's state API asks the newest
    # Ray on the machine, which may be another test process's
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters,
                       detail=True)


def _chunks_by_pid(stats) -> dict[int, int]:
    return {int(key.rsplit(":", 1)[1]): v["chunks"] for key, v in stats["per_worker"].items()}


def test_a_killed_worker_is_restarted_and_rejoins(cluster, reference, tmp_path):
    spec = _spec("runtime.workers=3", "algorithm.iterations=100", "checkpoint.every=25")
    killed = {}

    def kill_one_worker_process():
        victim = _workers(state="ALIVE")[0]
        killed.update(actor_id=victim["actor_id"], pid=victim["pid"])
        os.kill(victim["pid"], signal.SIGKILL)

    results = _run_in_thread(spec, tmp_path / "run", 3, kill_one_worker_process,
                             pace_after=0.03)
    stats = results["runtime"]
    assert stats["parameter_server"]["accepted"] == 100 * CHUNKS_PER_ITERATION
    assert stats["parameter_server"]["duplicates"] == 0
    # Ray restarted the actor in a new process, which rejoined and took chunks.
    restarted = _workers(actor_id=killed["actor_id"])[0]
    assert restarted["pid"] != killed["pid"]
    assert _chunks_by_pid(stats).get(restarted["pid"], 0) > 0
    fault_free = run_job(spec, tmp_path / "free")
    assert _bitwise_equal(_final_meta(results), _final_meta(fault_free))


def test_a_worker_whose_node_returns_rejoins(cluster, tmp_path):
    spec = _spec("runtime.workers=3", "algorithm.iterations=200", "checkpoint.every=50")

    returned = {}

    def node_leaves_and_returns():
        cluster.remove_node(_worker_nodes(cluster)[0], allow_graceful=True)
        returned["node"] = cluster.add_node(num_cpus=1, resources={"mlx": 1})

    # ~10 s after the node returns: time for Ray to restart the actor there and for
    # the driver's pings to find it.
    results = _run_in_thread(spec, tmp_path / "run", 3, node_leaves_and_returns,
                             pace_after=0.05)
    stats = results["runtime"]
    assert stats["parameter_server"]["accepted"] == 200 * CHUNKS_PER_ITERATION
    # The worker Ray restarted on the returned node took chunks.
    on_new_node = _workers(node_id=returned["node"].node_id)
    assert len(on_new_node) == 1
    assert _chunks_by_pid(stats).get(on_new_node[0]["pid"], 0) > 0


def _cli(*args, timeout=300):
    return subprocess.Popen([sys.executable, "-m", "metapeft_dist.cli", "run", *args, "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _spec_file(tmp_path, *overrides) -> Path:
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(*overrides).to_dict()))
    return path


def _kill_after_checkpoint(run_dir: Path, cluster, spec_path: Path, iteration: int):
    driver = _cli(str(spec_path), "--address", cluster.address, "--run-dir", str(run_dir))
    deadline = time.monotonic() + 240
    while not any(it >= iteration for it, _ in list_checkpoints(run_dir / "checkpoints")):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()


@pytest.fixture(scope="module")
def uninterrupted_200(cluster, tmp_path_factory):
    """The final meta-parameters of the 200-iteration job run without a fault, which the
    killed and resumed runs must equal (how often they checkpoint changes no bit)."""
    return _final_meta(run_job(_spec("algorithm.iterations=200", "checkpoint.every=40"),
                               tmp_path_factory.mktemp("whole")))


def test_a_sigkilled_driver_resumes_bitwise(cluster, tmp_path, uninterrupted_200):
    # Long enough that the kill lands mid-run, after the iteration-40 checkpoint.
    spec_path = _spec_file(tmp_path, "algorithm.iterations=200", "checkpoint.every=40")
    run_dir = tmp_path / "killed"
    _kill_after_checkpoint(run_dir, cluster, spec_path, 40)
    assert not (run_dir / "results.json").exists()  # it really died mid-run
    last = max(it for it, _ in list_checkpoints(run_dir / "checkpoints"))
    assert last < 200
    resumed = _cli("--resume", str(run_dir), "--address", cluster.address)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming {run_dir} from iteration {last}" in err
    # restartable workers take no constructor arguments through the object store (Ray
    # logs an error for each such actor: their restart is not protected, ray#53727)
    assert "constructor arguments in the object store" not in err
    final = load_checkpoint(run_dir / "checkpoints" / "ckpt-00000200.safetensors").meta
    assert _bitwise_equal(final, uninterrupted_200)


def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(cluster, tmp_path,
                                                                      uninterrupted_200):
    spec_path = _spec_file(tmp_path, "algorithm.iterations=200", "checkpoint.every=20")
    run_dir = tmp_path / "killed"
    _kill_after_checkpoint(run_dir, cluster, spec_path, 40)
    found = list_checkpoints(run_dir / "checkpoints")
    (_, newest), (previous_it, _) = found[-1], found[-2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = _cli("--resume", str(run_dir), "--address", cluster.address)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    warnings = [line for line in err.splitlines() if newest.name in line]
    assert len(warnings) == 1 and "corrupt" in warnings[0]
    assert f"from iteration {previous_it}" in err
    final = load_checkpoint(run_dir / "checkpoints" / "ckpt-00000200.safetensors").meta
    assert _bitwise_equal(final, uninterrupted_200)


@pytest.mark.parametrize("bound", [0, 1])
def test_async_never_applies_a_result_staler_than_the_bound(cluster, tmp_path, bound):
    results = run_job(_spec("runtime.mode=async", f"runtime.staleness={bound}",
                            "runtime.workers=3", "runtime.chunk=1"), tmp_path / "run")
    stats = results["runtime"]
    ps = stats["parameter_server"]
    planned = 16 * 6
    assert ps["produced"] == planned  # no faults here: every dispatched chunk came back
    assert ps["applied"] + ps["dropped"] == ps["produced"]
    assert stats["max_applied_staleness"] <= bound
    assert ps["version"] == ps["applied"]
    if bound == 0:
        assert ps["dropped"] > 0  # three workers reading one version: some must be stale


def _llama_job(tmp_path, iterations: int = 4) -> tuple:
    """A causal-LM LoRA spec on a tiny llama saved by the test and a JSONL task family
    of three files: (spec, llama directory, tasks directory)."""
    from tiny_llama import save_tiny_llama

    llama = save_tiny_llama(tmp_path / "llama")
    data = tmp_path / "tasks"
    data.mkdir()
    for i, pair in enumerate([("weather", "food"), ("food", "sport"), ("sport", "weather")]):
        lines = [json.dumps({"text": t, "label": label}) for label in pair
                 for t in TOPICS[label]]
        (data / f"task{i}.jsonl").write_text("\n".join(lines) + "\n")
    spec = parse_spec(f"""
name: llama
family: {{name: jsonl, path: {data}, ways: 2, shots: 2, query: 2}}
model: {{kind: causal_lm, path: {llama}, train: lora, max_len: 24, lora: {{rank: 2, layers: 1}}}}
algorithm: {{name: fomaml, meta_batch: 3, iterations: {iterations}}}
runtime: {{mode: sync, chunk: 1, stall_timeout: 600}}
inner: {{steps: 2, lr: 0.5}}
eval: {{tasks: 4, shots: [2], steps: 2, every: 2, val_tasks: 2, chunk: 4}}
metrics: {{enabled: false}}
""")
    return spec, llama, data


def test_a_tiny_llama_lora_job_meta_trains_on_three_nodes(cluster, tmp_path):
    """A causal-LM LoRA job (a tiny llama saved by the test, a JSONL task family) on
    the 3-node cluster: one worker per node, every task done once, only adapters in the
    checkpoint, and meta-training moved them."""
    spec, _, _ = _llama_job(tmp_path)
    assert spec.eval.baselines == ("random",)  # no head: labels are the letters A, B
    results = run_job(spec, tmp_path / "run")
    runtime = results["runtime"]
    # One worker per node; on a loaded machine a worker may still be starting when the
    # 12 chunks are done, so which nodes took chunks varies: every chunk counts once.
    assert runtime["workers"] == 3 and 1 <= len(runtime["nodes"]) <= 3
    assert runtime["tasks_completed"] == 4 * 3
    assert runtime["parameter_server"]["accepted"] == 4 * 3
    final = load_checkpoint(results["meta_training"]["checkpoint"])
    assert final.frozen == {}
    params = final.meta["params"]
    assert params and all(name.endswith(("lora_a", "lora_b")) for name in params)
    assert all(".layers.1." in name for name in params)  # the top layer of 2
    assert any(mx.any(params[n]).item() for n in params if n.endswith("lora_b"))
    inits = results["evaluation"]["shots"]["2"]["inits"]
    assert set(inits) == {"meta", "random"} and all(len(v["mean"]) == 3
                                                    for v in inits.values())


def test_metapeft_eval_on_the_workers_equals_it_in_process(cluster, tmp_path):
    """`metapeft eval` of a causal-LM run, in-context prompting among its baselines, on
    the cluster's workers (runtime.mode sync) and here (local): the same numbers, bit for
    bit, and the workers shared the pieces."""
    from metapeft_dist.crossdomain import evaluate_init

    spec, _, _ = _llama_job(tmp_path, iterations=2)
    run_job(spec, tmp_path / "run")
    extra = ["eval.baselines=[random, in_context]", "eval.chunk=1"]
    on_ray = evaluate_init(tmp_path / "run", overrides=extra + ["runtime.workers=3"])
    here = evaluate_init(tmp_path / "run", overrides=extra + ["runtime.mode=local"])
    assert set(on_ray["evaluation"]["shots"]["2"]["inits"]) == {"meta", "random", "in_context"}
    assert _evaluation(on_ray) == _evaluation(here)
    work = on_ray["runtime"]["evaluation"]
    assert work["completed"] == 3 * 4 and len(work["per_worker"]) >= 2
    assert "evaluation" not in here["runtime"]


def test_any_sweep_on_the_workers_equals_it_in_process(cluster):
    """The selection bench's pieces (sweeps.Sweep: its own task stream and query size,
    the metric after the last step alone, or each task's support-set scores) computed
    by the workers of runtime.driver.ray_scorer equal LocalScorer's, bit for bit."""
    from metapeft_dist.evaluate import LocalScorer
    from metapeft_dist.sweeps import Sweep
    from metapeft_dist.job import Init, build_job
    from metapeft_dist.runtime.driver import ray_scorer

    job = build_job(parse_spec("""
family: {name: gaussian, shots: 3, query: 4}
model: {kind: mlp, hidden: [16]}
algorithm: {name: fomaml, meta_batch: 2, iterations: 1}
inner: {steps: 1, lr: 0.5}
eval: {tasks: 4, shots: [3], steps: 2}
runtime: {mode: sync, workers: 3}
metrics: {enabled: false}
"""))
    init = Init("meta", job.initial_meta, job.frozen)
    todo = [("meta", 3, first, 2, Sweep("test", 100, 4, query, final_only=True, on=on))
            for on, query in (("query", 7), ("support-cv", None), ("support-fit", None))
            for first in (0, 2)]
    with ray_scorer(job) as scorer:
        on_ray = scorer.run([init], todo, lambda piece: None)
        work = scorer.stats()
    here = LocalScorer(job).run([init], todo, lambda piece: None)
    assert work["completed"] == len(todo) and len(work["per_worker"]) >= 2
    for piece in todo:
        assert on_ray[piece].shape == (2, 1)
        assert np.array_equal(on_ray[piece], here[piece])
    # the support-set scores are not the query's
    assert not np.array_equal(here[todo[0]], here[todo[2]])


def test_the_workers_get_the_task_files_from_the_driver(cluster, tmp_path):
    """A JSONL family's files exist where the driver runs only (deleted once it has
    read them): the workers get them from the driver and do every task, and write no
    copy of the user's texts to their machine's disk (Ray kills workers without
    letting them clean up)."""
    import tempfile

    from metapeft_dist.job import build_job
    from metapeft_dist.runtime.driver import RayExecutor

    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("metapeft-tasks-*"))
    spec, _, data = _llama_job(tmp_path, iterations=2)
    job = build_job(spec)
    shutil.rmtree(data)
    executor = RayExecutor(job)
    try:
        losses = [executor.step(iteration)[0] for iteration in range(2)]
        stats = executor.stats()
    finally:
        executor.close()
    assert all(math.isfinite(loss) for loss in losses)
    assert stats["tasks_completed"] == 2 * 3 and stats["tasks_lost"] == 0
    assert set(temp.glob("metapeft-tasks-*")) == before


def test_workers_that_cannot_build_the_job_end_it_with_their_reason(cluster, tmp_path):
    """The model directory exists where the driver runs but not on the worker nodes
    (deleted once the driver has loaded it): every worker's constructor fails, and the
    run ends at once with what they raised instead of waiting runtime.stall_timeout for
    workers that will never answer."""
    from metapeft_dist.job import build_job
    from metapeft_dist.runtime.connection import ClusterError
    from metapeft_dist.runtime.driver import RayExecutor

    spec, llama, _ = _llama_job(tmp_path, iterations=2)
    job = build_job(spec)
    shutil.rmtree(llama)
    executor = RayExecutor(job)
    try:
        started = time.monotonic()
        with pytest.raises(ClusterError) as err:
            executor.step(0)
        assert str(err.value) == (
            f"no MLX worker could start the job: FileNotFoundError: model.path: {llama} "
            "is not a local mlx-lm model directory (no config.json)")
        assert time.monotonic() - started < 60
    finally:
        executor.close()


def test_a_worker_that_cannot_start_is_left_out_and_reported(cluster, tmp_path):
    """A fourth node lacks mlx-lm (its worker processes find a package of that name
    that fails to import first on their path): its worker cannot build the job, is
    not retried, and is reported (log, results, the answering and could-not-start
    gauges); the other three do every task, and only their nodes are held on the
    job's cost meter."""
    from prometheus_client import CollectorRegistry

    from metapeft_dist.cost import SpendMeter
    from metapeft_dist.job import build_job
    from metapeft_dist.metrics import JobMetrics
    from metapeft_dist.runtime.driver import RayExecutor

    shadow = tmp_path / "no-mlx-lm"
    (shadow / "mlx_lm").mkdir(parents=True)
    (shadow / "mlx_lm" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'mlx_lm'\", name='mlx_lm')\n")
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    node = cluster.add_node(num_cpus=1, resources={"mlx": 1}, env_vars={"PYTHONPATH": path})
    cluster.wait_for_nodes()
    spec, _, _ = _llama_job(tmp_path, iterations=2)
    metrics = JobMetrics("partial", "fomaml", registry=CollectorRegistry())
    metrics.job_started("jsonl", "sync", 2, 4, None, None)
    logged: list[str] = []
    spend = SpendMeter({})
    executor = None
    try:
        executor = RayExecutor(build_job(spec), log=logged.append, metrics=metrics,
                               spend=spend)
        losses = [executor.step(iteration)[0] for iteration in range(2)]
        stats = executor.stats()
    finally:
        if executor is not None:
            executor.close()
        cluster.remove_node(node)
    reason = "ModuleNotFoundError: No module named 'mlx_lm'"
    assert all(math.isfinite(loss) for loss in losses)
    assert stats["workers"] == 4 and stats["workers_failed_to_start"] == [reason]
    assert stats["tasks_completed"] == 2 * 3 and stats["tasks_lost"] == 0
    assert logged.count(f"a worker could not start: {reason}") == 1
    value = metrics.registry.get_sample_value
    assert value("metapeft_workers_failed_to_start", {"job": "partial"}) == 1
    assert value("metapeft_workers", {"job": "partial"}) == 3
    reserved = spend.reserved_seconds()
    assert set(reserved) == set(stats["nodes"]) and len(reserved) == 3
    assert all(seconds > 0 for seconds in reserved.values())
    assert spend.reserved_seconds(now=time.time() + 3600) == reserved  # all released


def _other_kernels() -> str | None:
    """An OpenBLAS kernel family this CPU runs other than the one the package chose for
    it (Nehalem: SSE4.2, any x86-64 of the last 15 years), or None off x86-64 OpenBLAS."""
    from metapeft_dist import blas

    if platform.machine() != "x86_64" or not blas.ensure_fast_blas():
        return None
    return next(k for k in ("Nehalem", "Core2") if k != os.environ.get("OPENBLAS_CORETYPE"))


def test_sync_across_machine_kinds_agrees_to_rounding_not_to_the_bit(cluster, reference,
                                                                      tmp_path):
    """What README (Determinism) promises for a cluster of two machine kinds, as an Intel
    box beside an AMD one: a fourth node's workers run other BLAS kernels than the three
    others. The run says that it spans two kinds, the chunks the other kind computed
    carry other last bits, so the result is not the one-kind run's bits, and it agrees
    with them to float32 rounding (measured: at most ~4e-5 relative, in a weight near
    zero, after 16 iterations). On one kind the result is bitwise (the tests above)."""
    other = _other_kernels()
    if other is None:
        pytest.skip("no second set of BLAS kernels to run here")
    node = cluster.add_node(num_cpus=1, resources={"mlx": 1},
                            env_vars={"OPENBLAS_CORETYPE": other})
    cluster.wait_for_nodes()
    logged: list[str] = []
    try:
        results = run_job(_spec("runtime.workers=4"), tmp_path / "run", log=logged.append)
    finally:
        cluster.remove_node(node)
    kinds = results["runtime"]["kinds"]
    assert len(kinds) == 2 and sum(kinds.values()) == results["runtime"]["completed"]
    ours = next(k for k in kinds if k.endswith(os.environ["OPENBLAS_CORETYPE"]))
    theirs = next(k for k in kinds if k.endswith(f"OpenBLAS {other}"))
    assert kinds[theirs] > 0 and kinds[ours] > 0, kinds  # both kinds computed chunks
    assert any(line.startswith("workers run on 2 machine kinds") for line in logged), logged
    mixed, ref = _final_meta(results), _final_meta(reference)
    assert not _bitwise_equal(mixed, ref)
    for group in ref:  # float32 rounding, grown over 16 iterations of MAML
        for name in ref[group]:
            np.testing.assert_allclose(np.array(mixed[group][name]), np.array(ref[group][name]),
                                       rtol=1e-3, atol=1e-6)
