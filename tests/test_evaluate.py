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
