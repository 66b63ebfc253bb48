"""algorithms/outer.py: schedules and clipping give their closed-form values; the
compiled outer update is the plain one."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from metapeft_dist.algorithms.outer import (
    clip_by_global_norm, make_optimizer, make_schedule, meta_holder, outer_step, outer_update)
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


def _updated(compile, gradient=None, args=()):
    optimizer = make_optimizer(OuterSpec(optimizer="adam", lr=0.1, clip_norm=1.0), 10)
    meta = {"params": {"w": mx.array([1.0, -2.0]), "b": mx.array([0.5])}}
    optimizer.init(meta)
    holder = meta_holder(meta)
    update = outer_update(optimizer, holder, 1.0, compile, gradient)
    outs = [update(*args) for _ in range(3)]
    mx.eval(outs, holder, optimizer.state)
    return meta, holder["meta"], outs


def test_outer_update_is_outer_step_compiled_or_not():
    grad = {"params": {"w": mx.array([3.0, 0.0]), "b": mx.array([4.0])}}
    meta, compiled, norms = _updated(True, args=(grad,))
    _, plain, plain_norms = _updated(False, args=(grad,))
    # the caller's tree is not the one rewritten
    assert meta["params"]["w"].tolist() == [1.0, -2.0]
    # by hand: three outer_steps on the same gradient
    optimizer = make_optimizer(OuterSpec(optimizer="adam", lr=0.1, clip_norm=1.0), 10)
    optimizer.init(meta)
    for _ in range(3):
        meta, norm = outer_step(optimizer, meta, grad, 1.0)
    for got in (compiled, plain):
        for name in ("w", "b"):
            assert mx.allclose(got["params"][name], meta["params"][name], atol=1e-6).item()
    assert [n.item() for n in norms] == [n.item() for n in plain_norms] == [5.0] * 3


def test_outer_update_with_a_gradient_returns_its_loss_and_the_norm():
    def gradient(meta, scale):  # loss = scale * sum(w^2) / 2, gradient scale * w
        w = meta["params"]["w"]
        return ({"params": {"w": scale * w, "b": mx.zeros((1,))}},
                (scale * mx.sum(w * w) / 2))

    meta, compiled, outs = _updated(True, gradient, (mx.array(2.0),))
    _, plain, plain_outs = _updated(False, gradient, (mx.array(2.0),))
    (loss0, norm0), (loss1, _), _ = outs
    assert loss0.item() == pytest.approx(5.0)  # at the initial w = (1, -2)
    assert norm0.item() == pytest.approx(2 * math.sqrt(5.0), rel=1e-6)
    assert loss1.item() < loss0.item()
    assert [x.item() for o in outs for x in o] == pytest.approx(
        [x.item() for o in plain_outs for x in o], rel=1e-6)
    assert mx.allclose(compiled["params"]["w"], plain["params"]["w"], atol=1e-6).item()
    assert compiled["params"]["b"].tolist() == pytest.approx([0.5])
