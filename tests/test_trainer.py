"""trainer.py: the compiled, vmapped meta-step equals the plain one; runs are
deterministic; serial Reptile is the sequential update; meta-training learns."""

from __future__ import annotations

import platform
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metapeft_dist.algorithms import reptile_update
from metapeft_dist.algorithms.inner import adapt
from metapeft_dist.config import parse_spec
from metapeft_dist.cost import SpendMeter
from metapeft_dist.evaluate import Evaluator
from metapeft_dist.job import Init, build_job
from metapeft_dist.runtime.checkpoint import load_checkpoint
from metapeft_dist.trainer import MetaTrainer, Prefetcher

SIN = """
family: {name: sinusoid, shots: 5, query: 5}
model: {hidden: [16, 16]}
algorithm: {name: maml, meta_batch: 4, iterations: 300}
inner: {steps: 1, lr: 0.01}
"""


def _train(text, steps, overrides=()):
    job = build_job(parse_spec(text, overrides=overrides))
    trainer = MetaTrainer(job)
    losses = [trainer.step(i)[0] for i in range(steps)]
    return job, trainer, losses


def _max_diff(a, b):
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys()
    return max(float(mx.abs(fa[k] - fb[k]).max()) for k in fa)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd", "mamlpp"])
def test_compiled_vmapped_step_equals_plain_loop(algorithm):
    text = SIN.replace("name: maml", f"name: {algorithm}")
    _, fast, _ = _train(text, 5, ["inner.steps=2"])
    _, plain, _ = _train(text, 5, ["inner.steps=2", "run.compile=false", "run.batching=loop"])
    assert _max_diff(fast.meta, plain.meta) < 1e-5


def test_same_spec_same_meta_parameters_bitwise():
    _, a, la = _train(SIN, 5)
    _, b, lb = _train(SIN, 5)
    assert la == lb
    assert _max_diff(a.meta, b.meta) == 0.0
    _, c, _ = _train(SIN, 5, ["seed=1"])
    assert _max_diff(a.meta, c.meta) > 0


def test_training_leaves_the_callers_trees_alone():
    job = build_job(parse_spec(SIN))
    before = {k: mx.array(v) for k, v in job.initial_meta["params"].items()}
    trainer = MetaTrainer(job)
    trainer.step(0)
    assert _max_diff(job.initial_meta["params"], before) == 0.0
    assert _max_diff(trainer.meta["params"], before) > 0.0


def test_snapshots_survive_later_compiled_steps():
    job = build_job(parse_spec(SIN))
    trainer = MetaTrainer(job)
    trainer.step(0)
    kept = trainer.snapshot()
    copy = {k: mx.array(v) for k, v in kept["params"].items()}
    trainer.step(1)
    assert _max_diff(kept["params"], copy) == 0.0
    assert _max_diff(trainer.meta["params"], copy) > 0.0


def test_running_one_iteration_ahead_changes_no_bit(tmp_path):
    """Stepped in order, each iteration queues the next one behind it. Its losses, its
    state while the next one is queued (meta, snapshots, a checkpoint's optimizer
    state) and a step out of order (which drops the queued one) are those of a trainer
    stepping one iteration at a time (given batches, it queues nothing)."""
    job = build_job(parse_spec(SIN, overrides=["algorithm.name=metasgd"]))
    ahead, plain = MetaTrainer(job), MetaTrainer(job)
    for i in [0, 1, 2, 3, 7, 8]:  # 7: out of order
        assert ahead.step(i) == plain.step(i, job.batch(i))
        assert _max_diff(ahead.meta, plain.meta) == 0.0
        assert _max_diff(ahead.snapshot(), plain.snapshot()) == 0.0
    for trainer, name in ((ahead, "ahead"), (plain, "plain")):
        trainer.checkpoint(str(tmp_path / f"{name}.safetensors"), 9, {})
    a, p = (load_checkpoint(tmp_path / f"{n}.safetensors") for n in ("ahead", "plain"))
    assert _max_diff(a.meta, p.meta) == 0.0
    assert _max_diff(a.optimizer_state, p.optimizer_state) == 0.0
    assert int(a.optimizer_state["step"]) == 6
    ahead.close()  # drops iteration 9, queued: the state stays after 8
    assert _max_diff(ahead.meta, plain.meta) == 0.0
    assert ahead.step(9) == plain.step(9, job.batch(9))


def test_the_trainer_holds_its_node_on_the_meter_it_is_given():
    spend = SpendMeter({})
    trainer = MetaTrainer(build_job(parse_spec(SIN)), spend=spend)
    trainer.step(0)
    held = spend.reserved_seconds()
    assert list(held) == [platform.node()] and held[platform.node()] > 0
    trainer.close()
    # released: the reservation no longer grows
    assert spend.reserved_seconds(now=time.time() + 3600) == spend.reserved_seconds()


def test_prefetched_batches_are_the_keyed_ones():
    job = build_job(parse_spec(SIN))
    prefetch = Prefetcher(job, 3)
    try:
        for it in (3, 4, 5):
            got = prefetch.batch(it)
            want = job.batch(it)
            assert all(mx.array_equal(g, w) for g, w in zip(got, want, strict=True))
    finally:
        prefetch.close()


def test_serial_reptile_is_the_sequential_update():
    text = SIN.replace("name: maml", "name: reptile, reptile: {serial: true}")
    job, trainer, _ = _train(text, 1, ["runtime.mode=local", "outer.optimizer=sgd", "outer.lr=0.5",
                                       "inner.steps=3", "inner.lr=0.02"])
    theta = job.initial_meta["params"]
    loss_fn = job.loss_fn()
    sx, sy, _, _ = job.batch(0)
    for i in range(4):
        phi = adapt(theta, loss_fn, sx[i], sy[i], 3, lambda k, n: 0.02)[-1]
        theta = reptile_update(theta, [phi], 0.5)
    assert _max_diff(trainer.meta["params"], theta) < 1e-5


def test_sinusoid_maml_learns_an_init_that_adapts_in_one_step():
    job, trainer, losses = _train(SIN, 2000, ["outer.lr=0.002", "model.hidden=[40, 40]",
                                              "algorithm.meta_batch=10"])
    # Measured: 3.16 over the first 200 iterations, 1.18 over the last 200.
    assert np.mean(losses[-200:]) < 0.5 * np.mean(losses[:200])
    evaluator = Evaluator(job, steps=1)
    meta = evaluator.curves(Init("meta", trainer.meta, job.frozen), "test", 5, 100, 0, 50)
    rand = evaluator.curves(job.baseline("random"), "test", 5, 100, 0, 50)
    assert meta.shape == (100, 2)
    # Paired, same 100 held-out tasks: after one step the meta-learned init is far better
    # (measured 1.35 vs 4.07).
    assert meta[:, 1].mean() < 0.5 * rand[:, 1].mean()
    # Scoring the last step alone gives that column and nothing else.
    last = Evaluator(job, steps=1, final_only=True).curves(
        Init("meta", trainer.meta, job.frozen), "test", 5, 100, 0, 50)
    assert last.shape == (100, 1)
    np.testing.assert_allclose(last[:, 0], meta[:, 1], rtol=1e-5, atol=1e-6)


def test_digits_lora_on_a_pretrained_base_learns_only_adapters_and_head():
    text = """
family: {name: digits, ways: 5, shots: 1, query: 5}
model: {kind: mlp, hidden: [32], lora: {rank: 2, alpha: 2}, train: lora, base: pretrained,
        pretrain: {steps: 50, batch: 32}}
algorithm: {name: fomaml, meta_batch: 4, iterations: 3}
inner: {steps: 2, lr: 0.4}
"""
    job, trainer, _ = _train(text, 3)
    assert set(trainer.meta["params"]) == {"hidden0.lora_a", "hidden0.lora_b", "head.w", "head.b"}
    assert set(job.frozen) == {"hidden0.kernel", "hidden0.b"}
    pretrained = job.pretrained()
    assert mx.array_equal(job.frozen["hidden0.kernel"], pretrained["hidden0.kernel"])
    # The adapters moved away from their init; the frozen base did not change.
    assert _max_diff({"b": trainer.meta["params"]["hidden0.lora_b"]},
                     {"b": job.initial_meta["params"]["hidden0.lora_b"]}) > 0
