"""The LoRA hypernetwork (algorithms/hyper.py) on the real MiniLM and WordNet, and on
the pretrained digits MLP: what it generates at init, invariance to the order of
examples and the names of classes, its zero-shot head is the nearest-prototype
classifier, its outer gradient (exact at 0 steps, the generator's vjp at the adapted
parameters after first-order steps), baselines adapt as MAML, a short meta-training
lowers the query loss, and its spec errors."""

from __future__ import annotations

import metapeft_dist  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist.algorithms.hyper import proto_head, prune_rank, ranks
from metapeft_dist.config import ConfigError, load_spec, parse_spec
from metapeft_dist.job import build_job, to_mx
from metapeft_dist.models.encoder import LOGIT_SCALE
from metapeft_dist.models.lora import is_adapter

from conftest import JOBS


@pytest.fixture(scope="module")
def job():
    return build_job(load_spec(JOBS / "wordnet-hyper.yaml"))


@pytest.fixture(scope="module")
def batch(job):
    return to_mx(job.episodes("train", 3, range(2), shots=3, query=4))


def test_meta_parameters_are_base_adapters_and_the_hypernetwork(job):
    meta = job.initial_meta
    assert set(meta) == {"params", "hyper"}
    params = meta["params"]
    assert sorted(k for k in params if k.endswith("lora_a")) == [
        "encoder.layer.5.attention.self.query.lora_a",
        "encoder.layer.5.attention.self.value.lora_a"]
    hyper = meta["hyper"]
    assert all(not mx.any(v).item() for k, v in hyper.items() if k.startswith("map_p."))
    # task MLP 768 -> 128 -> 64, four rank-16 maps of 1536-entry matrices, the scale
    assert sum(v.size for v in hyper.values()) == (768 * 128 + 128 + 128 * 64 + 64
                                                   + 4 * (1536 * 16 + 16 * 64) + 1)


def test_at_init_it_generates_the_base_adapters_and_the_prototype_head(job, batch):
    sx, sy, qx, qy = (a[0] for a in batch)
    loss_fn = job.loss_fn()
    start = job.algorithm.adapt(job.initial_meta, loss_fn, sx, sy, steps=0)[0]
    for name, value in job.initial_meta["params"].items():
        if "lora" in name:  # M0 + P (Q t) with P = 0: M0 + 0, exact on any kernel
            assert mx.array_equal(start[name], value)
    # Zero-shot logits rank classes by distance to the support prototypes of the pooled
    # (unit-norm) embeddings: nearest-prototype classification, computed here by hand.
    dim = 384
    pooled = job.model.with_out_dim(dim)
    eye = {"head.w": mx.eye(dim), "head.b": mx.zeros((dim,))}
    z_s = np.array(pooled({**job.frozen, **start, **eye}, sx)) / LOGIT_SCALE
    z_q = np.array(pooled({**job.frozen, **start, **eye}, qx)) / LOGIT_SCALE
    protos = np.stack([z_s[np.array(sy) == c].mean(axis=0) for c in range(5)])
    nearest = np.argmin(((z_q[:, None, :] - protos[None]) ** 2).sum(-1), axis=1)
    logits = np.array(job.model({**job.frozen, **start}, qx))
    assert (logits.argmax(axis=1) == nearest).all()
    np.testing.assert_allclose(
        logits - logits.max(axis=1, keepdims=True),
        (-LOGIT_SCALE * ((z_q[:, None, :] - protos[None]) ** 2).sum(-1))
        - (-LOGIT_SCALE * ((z_q[:, None, :] - protos[None]) ** 2).sum(-1)).max(axis=1,
                                                                               keepdims=True),
        atol=1e-3)


def test_the_outer_gradient_reaches_the_maps_not_the_unused_head(job, batch):
    grad, loss = job.algorithm.batch_grad(job.initial_meta, job.loss_fn(), batch,
                                          mx.zeros((0,)))
    assert np.isfinite(loss.item())
    assert all(mx.any(grad["hyper"][k]).item() for k in grad["hyper"] if k.startswith("map_p."))
    assert mx.any(grad["params"]["encoder.layer.5.attention.self.value.lora_b"]).item()
    assert not mx.any(grad["params"]["head.w"]).item()  # the head comes from the support set


def test_baselines_adapt_as_maml(job, batch):
    sx, sy, _, _ = (a[0] for a in batch)
    random = job.baseline("random")
    assert set(random.meta) == {"params"}
    trajectory = job.algorithm.adapt(random.meta, job.loss_fn(random.frozen), sx, sy, steps=2)
    assert len(trajectory) == 3
    assert mx.array_equal(trajectory[0]["head.w"], random.meta["params"]["head.w"])


@pytest.mark.parametrize("text, phrase", [
    ("family: {name: digits}\nalgorithm: {name: hyper}\n", "needs model.train lora"),
    ("family: {name: sinusoid}\nalgorithm: {name: hyper}\nmodel: {train: lora, lora: {}}\n",
     "a classification family"),
    ("family: {name: wordnet}\nalgorithm: {name: hyper}\nmodel: {kind: encoder}\n",
     "use train: lora"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml, hyper: {}}\n"
     "model: {kind: encoder, train: lora, lora: {}}\n", "options for hyper given"),
    ("family: {name: wordnet}\nalgorithm: {name: hyper, hyper: {map_rank: 0}}\n"
     "model: {kind: encoder, train: lora, lora: {}}\n", "map_rank: must be >= 1"),
])
def test_bad_hyper_specs_name_the_field(text, phrase):
    with pytest.raises(ConfigError) as err:
        parse_spec(text)
    assert any(phrase in line for line in err.value.lines()), err.value.lines()


def test_a_missing_init_run_is_one_error(tmp_path):
    spec = load_spec(JOBS / "wordnet-hyper.yaml", [f"algorithm.hyper.init={tmp_path}"])
    with pytest.raises(ValueError, match="algorithm.hyper.init: .* is not a run directory"):
        build_job(spec)


# --- identities of the generator ---------------------------------------------------------


def _perturbed(meta, seed: int = 1, size: float = 0.05):
    """Meta-parameters whose maps are non-zero, so the generated adapters depend on the
    task."""
    hyper = meta["hyper"]
    keys = iter(mx.random.split(mx.random.key(seed), len(hyper)))
    return {**meta, "hyper": {k: (size * mx.random.normal(v.shape, key=next(keys))
                                  if k.startswith("map_p.") else v) for k, v in hyper.items()}}


def test_order_of_examples_and_names_of_classes_do_not_change_the_adapters(job, batch):
    sx, sy, _, _ = (a[0] for a in batch)
    meta, loss_fn = _perturbed(job.initial_meta), job.loss_fn()
    order = mx.array(np.random.default_rng(0).permutation(sx.shape[0]))
    relabel = np.array([3, 0, 4, 1, 2])  # class k is called relabel[k]
    out = job.algorithm.generate(meta, loss_fn, sx, sy)
    moved = job.algorithm.generate(meta, loss_fn, sx[order], mx.array(relabel)[sy[order]])
    assert float(mx.abs(out["encoder.layer.5.attention.self.query.lora_b"]).max()) > 1e-3
    for name in (k for k in out if is_adapter(k)):
        np.testing.assert_allclose(np.array(moved[name]), np.array(out[name]), atol=1e-6)
    for name in ("head.w", "head.b"):
        np.testing.assert_allclose(np.array(moved[name])[relabel], np.array(out[name]),
                                   atol=1e-5)


def test_proto_head_is_the_nearest_prototype_classifier():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 6)).astype(np.float32)
    y = np.repeat(np.arange(3), 4)
    c = np.stack([z[y == k].mean(0) for k in range(3)])
    head = proto_head(mx.array(z), mx.array(y), 3, scale=4.0, logit_scale=LOGIT_SCALE)
    points = rng.normal(size=(20, 6)).astype(np.float32)
    logits = LOGIT_SCALE * (points @ np.array(head["head.w"]).T + np.array(head["head.b"]))
    distances = ((points[:, None, :] - c[None]) ** 2).sum(-1)
    # logits = -s |x - c_k|^2 + s |x|^2: the same softmax as the negative distances.
    np.testing.assert_allclose(logits - 4.0 * (points ** 2).sum(-1, keepdims=True),
                               -4.0 * distances, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1) == distances.argmin(-1)).all()


def test_dynamic_rank_drops_weak_directions_and_they_stay_dropped():
    # directions' norms: |a_i| = 1, 2, 3 and |b_i| = 3, 1, 1 -> importance 3, 2, 3
    a = mx.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    b = mx.array([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    adapters = {"l.lora_a": a, "l.lora_b": b, "head.w": mx.ones((2, 2))}
    kept = prune_rank(adapters, 0.8)  # below 0.8 x 3 = 2.4: the middle one
    np.testing.assert_array_equal(np.array(kept["l.lora_a"]), np.diag([1.0, 0.0, 3.0]))
    np.testing.assert_array_equal(np.array(kept["l.lora_b"]), [[3, 0], [0, 0], [1, 0]])
    assert ranks(kept) == {"l": 2} and ranks(adapters) == {"l": 3}
    assert ranks(prune_rank(adapters, 0.5)) == {"l": 3}
    assert mx.array_equal(kept["head.w"], adapters["head.w"])

    # the loss of x -> x A B: a dropped direction's gradient is zero in both factors
    def loss(p):
        return ((mx.ones((4, 3)) @ p["l.lora_a"] @ p["l.lora_b"]) ** 2).sum()

    grad = mx.grad(loss)(kept)
    assert not mx.any(grad["l.lora_a"][:, 1]).item() and not mx.any(grad["l.lora_b"][1]).item()
    assert mx.any(grad["l.lora_a"][:, 0]).item()


def test_hyper_with_prune_generates_fewer_directions(job, batch):
    from metapeft_dist.algorithms.hyper import Hyper

    sx, sy, _, _ = (a[0] for a in batch)
    meta = _perturbed(job.initial_meta, size=0.5)
    # the base B is zero, so every direction is the generated one
    pruned = Hyper(0, 0.1, job.algorithm.inner_optimizer, prune=0.9)
    full = job.algorithm.generate(meta, job.loss_fn(), sx, sy)
    kept = pruned.generate(meta, job.loss_fn(), sx, sy)
    assert set(ranks(full).values()) == {4}
    expected = prune_rank({k: v for k, v in full.items() if is_adapter(k)}, 0.9)
    for name, value in expected.items():  # the same generator and the same pruning
        assert mx.array_equal(kept[name], value)
    assert 2 <= sum(ranks(kept).values()) < 8, ranks(kept)


def _query_loss(job, meta, task, steps):
    sx, sy, qx, qy = task
    loss_fn = job.loss_fn()
    phi = job.algorithm.adapt(meta, loss_fn, sx, sy, steps, first_order=True)[-1]
    return loss_fn(phi, qx, qy)


def test_zero_step_gradient_matches_finite_differences(job, batch):
    task = tuple(a[0] for a in batch)
    meta = _perturbed(job.initial_meta)
    hyper = meta["hyper"]

    def loss(h):
        return _query_loss(job, {**meta, "hyper": h}, task, 0)

    grad = mx.grad(loss)(hyper)
    # Half along the gradient, half random: a derivative well above float32's
    # resolution of the loss, in a direction the gradient does not choose alone.
    rng = np.random.default_rng(2)
    noise = {k: mx.array(rng.normal(size=v.shape).astype(np.float32)) for k, v in hyper.items()}

    def unit(tree):
        norm = np.sqrt(sum(float((v * v).sum()) for v in tree.values()))
        return {k: v / norm for k, v in tree.items()}

    direction = unit({k: unit(grad)[k] + unit(noise)[k] for k in hyper})
    analytic = sum(float((grad[k] * direction[k]).sum()) for k in hyper)
    eps = 1e-2
    plus = loss({k: v + eps * direction[k] for k, v in hyper.items()})
    minus = loss({k: v - eps * direction[k] for k, v in hyper.items()})
    numeric = (plus.item() - minus.item()) / (2 * eps)
    assert analytic > 0.1
    assert numeric == pytest.approx(analytic, rel=0.01)


def test_first_order_gradient_is_the_generators_vjp_at_the_adapted_parameters(job, batch):
    task = tuple(a[0] for a in batch)
    sx, sy, qx, qy = task
    meta, loss_fn = _perturbed(job.initial_meta), job.loss_fn()
    grad, _ = job.algorithm.task_grad(meta, loss_fn, task, mx.zeros((0,)))
    phi = job.algorithm.adapt(meta, loss_fn, sx, sy)[-1]  # inner.steps (2) steps
    query_grad = mx.grad(loss_fn)(phi, qx, qy)
    names, outputs = sorted(meta["hyper"]), sorted(query_grad)

    def generator(*leaves):
        start = job.algorithm.generate({**meta, "hyper": dict(zip(names, leaves, strict=True))},
                                       loss_fn, sx, sy)
        return [start[k] for k in outputs]

    _, cotangents = mx.vjp(generator, [meta["hyper"][k] for k in names],
                           [query_grad[k] for k in outputs])
    for name, expected in zip(names, cotangents, strict=True):
        np.testing.assert_allclose(np.array(grad["hyper"][name]), np.array(expected),
                                   rtol=1e-3, atol=1e-6)


# --- on the digits MLP --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return build_job(load_spec(JOBS / "digits-hyper.yaml",
                               ["model.pretrain.steps=200", "algorithm.meta_batch=8"]))


def test_on_the_digits_mlp_the_maps_and_head_read_the_last_hidden_layer(digits):
    meta = digits.initial_meta
    assert sorted(k for k in meta["params"] if is_adapter(k)) == [
        "hidden0.lora_a", "hidden0.lora_b", "hidden1.lora_a", "hidden1.lora_b"]
    hyper = meta["hyper"]
    assert tuple(hyper["task.0.w"].shape) == (64, 128)  # pooled mean and std of 64 features
    assert hyper["metric.log_scale"].item() == pytest.approx(np.log(10.0))
    sx, sy, qx, qy = (a[0] for a in to_mx(digits.episodes("test", 0, range(1), shots=2)))
    start = digits.algorithm.adapt(meta, digits.loss_fn(), sx, sy, steps=0)[0]
    # at init the adapters are the base ones (B = 0: the pretrained MLP), and the head
    # is the nearest prototype in the last hidden layer, found here by hand
    frozen = digits.frozen
    h = np.array(mx.maximum(mx.maximum(sx.reshape(sx.shape[0], -1) @ frozen["hidden0.kernel"]
                                       + frozen["hidden0.b"], 0) @ frozen["hidden1.kernel"]
                            + frozen["hidden1.b"], 0))
    hq = np.array(mx.maximum(mx.maximum(qx.reshape(qx.shape[0], -1) @ frozen["hidden0.kernel"]
                                        + frozen["hidden0.b"], 0) @ frozen["hidden1.kernel"]
                             + frozen["hidden1.b"], 0))
    protos = np.stack([h[np.array(sy) == c].mean(axis=0) for c in range(5)])
    nearest = np.argmin(((hq[:, None, :] - protos[None]) ** 2).sum(-1), axis=1)
    logits = np.array(digits.model({**frozen, **start}, qx))
    assert (logits.argmax(axis=1) == nearest).all()
    # -s |h - c_k|^2 up to a per-example constant, s = 10 / the support's mean |h|^2
    scaled = -10.0 / (h * h).sum(-1).mean() * ((hq[:, None, :] - protos[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits - logits.max(axis=1, keepdims=True),
                               scaled - scaled.max(axis=1, keepdims=True), atol=1e-3)


def test_a_short_meta_training_on_digits_lowers_the_query_loss(digits):
    from metapeft_dist.algorithms.outer import make_optimizer, outer_step

    algorithm, loss_fn = digits.algorithm, digits.loss_fn()
    held = to_mx(digits.episodes("val", 0, range(16)))

    def held_loss(meta):
        _, loss = algorithm.batch_grad(meta, loss_fn, held, mx.zeros((0,)))
        return loss.item()

    meta = digits.initial_meta
    before = held_loss(meta)
    optimizer = make_optimizer(digits.spec.outer, 40)
    for iteration in range(40):
        grad, _ = algorithm.batch_grad(meta, loss_fn, digits.batch(iteration), mx.zeros((0,)))
        meta, _ = outer_step(optimizer, meta, grad, None)
    assert held_loss(meta) < 0.9 * before
