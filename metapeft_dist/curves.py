"""Statistics of adaptation curves: means with 95% confidence intervals, steps to a
target, and the per-init summary results.json's evaluation holds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def mean_ci95(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and the half-width of its normal 95% confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    mean = values.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, Z95 * values.std(axis=0, ddof=1) / math.sqrt(n)


def steps_to_target(curve: np.ndarray, target: float, higher_is_better: bool) -> int | None:
    """First step at which ``curve`` reaches ``target``; None if it never does."""
    reached = curve >= target if higher_is_better else curve <= target
    hits = np.flatnonzero(reached)
    return int(hits[0]) if hits.size else None


def summarize(curves: dict[str, np.ndarray], higher_is_better: bool,
              target: float | None, target_step: int = -1) -> dict[str, Any]:
    """Per init: mean and 95% CI at every step, steps-to-target on the mean curve and
    per task; per baseline: the paired gain of the meta-learned init over it. ``target``
    unset: the meta-learned init's mean after ``target_step`` steps (what it reaches
    after its inner steps)."""
    if target is None and "meta" in curves:
        target = float(mean_ci95(curves["meta"])[0][target_step])
    out: dict[str, Any] = {"target": target, "inits": {}, "gain_over": {}}
    for name, values in curves.items():
        mean, ci = mean_ci95(values)
        entry: dict[str, Any] = {"mean": mean.tolist(), "ci95": ci.tolist()}
        if target is not None:
            entry["steps_to_target"] = steps_to_target(mean, target, higher_is_better)
            per_task = [steps_to_target(row, target, higher_is_better) for row in values]
            reached = [s for s in per_task if s is not None]
            entry["tasks_reaching_target"] = len(reached) / len(per_task)
            entry["median_task_steps_to_target"] = (
                float(np.median(reached)) if len(reached) * 2 > len(per_task) else None)
        out["inits"][name] = entry
    if "meta" in curves:
        sign = 1.0 if higher_is_better else -1.0
        for name, values in curves.items():
            if name == "meta":
                continue
            gain, ci = mean_ci95(sign * (curves["meta"] - values))
            out["gain_over"][name] = {"mean": gain.tolist(), "ci95": ci.tolist()}
    return out
