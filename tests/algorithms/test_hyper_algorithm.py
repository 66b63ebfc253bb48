"""The hypernetwork as a meta-learning algorithm (algorithms/hyper.py): what it
generates at init, its zero-shot head is the nearest-prototype classifier, its outer
gradient reaches the maps, baselines adapt as MAML, and its spec errors."""

from __future__ import annotations

import metapeft_dist  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist.config import ConfigError, load_spec, parse_spec
from metapeft_dist.job import build_job, to_mx
from metapeft_dist.models.encoder import LOGIT_SCALE

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
        if "lora" in name:
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
    ("family: {name: digits}\nalgorithm: {name: hyper}\n", "needs model.kind encoder"),
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
