"""evaluate.py: confidence intervals, steps-to-target and paired gains have their
closed-form values; curves are computed on the same tasks for every init."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metapeft_dist.curves import Z95, mean_ci95, steps_to_target, summarize


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


def test_summarize_defaults_target_to_the_meta_inits_inner_steps_and_pairs_gains():
    meta = np.array([[0.2, 0.8, 0.9], [0.2, 0.6, 0.7]])
    random = np.array([[0.2, 0.4, 0.6], [0.2, 0.3, 0.7]])
    # the target: the meta-learned init's mean after its 1 inner step
    out = summarize({"meta": meta, "random": random}, higher_is_better=True, target=None,
                    target_step=1)
    assert out["target"] == pytest.approx(0.7)
    assert out["inits"]["meta"]["steps_to_target"] == 1
    assert out["inits"]["random"]["steps_to_target"] is None  # 0.65 after 2 steps
    assert out["inits"]["meta"]["tasks_reaching_target"] == 1.0
    assert out["inits"]["meta"]["median_task_steps_to_target"] == 1.5
    assert out["inits"]["random"]["tasks_reaching_target"] == 0.5
    assert out["inits"]["random"]["median_task_steps_to_target"] is None  # half reach it
    out = summarize({"meta": meta, "random": random}, higher_is_better=True, target=0.6)
    assert out["inits"]["random"]["steps_to_target"] == 2
    np.testing.assert_allclose(out["gain_over"]["random"]["mean"], [0.0, 0.35, 0.15])
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


def test_finetune_points_are_dense_then_every_ten_steps():
    from metapeft_dist.finetune import finetune_points

    assert finetune_points(200, 10) == [*range(11), *range(20, 201, 10)]
    assert finetune_points(25, 3) == [0, 1, 2, 3, 10, 20, 25]
    assert finetune_points(5, 10) == [0, 1, 2, 3, 4, 5]


def test_finetune_lr_is_mlx_lms_default_step_at_the_adapter_scale():
    from conftest import TINY_SPEC

    from metapeft_dist.config import parse_spec
    from metapeft_dist.finetune import finetune_lr

    def lora(rank, alpha):
        return parse_spec(TINY_SPEC.replace(
            "model: {hidden: [16, 16]}",
            f"model: {{hidden: [8], train: lora, lora: {{rank: {rank}, alpha: {alpha}}}}}"))

    # mlx-lm: 1e-5 at scale 20; here scale alpha / rank
    assert finetune_lr(lora(8, 16)) == pytest.approx(1e-4)
    assert finetune_lr(lora(4, 80)) == pytest.approx(1e-5)
    assert finetune_lr(parse_spec(TINY_SPEC)) == 1e-3  # the whole MLP trained
    assert finetune_lr(parse_spec(TINY_SPEC.replace(
        "baselines: [random]", "baselines: [random], finetune: {lr: 0.02}"))) == 0.02


@pytest.fixture(scope="module")
def tiny_job():
    from conftest import TINY_SPEC

    from metapeft_dist.config import parse_spec
    from metapeft_dist.job import build_job

    spec = parse_spec(TINY_SPEC.replace("baselines: [random]",
                                        "baselines: [random], finetune: {steps: 12, tasks: 6}"))
    return build_job(spec)


def reference_finetune(job, init, shots, points):
    """The standard init trained task by task with mlx.optimizers.Adam (mlx-lm's
    optimizer) at the default lr; the mean query metric at each of ``points``."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from metapeft_dist.finetune import finetune_lr
    from metapeft_dist.job import to_mx

    ft = job.spec.eval.finetune
    sx, sy, qx, qy = to_mx(job.episodes("test", shots, range(ft.tasks), shots))
    loss_fn = job.loss_fn(init.frozen)
    scores = np.zeros((ft.tasks, len(points)))
    for t in range(ft.tasks):
        params, opt, done = init.meta["params"], optim.Adam(finetune_lr(job.spec)), 0
        for j, point in enumerate(points):
            for _ in range(point - done):
                params = opt.apply_gradients(mx.grad(loss_fn)(params, sx[t], sy[t]), params)
            done = point
            out = job.model({**init.frozen, **params}, qx[t])
            scores[t, j] = job.objective.metric(out, qy[t]).item()
    return scores.mean(axis=0)


def test_finetune_is_mlx_adam_on_each_task_and_stops_at_the_target(tiny_job):
    from metapeft_dist.finetune import Finetune

    init = tiny_job.baseline("random")
    whole = Finetune(tiny_job).run(init, 5, target=None)
    points = [0, 1, 2, 3, 10, 12]  # every step to eval.steps (3), then every 10
    assert whole["steps"] == points and whole["steps_to_target"] is None
    # vmapped over tasks against one task at a time: no equal bits promised
    expected = reference_finetune(tiny_job, init, 5, points)
    np.testing.assert_allclose(whole["mean"], expected, rtol=1e-4)
    assert expected[-1] < expected[0]  # MSE falls: the steps did something
    # lower is better (MSE): the first scored step at or below the target
    target = float(expected[4])
    first = next(p for p, m in zip(points, whole["mean"], strict=True) if m <= target)
    stopped = Finetune(tiny_job).run(init, 5, target=target)
    assert stopped["steps_to_target"] == first == stopped["steps"][-1]
    assert stopped["mean"] == whole["mean"][:len(stopped["mean"])]
    assert stopped["lr"] == 1e-3 and stopped["budget"] == 12 and stopped["tasks"] == 6


def test_the_job_evaluation_fine_tunes_the_standard_init_and_charges_it(tiny_job):
    from metapeft_dist.cost import SpendMeter
    from metapeft_dist.evaluate import evaluate_job
    from metapeft_dist.results import cost_line, format_table
    from metapeft_dist.runner import job_cost

    evaluation = evaluate_job(tiny_job, tiny_job.initial_meta)
    summary = evaluation["shots"]["5"]
    # the default target: the meta-learned init's mean after its 1 inner step
    assert summary["target"] == summary["inits"]["meta"]["mean"][1]
    finetune = evaluation["finetune"]
    assert finetune["shots"] == 5 and finetune["target"] == summary["target"]
    cost = job_cost(tiny_job, tiny_job.initial_meta, evaluation, SpendMeter({}))
    standard = cost["per_task"]["standard"]
    assert standard["steps_to_target"] == finetune["steps_to_target"]
    assert standard["reached"] is (finetune["steps_to_target"] is not None)
    reached = finetune["steps_to_target"]
    assert standard["steps_charged"] == (reached if reached is not None else 12)
    assert standard["step_seconds"] > 0
    assert "Adam at lr 0.001" in standard["how"]
    results = {"job": "tiny", "spec": {"algorithm": {"name": "maml"},
                                       "family": {"name": "sinusoid"}},
               "evaluation": evaluation, "meta_training": {}, "cost": cost}
    table = format_table(results)
    assert "target: " in table and "(the meta-learned init after 1 steps)" in table
    assert "standard init fine-tuned (5-shot, Adam lr 0.001, 6 tasks)" in table
    assert cost_line(cost) in table


GAUSSIAN_SPEC = """
family: {name: gaussian, shots: 3, query: 4}
model: {kind: mlp, hidden: [16]}
algorithm: {name: fomaml, meta_batch: 2, iterations: 1}
inner: {steps: 1, lr: 0.5}
eval: {tasks: 4, shots: [3], steps: 2, chunk: 4}
"""


def test_support_scores_before_any_step_are_the_inits_accuracy_on_the_support_set():
    """evaluate.on_support through a Sweep piece: with 0 steps nothing is adapted, so
    support-fit is the init's accuracy on each task's support set, and so is support-cv
    (each fold holds out one example per class: the folds' mean is the mean over all);
    support-cv needs two shots; a named sweep is test or val."""
    import mlx.core as mx

    from metapeft_dist.config import parse_spec
    from metapeft_dist.evaluate import LocalScorer
    from metapeft_dist.sweeps import Sweep, named_sweep
    from metapeft_dist.job import Init, build_job

    job = build_job(parse_spec(GAUSSIAN_SPEC))
    init = Init("meta", job.initial_meta, job.frozen)
    scorer = LocalScorer(job)
    fit = scorer.piece(init, 3, 0, 4, Sweep("test", 9, 0, final_only=True, on="support-fit"))
    cv = scorer.piece(init, 3, 0, 4, Sweep("test", 9, 0, final_only=True, on="support-cv"))
    episodes = job.episodes("test", 9, range(4), 3, 1)
    logits = np.array(job.model({**job.frozen, **init.meta["params"]},
                                mx.array(episodes.support_x)))
    expected = (logits.argmax(-1) == episodes.support_y).mean(axis=1)
    assert fit.shape == cv.shape == (4, 1)
    assert 0 < expected.mean() < 1  # a random init: some right, some wrong
    # float32 means against float64 ones (and the folds' sum of thirds): rounding only
    np.testing.assert_allclose(fit[:, 0], expected, atol=1e-6)
    np.testing.assert_allclose(cv[:, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 shots"):
        scorer.piece(init, 1, 0, 2, Sweep("test", 9, 0, final_only=True, on="support-cv"))
    assert named_sweep(job.spec, "val") == Sweep("val", 0, 1, with_loss=True)
    with pytest.raises(ValueError, match="unknown evaluation sweep 'tset'"):
        scorer.piece(init, 3, 0, 2, "tset")


def test_nll_reads_normalized_log_probabilities_and_picks_the_objective():
    """objectives.nll: the mean negative log-probability of the labels, not normalized
    again (cross-entropy would renormalize among the columns); objective_for gives it
    for a model whose outputs are log-probabilities (model.label_loss: vocabulary)."""
    import mlx.core as mx

    from metapeft_dist.objectives import (CLASSIFICATION, LOG_PROB_CLASSIFICATION,
                                          REGRESSION, cross_entropy, nll, objective_for)

    log_probs = mx.log(mx.array([[0.5, 0.25], [0.125, 0.25]]))  # 0.25, 0.625 elsewhere
    y = mx.array([0, 1], dtype=mx.int32)
    assert nll(log_probs, y).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # among the two columns alone: -log(0.5 / 0.75) and -log(0.25 / 0.375)
    assert cross_entropy(log_probs, y).item() == pytest.approx(math.log(1.5))
    assert objective_for("classification", log_probs=True) is LOG_PROB_CLASSIFICATION
    assert objective_for("classification") is CLASSIFICATION
    assert objective_for("regression", log_probs=True) is REGRESSION
