"""The LoRA hypernetwork (hyper.py) on the real MiniLM and the WordNet family: its
identities (base adapters at init, invariance to the order of examples and the names of
classes, the nearest-prototype head, the first-order outer gradient), a short
meta-training run, and its file."""

from __future__ import annotations

import metapeft_dist  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist import hyper as H
from metapeft_dist.config import load_spec
from metapeft_dist.job import build_job, to_mx
from metapeft_dist.models.encoder import LOGIT_SCALE

from conftest import JOBS


@pytest.fixture(scope="module")
def net():
    return H.LoraHypernetwork(build_job(load_spec(JOBS / "wordnet-fomaml.yaml")))


@pytest.fixture(scope="module")
def task(net):
    """One 5-way 2-shot meta-train task, 3 queries per class."""
    sx, sy, qx, qy = to_mx(net.job.episodes("train", 7, range(1), shots=2, query=3))
    return sx[0], sy[0], qx[0], qy[0]


def _perturbed(net, seed: int = 1, size: float = 0.05):
    """Parameters whose maps are non-zero, so the generated adapters depend on the task."""
    hyper = net.init(mx.random.key(0))
    keys = iter(mx.random.split(mx.random.key(seed), len(net.names)))
    return {k: (size * mx.random.normal(v.shape, key=next(keys))
                if k.startswith("map_p.") else v) for k, v in hyper.items()}


def test_parameter_count_is_the_documented_one(net):
    hyper = net.init(mx.random.key(0))
    assert H.count_parameters(hyper) == 215_233 < 1_000_000
    assert {k: tuple(v.shape) for k, v in hyper.items()} == net.expected_shapes()


def test_init_generates_exactly_the_base_adapters(net, task):
    sx, sy, _, _ = task
    for base in (None, {k: mx.full(s, 0.01 * i + 0.5) for i, (k, s) in
                        enumerate(net.shapes.items())}):
        hyper = net.init(mx.random.key(3), base)
        expected = net.job.initial_meta["params"] if base is None else base
        adapters = net.adapters(hyper, sx, sy)
        assert set(adapters) == set(net.names)
        for name in net.names:
            assert mx.array_equal(adapters[name], expected[name])


def test_probe_features_in_the_graph_are_the_probes(net, task):
    sx = task[0]
    np.testing.assert_allclose(np.array(net.probe_features(sx)), net.probe.features(sx),
                               rtol=0, atol=1e-5)


def test_order_of_examples_and_names_of_classes_do_not_change_the_adapters(net, task):
    sx, sy, _, _ = task
    hyper = _perturbed(net)
    order = mx.array(np.random.default_rng(0).permutation(sx.shape[0]))
    relabel = np.array([3, 0, 4, 1, 2])  # class k is called relabel[k]
    out = net.generate(hyper, sx, sy)
    moved = net.generate(hyper, sx[order], mx.array(relabel)[sy[order]])
    assert float(mx.abs(out["encoder.layer.5.attention.self.query.lora_b"]).max()) > 1e-3
    for name in net.names:
        np.testing.assert_allclose(np.array(moved[name]), np.array(out[name]), atol=1e-6)
    for name in ("head.w", "head.b"):
        np.testing.assert_allclose(np.array(moved[name])[relabel], np.array(out[name]),
                                   atol=1e-5)


def test_proto_head_is_the_nearest_prototype_classifier():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 6)).astype(np.float32)
    y = np.repeat(np.arange(3), 4)
    c = np.stack([z[y == k].mean(0) for k in range(3)])
    head = H.proto_head(mx.array(z), mx.array(y), 3, scale=4.0)
    points = rng.normal(size=(20, 6)).astype(np.float32)
    logits = LOGIT_SCALE * (points @ np.array(head["head.w"]).T + np.array(head["head.b"]))
    distances = ((points[:, None, :] - c[None]) ** 2).sum(-1)
    # logits = -s |x - c_k|^2 + s |x|^2: the same softmax as the negative distances.
    np.testing.assert_allclose(logits - 4.0 * (points ** 2).sum(-1, keepdims=True),
                               -4.0 * distances, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1) == distances.argmin(-1)).all()


def test_zero_step_gradient_matches_finite_differences(net, task):
    hyper = _perturbed(net)

    def loss(h):
        return net.task_loss(h, *task, inner_steps=0)

    grad = mx.grad(loss)(hyper)
    # Half along the gradient, half random: a derivative well above float32's
    # resolution of the loss, in a direction the gradient does not choose alone.
    rng = np.random.default_rng(2)
    noise = {k: mx.array(rng.normal(size=v.shape).astype(np.float32)) for k, v in hyper.items()}

    def unit(tree):
        norm = np.sqrt(sum(float((v * v).sum()) for v in tree.values()))
        return {k: v / norm for k, v in tree.items()}

    direction = unit({k: a + b for k, a, b in
                      ((k, unit(grad)[k], unit(noise)[k]) for k in hyper)})
    analytic = sum(float((grad[k] * direction[k]).sum()) for k in hyper)
    eps = 1e-2
    plus = loss({k: v + eps * direction[k] for k, v in hyper.items()})
    minus = loss({k: v - eps * direction[k] for k, v in hyper.items()})
    numeric = (plus.item() - minus.item()) / (2 * eps)
    assert analytic > 0.1
    assert numeric == pytest.approx(analytic, rel=0.01)


def test_first_order_gradient_is_the_generators_vjp_at_the_adapted_parameters(net, task):
    sx, sy, qx, qy = task
    hyper = _perturbed(net)
    grad = mx.grad(lambda h: net.task_loss(h, sx, sy, qx, qy, inner_steps=2))(hyper)
    phi = net.adapt(net.generate(hyper, sx, sy), sx, sy, 2)[-1]
    query_grad = mx.grad(net.loss_fn)(phi, qx, qy)
    names, outputs = sorted(hyper), sorted(query_grad)

    def generator(*leaves):
        start = net.generate(dict(zip(names, leaves, strict=True)), sx, sy)
        return [start[k] for k in outputs]

    _, cotangents = mx.vjp(generator, [hyper[k] for k in names],
                           [query_grad[k] for k in outputs])
    expected = dict(zip(names, cotangents, strict=True))
    for name in hyper:
        np.testing.assert_allclose(np.array(grad[name]), np.array(expected[name]),
                                   rtol=1e-3, atol=1e-6)


def test_short_meta_training_lowers_the_query_loss(net):
    job = net.job

    def tasks(iteration, n):
        return to_mx(job.episodes("train", iteration, range(n), shots=2, query=2))

    held = [tasks(10_000 + i, 4) for i in range(2)]  # meta-train tasks, fixed

    def mean_loss(hyper):
        return np.mean([float(mx.mean(mx.vmap(
            lambda a, b, c, d: net.task_loss(hyper, a, b, c, d))(*batch))) for batch in held])

    hyper = net.init(mx.random.key(0))
    before = mean_loss(hyper)
    trained, losses = H.meta_train(net, hyper, (tasks(i, 4) for i in range(20)),
                                   inner_steps=0, outer_lr=3e-3)
    after = mean_loss(trained)
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert after < before - 0.05, (before, after)
    assert not mx.array_equal(trained["map_p." + net.names[0]], hyper["map_p." + net.names[0]])


def test_file_roundtrip_and_errors(net, tmp_path):
    hyper = _perturbed(net)
    path = H.save_hypernetwork(tmp_path / "hyper.safetensors", net, hyper)
    assert H.read_spec(path) == net.spec
    loaded = H.load_hypernetwork(path, net)
    assert set(loaded) == set(hyper)
    for name in hyper:
        assert mx.array_equal(loaded[name], hyper[name])

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="cannot read a LoRA hypernetwork"):
        H.load_hypernetwork(tmp_path / "bad.safetensors", net)
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"w": mx.zeros((2,))})
    with pytest.raises(ValueError, match="is not a metapeft LoRA hypernetwork"):
        H.load_hypernetwork(tmp_path / "other.safetensors", net)
    wider = H.LoraHypernetwork(net.job, H.HyperSpec(task_dim=32), net.probe)
    with pytest.raises(ValueError, match="saved for spec"):
        H.load_hypernetwork(path, wider)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cannot read"):
        H.load_hypernetwork(truncated, net)
