"""algorithms/: meta-gradients against finite differences and closed forms; the
identities between algorithms the acceptance criteria name."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from metapeft_dist.algorithms import MAML, MAMLpp, MetaSGD, Reptile, reptile_update
from metapeft_dist.algorithms.inner import InnerOptimizer, adapt, constant_lr
from metapeft_dist.algorithms.mamlpp import msl_weights


def _tiny_problem(seed=0, tasks=3):
    """A smooth 1-6-1 tanh regression net (float32) and a few sinusoid-like tasks."""
    rng = np.random.default_rng(seed)
    params = {"l1.w": rng.normal(size=(6, 1)) * 0.8, "l1.b": rng.normal(size=6) * 0.5,
              "l2.w": rng.normal(size=(1, 6)) * 0.5, "l2.b": np.zeros(1)}
    params = {k: mx.array(v.astype(np.float32)) for k, v in params.items()}

    def loss_fn(p, x, y):
        h = mx.tanh(x @ p["l1.w"].T + p["l1.b"])
        return mx.mean(mx.square(h @ p["l2.w"].T + p["l2.b"] - y))

    x = rng.uniform(-2, 2, size=(tasks, 20, 1)).astype(np.float32)
    y = (rng.uniform(0.5, 2, size=(tasks, 1, 1)) * np.sin(x - rng.uniform(0, 3, (tasks, 1, 1))))
    x, y = mx.array(x), mx.array(y.astype(np.float32))
    batch = (x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
    return params, loss_fn, batch


def _task(batch, i=0):
    return tuple(part[i] for part in batch)


def _flat(tree):
    return dict(tree_flatten(tree))


def _directional(grad, direction):
    g, d = _flat(grad), _flat(direction)
    return sum(float((g[k] * d[k]).sum()) for k in g)


NO_INPUTS = mx.zeros((0,))


def test_second_order_maml_matches_central_finite_differences():
    params, loss_fn, batch = _tiny_problem()
    task = _task(batch)
    algo = MAML(inner_steps=2, inner_lr=0.1)
    meta = algo.init_meta(params)
    grad, _ = algo.task_grad(meta, loss_fn, task, NO_INPUTS)
    rng = np.random.default_rng(1)
    objective = lambda m: algo.objective(m, loss_fn, task, NO_INPUTS)[0].item()  # noqa: E731
    for _ in range(3):  # three random directions
        direction = tree_map(lambda a: mx.array(rng.normal(size=a.shape).astype(np.float32)),
                             meta)
        eps = 3e-3
        plus = tree_map(lambda a, d, e=eps: a + e * d, meta, direction)
        minus = tree_map(lambda a, d, e=eps: a - e * d, meta, direction)
        numeric = (objective(plus) - objective(minus)) / (2 * eps)
        analytic = _directional(grad, direction)
        assert abs(numeric - analytic) / abs(analytic) < 1e-2


def test_first_order_maml_is_the_query_gradient_at_the_adapted_point():
    params, loss_fn, batch = _tiny_problem()
    task = _task(batch)
    sx, sy, qx, qy = task
    fo, so = MAML(2, 0.1, first_order=True), MAML(2, 0.1)
    g_fo, _ = fo.task_grad(fo.init_meta(params), loss_fn, task, NO_INPUTS)
    g_so, _ = so.task_grad(so.init_meta(params), loss_fn, task, NO_INPUTS)
    phi = adapt(params, loss_fn, sx, sy, 2, constant_lr(0.1))[-1]
    expected = mx.grad(loss_fn)(phi, qx, qy)
    for name in params:
        np.testing.assert_allclose(np.array(g_fo["params"][name]), np.array(expected[name]),
                                   rtol=1e-6, atol=1e-7)
    difference = max(float(mx.abs(g_fo["params"][n] - g_so["params"][n]).max()) for n in params)
    assert difference > 1e-3  # the second-order terms are not negligible here


def test_reptile_with_eps_one_and_one_task_returns_the_adapted_parameters():
    params, loss_fn, batch = _tiny_problem()
    sx, sy, _, _ = _task(batch)
    algo = Reptile(inner_steps=5, inner_lr=0.05)
    meta = algo.init_meta(params)
    phi = adapt(params, loss_fn, sx, sy, 5, constant_lr(0.05))[-1]
    # The closed form...
    direct = reptile_update(params, [phi], outer_lr=1.0)
    # ...and the outer-optimizer path the trainer takes: SGD(lr = eps) on theta - phi.
    one_task = tuple(part[:1] for part in batch)
    grad, _ = algo.batch_grad(meta, loss_fn, one_task, NO_INPUTS)
    stepped = optim.SGD(learning_rate=1.0).apply_gradients(grad, meta)
    for name in params:
        np.testing.assert_allclose(np.array(direct[name]), np.array(phi[name]), atol=1e-6)
        np.testing.assert_allclose(np.array(stepped["params"][name]), np.array(phi[name]),
                                   atol=1e-6)


def test_batched_reptile_is_sgd_on_the_mean_difference():
    params, loss_fn, batch = _tiny_problem(tasks=4)
    algo = Reptile(inner_steps=3, inner_lr=0.05)
    meta = algo.init_meta(params)
    adapted = [adapt(params, loss_fn, batch[0][i], batch[1][i], 3, constant_lr(0.05))[-1]
               for i in range(4)]
    expected = reptile_update(params, adapted, outer_lr=0.3)
    grad, _ = algo.batch_grad(meta, loss_fn, batch, NO_INPUTS)
    got = optim.SGD(learning_rate=0.3).apply_gradients(grad, meta)["params"]
    for name in params:
        np.testing.assert_allclose(np.array(got[name]), np.array(expected[name]), atol=1e-6)


def test_meta_sgd_learning_rates_get_nonzero_gradients():
    params, loss_fn, batch = _tiny_problem()
    for first_order in (False, True):
        algo = MetaSGD(1, 0.1, first_order=first_order)
        meta = algo.init_meta(params)
        assert set(meta["lr"]) == set(params)
        assert all(float(v[0] if v.ndim else v) == pytest.approx(0.1) for v in
                   (a.reshape(-1) for a in meta["lr"].values()))
        grad, _ = algo.task_grad(meta, loss_fn, _task(batch), NO_INPUTS)
        for name in params:
            assert float(mx.abs(grad["lr"][name]).max()) > 0, (first_order, name)
    # Meta-SGD with its initial rates adapts exactly like MAML's first inner step.
    maml = MAML(1, 0.1)
    np.testing.assert_allclose(
        np.array(MetaSGD(1, 0.1).adapt(MetaSGD(1, 0.1).init_meta(params), loss_fn,
                                       *_task(batch)[:2])[-1]["l1.w"]),
        np.array(maml.adapt(maml.init_meta(params), loss_fn, *_task(batch)[:2])[-1]["l1.w"]),
        rtol=1e-6)


def test_mamlpp_with_extras_off_is_maml():
    params, loss_fn, batch = _tiny_problem()
    plain = MAMLpp(3, 0.1, multi_step_loss=False, per_step_lr=False, first_order_until=0)
    maml = MAML(3, 0.1)
    meta_pp, meta = plain.init_meta(params), maml.init_meta(params)
    assert set(meta_pp) == {"params"}
    g_pp, l_pp = plain.batch_grad(meta_pp, loss_fn, batch, plain.step_inputs(0), plain.phase(0))
    g, loss = maml.batch_grad(meta, loss_fn, batch, NO_INPUTS)
    # the same operations in the same order on the same shapes: equal bits are promised
    assert l_pp.item() == loss.item()
    for name in params:
        assert mx.array_equal(g_pp["params"][name], g["params"][name]), name


def test_mamlpp_extras():
    params, loss_fn, batch = _tiny_problem()
    algo = MAMLpp(3, 0.1, multi_step_loss=True, msl_anneal_iterations=100, per_step_lr=True,
                  first_order_until=10)
    meta = algo.init_meta(params)
    assert set(meta["lslr"]) == {"l1", "l2"} and meta["lslr"]["l1"].shape == (3,)
    assert algo.phase(9) is True and algo.phase(10) is False
    grad, _ = algo.batch_grad(meta, loss_fn, batch, algo.step_inputs(50), algo.phase(50))
    assert all(float(mx.abs(g).min()) > 0 for g in grad["lslr"].values())
    # Derivative-order annealing: the first-order phase gives a different meta-gradient.
    g_fo, _ = algo.batch_grad(meta, loss_fn, batch, algo.step_inputs(50), True)
    assert not mx.array_equal(g_fo["params"]["l1.w"], grad["params"]["l1.w"])


def test_msl_weights_anneal_onto_the_last_step():
    np.testing.assert_allclose(msl_weights(0, 4, 100), [0.25] * 4)
    for it in (0, 30, 99, 100, 1000):
        assert sum(msl_weights(it, 4, 100)) == pytest.approx(1.0)
    np.testing.assert_allclose(msl_weights(100, 4, 100), [0.0075] * 3 + [1 - 0.0225])
    np.testing.assert_allclose(msl_weights(5000, 4, 100), msl_weights(100, 4, 100))
    assert msl_weights(7, 1, 100) == [1.0]


@pytest.mark.parametrize("make", [lambda: MAML(2, 0.1), lambda: MAML(2, 0.1, first_order=True),
                                  lambda: MetaSGD(2, 0.1), lambda: MAMLpp(2, 0.1),
                                  lambda: Reptile(2, 0.1)])
def test_vmapped_batch_equals_the_per_task_mean(make):
    params, loss_fn, batch = _tiny_problem(tasks=4)
    algo = make()
    meta = algo.init_meta(params)
    inputs = algo.step_inputs(0)
    vmapped, loss_v = algo.batch_grad(meta, loss_fn, batch, inputs, algo.phase(0), vmap=True)
    looped, loss_l = algo.batch_grad(meta, loss_fn, batch, inputs, algo.phase(0), vmap=False)
    per_task = [algo.task_grad(meta, loss_fn, _task(batch, i), inputs, algo.phase(0))
                for i in range(4)]
    mean = tree_map(lambda *g: sum(g) / 4, *(g for g, _ in per_task))
    for name, value in _flat(mean).items():
        np.testing.assert_allclose(np.array(_flat(vmapped)[name]), np.array(value), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(np.array(_flat(looped)[name]), np.array(value), rtol=1e-4,
                                   atol=1e-6)
    assert loss_v.item() == pytest.approx(np.mean([q.item() for _, q in per_task]), rel=1e-5)


def test_inner_sgd_and_adam_steps_have_their_closed_forms():
    params = {"w": mx.array([1.0, -2.0, 0.0])}

    def loss_fn(p, x, y):
        return mx.sum(mx.square(p["w"]))  # gradient 2w

    x = y = mx.zeros((1,))
    sgd = adapt(params, loss_fn, x, y, 2, constant_lr(0.1))
    np.testing.assert_allclose(np.array(sgd[1]["w"]), [0.8, -1.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.array(sgd[2]["w"]), [0.64, -1.28, 0.0], rtol=1e-6)
    # Adam's bias-corrected first step moves each coordinate by lr * sign(g).
    adam = adapt(params, loss_fn, x, y, 1, constant_lr(0.1), InnerOptimizer("adam", 0.9, 0.999))
    np.testing.assert_allclose(np.array(adam[1]["w"]), [0.9, -1.9, 0.0], atol=1e-6)


def test_second_order_through_adam_is_finite_where_gradients_vanish():
    params, loss_fn, batch = _tiny_problem()
    params = dict(params, **{"l2.b": mx.zeros((1,))})
    algo = MAML(3, 0.01, InnerOptimizer("adam", 0.0, 0.999))
    # A parameter the loss ignores has an exactly zero inner gradient.
    params["unused"] = mx.zeros((2,))
    grad, _ = algo.task_grad(algo.init_meta(params), loss_fn, _task(batch), NO_INPUTS)
    for name, g in _flat(grad).items():
        assert np.isfinite(np.array(g)).all(), name
