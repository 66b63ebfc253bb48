"""evaluate.py: confidence intervals, steps-to-target and paired gains have their
closed-form values; curves are computed on the same tasks for every init."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metapeft_dist.evaluate import Z95, mean_ci95, steps_to_target, summarize


def test_mean_ci95_known_values():
    mean, ci = mean_ci95(np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0]]))
    np.testing.assert_allclose(mean, [2.5, 10.0])
    sd = math.sqrt(((1.5**2 + 0.5**2) * 2) / 3)
    np.testing.assert_allclose(ci, [Z95 * sd / 2, 0.0])
    _, single = mean_ci95(np.array([[1.0]]))
    assert np.isnan(single).all()


def test_steps_to_target_both_directions():
    assert steps_to_target(np.array([0.2, 0.5, 0.7, 0.9]), 0.7, True) == 2
    assert steps_to_target(np.array([0.2, 0.5]), 0.7, True) is None
    assert steps_to_target(np.array([3.0, 1.0, 0.5]), 1.0, False) == 1
    assert steps_to_target(np.array([0.9]), 0.5, True) == 0


def test_summarize_defaults_target_to_random_final_and_pairs_gains():
    meta = np.array([[0.2, 0.8, 0.9], [0.2, 0.6, 0.7]])
    random = np.array([[0.2, 0.4, 0.6], [0.2, 0.3, 0.6]])
    out = summarize({"meta": meta, "random": random}, higher_is_better=True, target=None)
    assert out["target"] == pytest.approx(0.6)
    assert out["inits"]["meta"]["steps_to_target"] == 1
    assert out["inits"]["random"]["steps_to_target"] == 2
    assert out["inits"]["meta"]["tasks_reaching_target"] == 1.0
    assert out["inits"]["meta"]["median_task_steps_to_target"] == 1.0
    np.testing.assert_allclose(out["gain_over"]["random"]["mean"], [0.0, 0.35, 0.2])
    # Lower is better (MSE): the gain is random - meta.
    out = summarize({"meta": np.array([[1.0, 0.5]] * 2), "random": np.array([[1.0, 0.9]] * 2)},
                    higher_is_better=False, target=None)
    np.testing.assert_allclose(out["gain_over"]["random"]["mean"], [0.0, 0.4])
    assert out["inits"]["meta"]["steps_to_target"] == 1


def test_a_causal_lm_job_compares_with_in_context_prompting(tmp_path, monkeypatch):
    """A shortened causal-LM job (a tiny llama saved by the test, JSONL tasks) with
    eval.baselines [random, in_context] runs end to end in local mode: in_context's curve
    is flat (prompting takes no steps) at the accuracy of prompting each meta-test task
    with its support set, and the results table, results.json and the report read it."""
    import json

    import mlx.core as mx
    from tiny_llama import save_tiny_llama, save_tiny_tasks

    from metapeft_dist.config import parse_spec
    from metapeft_dist.job import build_job
    from metapeft_dist.models.in_context import InContext
    from metapeft_dist.report import shot_series, write_report
    from metapeft_dist.results import format_table
    from metapeft_dist.runner import run_job

    monkeypatch.setenv("METAPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llama = save_tiny_llama(tmp_path / "llama")
    save_tiny_tasks(tmp_path / "tasks")
    spec = parse_spec(f"""
name: llama
family: {{name: jsonl, path: {tmp_path / 'tasks'}, ways: 2, shots: 2, query: 2}}
model: {{kind: causal_lm, path: {llama}, train: lora, max_len: 24, lora: {{rank: 2, layers: 1}}}}
algorithm: {{name: fomaml, meta_batch: 2, iterations: 2}}
runtime: {{mode: local}}
inner: {{steps: 2, lr: 0.5}}
eval: {{tasks: 4, shots: [1, 2], steps: 2, every: 1, val_tasks: 2, chunk: 2,
       baselines: [random, in_context]}}
metrics: {{enabled: false}}
""")
    results = run_job(spec, tmp_path / "run")
    job = build_job(spec)
    scorer = InContext(job.model, job.frozen["inputs.ids"], job.frozen["inputs.mask"])
    adapters = job.baseline("in_context").meta["params"]
    assert not any(mx.any(v).item() for n, v in adapters.items() if n.endswith("lora_b"))
    for shots in (1, 2):
        inits = results["evaluation"]["shots"][str(shots)]["inits"]
        assert set(inits) == {"meta", "random", "in_context"}
        mean = inits["in_context"]["mean"]
        assert len(mean) == 3 and mean[0] == mean[1] == mean[2]
        sx, sy, qx, qy = job.episodes("test", shots, range(4), shots).arrays()
        accuracy = [float(np.mean(np.argmax(np.array(scorer.logits(adapters, sx[i], sy[i],
                                                                   qx[i])), -1) == qy[i]))
                    for i in range(4)]
        assert mean[0] == pytest.approx(np.mean(accuracy), abs=1e-6)
        assert "in_context" in results["evaluation"]["shots"][str(shots)]["gain_over"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["evaluation"]["shots"]["2"]["inits"]["in_context"]["mean"] == mean
    table = format_table(saved)
    assert sum(line.split()[1:2] == ["in_context"] for line in table.splitlines()) == 2
    assert [s for s, _, _ in shot_series(saved["evaluation"], 2)["in_context"]] == [1, 2]
    report = write_report(tmp_path / "run")
    assert str(tmp_path / "run" / "report" / "shots.png") in report["written"]
