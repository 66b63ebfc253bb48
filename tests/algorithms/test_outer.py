"""algorithms/outer.py: schedules and clipping give their closed-form values."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from metapeft_dist.algorithms.outer import clip_by_global_norm, make_optimizer, make_schedule
from metapeft_dist.config import OuterSpec


def _lr(schedule, step):
    return float(schedule(mx.array(step))) if callable(schedule) else schedule


def test_constant_cosine_linear_and_warmup():
    assert make_schedule(OuterSpec(lr=0.1), 100) == 0.1
    cos = make_schedule(OuterSpec(lr=0.1, schedule="cosine", end_lr=0.0), 100)
    assert _lr(cos, 0) == pytest.approx(0.1)
    assert _lr(cos, 50) == pytest.approx(0.05, rel=1e-4)
    assert _lr(cos, 100) == pytest.approx(0.0, abs=1e-7)
    lin = make_schedule(OuterSpec(lr=1.0, schedule="linear", end_lr=0.0), 10)
    assert [round(_lr(lin, s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    warm = make_schedule(OuterSpec(lr=0.2, warmup=4, schedule="constant"), 100)
    assert [round(_lr(warm, s), 6) for s in (0, 2, 4, 50)] == [0.0, 0.1, 0.2, 0.2]


def test_optimizer_kinds():
    assert type(make_optimizer(OuterSpec(optimizer="adam"), 10)).__name__ == "Adam"
    assert type(make_optimizer(OuterSpec(optimizer="adamw"), 10)).__name__ == "AdamW"
    assert type(make_optimizer(OuterSpec(optimizer="sgd"), 10)).__name__ == "SGD"


def test_adam_is_bias_corrected():
    # Standard Adam's first step moves each parameter by lr * sign(g).
    opt = make_optimizer(OuterSpec(optimizer="adam", lr=0.01), 10)
    params = {"w": mx.array([1.0, 1.0])}
    opt.init(params)
    stepped = opt.apply_gradients({"w": mx.array([0.5, -3.0])}, params)
    assert stepped["w"].tolist() == pytest.approx([0.99, 1.01], abs=1e-6)


def test_clipping_by_global_norm():
    grads = {"a": mx.array([3.0, 0.0]), "b": {"c": mx.array([4.0])}}
    same, norm = clip_by_global_norm(grads, None)
    assert norm.item() == pytest.approx(5.0)
    assert same is grads
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm.item() == pytest.approx(5.0)
    total = math.sqrt(clipped["a"][0].item() ** 2 + clipped["b"]["c"][0].item() ** 2)
    assert total == pytest.approx(1.0, rel=1e-5)
    untouched, _ = clip_by_global_norm(grads, 10.0)
    assert untouched["a"][0].item() == pytest.approx(3.0)
