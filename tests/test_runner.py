"""runner.py: a run writes its spec, checkpoints and results; the results agree with
the checkpoint and the printed table."""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import replace

import mlx.core as mx
import pytest
import yaml

from metapeft_dist.config import from_dict, parse_spec
from metapeft_dist.results import format_table, timing_line
from metapeft_dist.runner import RunDirError, run_job
from metapeft_dist.runner import timing as job_timing
from metapeft_dist.runtime.checkpoint import list_checkpoints, load_checkpoint


def test_run_writes_spec_checkpoints_and_results(tmp_path, tiny_spec_text, local_ray):
    spec = parse_spec(tiny_spec_text, default_name="tiny")
    seen = []
    results = run_job(spec, tmp_path / "run", lambda *a: seen.append(a[0]))
    run = tmp_path / "run"
    assert from_dict(yaml.safe_load((run / "spec.yaml").read_text())) == spec
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    # every: 10, keep: 2 over 30 iterations: the final one and the newest periodic one.
    assert [it for it, _ in list_checkpoints(run / "checkpoints")] == [20, 30]
    final = load_checkpoint(results["meta_training"]["checkpoint"])
    assert final.iteration == 30 and final.info["algorithm"] == "maml"
    assert set(final.meta["params"]) == {"hidden0.kernel", "hidden0.b", "hidden1.kernel",
                                         "hidden1.b", "head.w", "head.b"}
    mt = results["meta_training"]
    assert [v["iteration"] for v in mt["validation"]] == [10, 20, 30]
    # eval.select: best evaluates the init with the lowest meta-validation MSE.
    best = min(mt["validation"], key=lambda v: v["mse"])
    assert mt["selected_iteration"] == best["iteration"]
    chosen = load_checkpoint(mt["selected_checkpoint"])
    assert chosen.iteration == best["iteration"] and chosen.info["val"] == best["mse"]

    assert mt["curve"][-1]["iteration"] == 30
    ev = results["evaluation"]
    assert ev["metric"] == "mse" and ev["tasks"] == 8
    summary = ev["shots"]["5"]
    assert set(summary["inits"]) == {"meta", "random"}
    assert len(summary["inits"]["meta"]["mean"]) == 4  # steps 0..3
    # the target: what the meta-learned init reaches after its inner step (inner.steps 1)
    assert ev["target_step"] == 1
    assert summary["target"] == summary["inits"]["meta"]["mean"][1]
    finetune = ev["finetune"]  # the standard init fine-tuned to it, at the job's 5 shots
    assert finetune["shots"] == 5 and finetune["target"] == summary["target"]
    assert finetune["budget"] == 200 and finetune["tasks"] == 20 and finetune["lr"] == 1e-3
    reached = finetune["steps_to_target"]
    assert finetune["steps"][-1] == (reached if reached is not None else 200)
    assert {"setup", "meta-train", "evaluate", "done"} <= set(seen)
    table = format_table(results)
    assert "meta" in table and "random" in table and "steps to target" in table
    assert "break-even after" in table and "RQ3 goal 5x" in table
    assert "could not start" not in table
    # where the job's time went: meta-training's steps, its 3 validations, the
    # evaluation, within the whole job, and the table's line of it
    timing, startup = results["timing"], results["timing"]["startup"]
    assert timing["meta_training"] == mt["seconds"] and timing["validation"] > 0
    assert timing["evaluation"] == ev["seconds"] > 0
    assert timing["meta_training"] + timing["validation"] + timing["evaluation"] < timing["job"]
    assert [line for line in table.splitlines() if line.startswith("time: ")] == [
        f"time: meta-training {timing['meta_training']:.1f} s "
        f"({100 * timing['meta_training'] / timing['job']:.0f}%), waiting for meta-validation "
        f"{timing['validation']:.1f} s ({100 * timing['validation'] / timing['job']:.0f}%), "
        f"final evaluation {timing['evaluation']:.1f} s "
        f"({100 * timing['evaluation'] / timing['job']:.0f}%) of {timing['job']:.1f} s; "
        f"first task done {startup['first_task']:.1f} s in (job built at "
        f"{startup['job_built']:.1f} s, Ray up at {startup['ray']:.1f} s, a worker's imports "
        f"done at {startup['worker_imported']:.1f} s, its job built at "
        f"{startup['worker_built']:.1f} s, workers answering at {startup['workers']:.1f} s)"]
    # the job is built while Ray is joined (the test's, already up), then the workers
    # answer, then the first task is done, all within the job; the milestones leave the
    # runtime section
    startup = timing["startup"]
    assert 0 < startup["job_built"] < startup["workers"]
    assert 0 < startup["ray"] < startup["worker_imported"] <= startup["worker_built"]
    assert startup["worker_built"] < startup["workers"]
    assert startup["workers"] <= startup["first_task"] < timing["job"]
    assert timing["startup_from"] == "run"
    assert "started" not in results["runtime"]
    # a run on a cluster where some workers' nodes lacked what the job needs says so
    failed = {**results, "runtime": {**results["runtime"], "workers": 4,
                                     "workers_failed_to_start": ["A: x", "B: y", "A: x"]}}
    assert format_table(failed).splitlines()[-2] == (
        "workers: 3 of 4 could not start and were left out: A: x (2x); B: y")
    outcome = json.loads((run / "outcome.json").read_text())
    assert outcome == results["outcome"] and outcome["status"] == "succeeded"
    assert outcome["totals"]["tasks_completed"] == 30 * spec.algorithm.meta_batch
    assert outcome["totals"]["outer_updates"] == 30
    cost = results["cost"]
    assert cost["spend_usd"] > 0
    assert cost["spend_usd"] == pytest.approx(sum(n["spend_usd"] for n in cost["nodes"].values()))


def test_the_selected_init_is_the_best_validated_one(tmp_path, tiny_spec_text):
    from metapeft_dist.job import build_job
    from metapeft_dist.training import meta_train
    from metapeft_dist.trainer import MetaTrainer

    spec = parse_spec(tiny_spec_text, overrides=["eval.every=5"])
    job = build_job(spec)
    summary, selected = meta_train(job, MetaTrainer(job), tmp_path)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.safetensors")
    assert summary["selected_iteration"] == best.iteration
    assert best.iteration != spec.algorithm.iterations  # this run peaks before its end
    final = load_checkpoint(summary["checkpoint"])
    for name, value in selected["params"].items():
        assert mx.array_equal(value, best.meta["params"][name])
    assert any(not mx.array_equal(selected["params"][n], final.meta["params"][n])
               for n in selected["params"])


def test_final_checkpoint_equals_an_identical_rerun(tmp_path, tiny_spec_text, local_ray):
    spec = parse_spec(tiny_spec_text, overrides=["eval.every=0", "eval.select=last",
                                                 "checkpoint.every=0"])
    a = run_job(spec, tmp_path / "a")
    b = run_job(spec, tmp_path / "b")
    ma = load_checkpoint(a["meta_training"]["checkpoint"]).meta["params"]
    mb = load_checkpoint(b["meta_training"]["checkpoint"]).meta["params"]
    assert all(mx.array_equal(ma[k], mb[k]) for k in ma)
    assert a["evaluation"]["shots"] == b["evaluation"]["shots"]


def test_a_resumed_run_with_clipping_has_the_same_bits_and_history(tmp_path, tiny_spec_text):
    """A run resumed from a checkpoint, with outer.clip_norm (a sum over the gradient's
    tree, in its key order), ends bitwise equal to the uninterrupted one, and writes the
    same history.jsonl byte for byte, though the history was cut mid-line when the run
    stopped."""
    import shutil

    spec = parse_spec(tiny_spec_text, overrides=[
        "runtime.mode=local", "outer.clip_norm=0.3", "algorithm.iterations=60",
        "checkpoint.every=30", "eval.every=0", "eval.select=last", "metrics.enabled=false"])
    whole = run_job(spec, tmp_path / "whole")
    norms = [entry["grad_norm"] for entry in whole["meta_training"]["curve"]]
    assert sum(norm > 0.3 for norm in norms) > 30  # most steps were clipped
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    (cut / "checkpoints" / "ckpt-00000060.safetensors").unlink()
    (cut / "results.json").unlink()
    history = (cut / "history.jsonl").read_bytes()
    (cut / "history.jsonl").write_bytes(history[:history.index(b'"iteration": 45,') + 9])
    resumed = run_job(spec, cut, resume=load_checkpoint(cut / "checkpoints" /
                                                        "ckpt-00000030.safetensors"))
    assert resumed["meta_training"]["curve"] == whole["meta_training"]["curve"]
    assert (cut / "history.jsonl").read_bytes() == history
    a = load_checkpoint(whole["meta_training"]["checkpoint"]).meta["params"]
    b = load_checkpoint(resumed["meta_training"]["checkpoint"]).meta["params"]
    assert list(a) == list(b) and all(mx.array_equal(a[k], b[k]) for k in a)


def test_a_history_line_that_is_no_entry_is_named_and_the_history_kept(tmp_path):
    from metapeft_dist.rundir import RunDirError
    from metapeft_dist.training import History

    path = tmp_path / "history.jsonl"
    lines = [json.dumps({"kind": "curve", "iteration": i, "loss": 1.0}) for i in (1, 2, 3)]
    for bad, why in (('{"kind": "curve", "iter', "Unterminated string"),
                     ('{"kind": "other", "iteration": 2}', "kind is not one of"),
                     ('{"kind": "curve", "iteration": "2"}', "no integer iteration"),
                     ('[1, 2]', "kind is not one of")):
        text = "\n".join([lines[0], bad, lines[2]]) + "\n"
        path.write_text(text)
        with pytest.raises(RunDirError, match=rf"^{re.escape(str(path))}:2: not a history "
                                              rf"entry \(.*{why}"):
            History(path, resume_at=3)
        assert path.read_text() == text
    # the same cut short as the last line, where a stop mid-write leaves it: left out
    path.write_text("\n".join(lines[:2]) + '\n{"kind": "curve", "iter')
    history = History(path, resume_at=3)
    history.add("curve", {"iteration": 3, "loss": 1.0})
    history.close()
    assert path.read_text() == "\n".join(lines) + "\n"
    assert [entry["iteration"] for entry in history.curve] == [1, 2, 3]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_json_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from metapeft_dist.runner import write_json_atomic

    path = tmp_path / "outcome.json"
    write_json_atomic(path, {"status": "running"})
    os.symlink("/dev/full", tmp_path / ".outcome.json.tmp")  # every write: ENOSPC
    with pytest.raises(OSError) as err:
        write_json_atomic(path, {"status": "failed"})
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outcome.json"]
    assert json.loads(path.read_text()) == {"status": "running"}


def test_a_resumed_run_keeps_its_frozen_base_and_needs_no_init_run(tmp_path, tiny_digits_text):
    """Resuming takes the frozen base from the checkpoint (the one the meta-parameters
    were trained on) instead of pretraining it again, and no longer reads the run that
    algorithm.hyper.init named (moved away since); it ends bitwise equal to an
    uninterrupted run."""
    from metapeft_dist.runner import find_resume_point

    run_job(parse_spec(tiny_digits_text), tmp_path / "lora")
    spec = parse_spec(tiny_digits_text, overrides=[
        "algorithm.name=hyper", f"algorithm.hyper.init={tmp_path / 'lora'}",
        "algorithm.hyper.task_dim=8", "algorithm.hyper.hidden=8", "algorithm.hyper.map_rank=2",
        "algorithm.iterations=4", "checkpoint.every=2", "eval.every=0", "eval.select=last"])
    whole = run_job(spec, tmp_path / "whole")
    run_job(spec, tmp_path / "cut")
    _, newest = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    newest.unlink()  # as if the driver had died before iteration 4's checkpoint
    (tmp_path / "lora").rename(tmp_path / "moved")

    spec_again, checkpoint = find_resume_point(tmp_path / "cut", lambda message: None)
    assert checkpoint.iteration == 2 and checkpoint.frozen.keys() == {"hidden0.kernel", "hidden0.b"}
    resumed = run_job(spec_again, tmp_path / "cut", resume=checkpoint)
    a = load_checkpoint(whole["meta_training"]["checkpoint"]).meta
    b = load_checkpoint(resumed["meta_training"]["checkpoint"]).meta
    assert all(mx.array_equal(a[g][k], b[g][k]) for g in a for k in a[g])
    # a checkpoint whose trees are not this job's is refused in one line, nothing written:
    # one from before the MLP's hidden layers were (in, out) kernels ...
    old = {("hidden0.w" if k == "hidden0.kernel" else k): v.T if k == "hidden0.kernel" else v
           for k, v in checkpoint.frozen.items()}
    with pytest.raises(RunDirError, match=r"its frozen base do not fit this job's model .*"
                                          r"before the MLP stored its hidden layers as"):
        run_job(spec_again, tmp_path / "old", resume=replace(checkpoint, frozen=old))
    # ... and meta-parameters of another tree
    first = sorted(checkpoint.meta["params"])[0]
    fewer = {**checkpoint.meta, "params": {k: v for k, v in checkpoint.meta["params"].items()
                                           if k != first}}
    expected = f"its meta-parameters do not fit this job's model (missing ['params/{first}'], "
    with pytest.raises(RunDirError, match=re.escape(expected + "not this job's [])")):
        run_job(spec_again, tmp_path / "other", resume=replace(checkpoint, meta=fewer))
    assert not (tmp_path / "old").exists() and not (tmp_path / "other").exists()


def test_a_jsonl_run_keeps_its_task_files_and_resumes_without_the_originals(tmp_path):
    """A jsonl run copies its task files into RUN/tasks/ and its spec.yaml names the
    copy, so it resumes (bitwise equal to an uninterrupted run) after the originals are
    gone."""
    from tiny_llama import save_tiny_llama, save_tiny_tasks

    from metapeft_dist.runner import find_resume_point

    llama = save_tiny_llama(tmp_path / "llama")
    data = tmp_path / "tasks"
    originals = save_tiny_tasks(data)
    spec = parse_spec(f"""
family: {{name: jsonl, path: {data}, ways: 2, shots: 2, query: 2}}
model: {{kind: causal_lm, path: {llama}, train: lora, max_len: 24, lora: {{rank: 2, layers: 1}}}}
algorithm: {{name: fomaml, meta_batch: 2, iterations: 4}}
inner: {{steps: 2, lr: 0.5}}
eval: {{tasks: 2, shots: [2], steps: 1, every: 0, select: last, chunk: 2}}
checkpoint: {{every: 2}}
runtime: {{mode: local}}
metrics: {{enabled: false}}
""")
    whole = run_job(spec, tmp_path / "whole")
    # in process (runtime.mode local): no Ray milestones, the job built, then a task done
    startup = whole["timing"]["startup"]
    assert set(startup) == {"job_built", "first_task"}
    assert 0 < startup["job_built"] < startup["first_task"] < whole["timing"]["job"]
    assert format_table(whole).splitlines()[-2].endswith(
        f"; first task done {startup['first_task']:.1f} s in (job built at "
        f"{startup['job_built']:.1f} s)")
    run_job(spec, tmp_path / "cut")
    kept = (tmp_path / "cut").resolve() / "tasks"
    assert {f.name: f.read_bytes() for f in kept.iterdir()} == originals
    written = yaml.safe_load((tmp_path / "cut" / "spec.yaml").read_text())
    assert written["family"]["path"] == str(kept)

    _, newest = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    newest.unlink()  # as if the driver had died before iteration 4's checkpoint
    for file in data.iterdir():
        file.unlink()
    data.rmdir()
    spec_again, checkpoint = find_resume_point(tmp_path / "cut", lambda message: None)
    assert checkpoint.iteration == 2
    resumed = run_job(spec_again, tmp_path / "cut", resume=checkpoint)
    a = load_checkpoint(whole["meta_training"]["checkpoint"]).meta["params"]
    b = load_checkpoint(resumed["meta_training"]["checkpoint"]).meta["params"]
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_startup_counts_from_the_command_when_one_ran_the_job():
    """The CLI passes its start (``invoked``): the startup milestones count from it, the
    job's own start first among them; without it they count from the job's start."""
    results = {"meta_training": {"seconds": 2.0, "validation_seconds": 0.0},
               "runtime": {"throughput": {"first": 104.0}}, "evaluation": {"seconds": 1.0},
               "seconds": 6.0}
    milestones = {"job_built": 101.0, "ray": 102.5, "workers": 103.5}
    by_command = job_timing(results, 100.0, milestones, invoked=99.5)
    assert by_command["startup_from"] == "command"
    assert by_command["startup"] == {"run_started": 0.5, "job_built": 1.5, "ray": 3.0,
                                     "workers": 4.0, "first_task": 4.5}
    assert timing_line(by_command).endswith(
        "; first task done 4.5 s after the command started (run started at 0.5 s, job "
        "built at 1.5 s, Ray up at 3.0 s, workers answering at 4.0 s)")
    by_run = job_timing(results, 100.0, milestones)
    assert by_run["startup_from"] == "run"
    assert by_run["startup"] == {"job_built": 1.0, "ray": 2.5, "workers": 3.5,
                                 "first_task": 4.0}
    assert timing_line(by_run).endswith("; first task done 4.0 s in (job built at 1.0 s, "
                                        "Ray up at 2.5 s, workers answering at 3.5 s)")
