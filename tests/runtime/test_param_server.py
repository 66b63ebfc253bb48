"""runtime/param_server.py and worker.py as plain objects (no Ray): the PS sums chunks
in task order, counts every result once, bounds async staleness; a worker's chunk
gradient is the algorithm's."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from metapeft_dist.algorithms.outer import make_optimizer, outer_step
from metapeft_dist.config import parse_spec
from metapeft_dist.job import build_job
from metapeft_dist.runtime.param_server import ParameterServer
from metapeft_dist.runtime.worker import Worker
from metapeft_dist.wire import TreeSpec, WireError, decode, encode

SPEC = """
family: {name: sinusoid, shots: 5, query: 5}
model: {hidden: [8]}
algorithm: {name: maml, meta_batch: 6, iterations: 10}
inner: {steps: 1, lr: 0.01}
runtime: {chunk: 2, staleness: 1}
"""


def _setup(overrides=()):
    spec = parse_spec(SPEC, overrides=overrides)
    job = build_job(spec)
    ps = ParameterServer(spec.to_dict(), encode(job.initial_meta, 0),
                         encode({"frozen": job.frozen}, 0), total_updates=10)
    return spec, job, ps, Worker(spec.to_dict())


def _flat(tree):
    return dict(tree_flatten(tree))


def test_sync_iteration_equals_the_mean_gradient_update():
    spec, job, ps, worker = _setup()
    frames = {}
    for start in (4, 0, 2):  # arrival order does not matter
        _, frames[start] = worker.run(0, ps.meta_frame(), 0, start, 2)
        assert ps.submit(0, start, frames[start]) == "accepted"
    assert ps.submit(0, 2, frames[2]) == "duplicate"
    out = ps.apply(0)
    assert out["version"] == 1
    # The same update computed directly: the algorithm's mean gradient over the 6 tasks.
    algo = job.algorithm
    per_chunk = [algo.batch_grad(job.initial_meta, job.loss_fn(), job.batch(0, range(s, s + 2)),
                                 algo.step_inputs(0))[0] for s in (0, 2, 4)]
    mean = tree_map(lambda a, b, c: (a * 2 + b * 2 + c * 2) / 6, *per_chunk)
    opt = make_optimizer(spec.outer, 10)
    opt.init(job.initial_meta)
    expected, _ = outer_step(opt, job.initial_meta, mean, spec.outer.clip_norm)
    got = decode_meta(ps)
    for name, value in _flat(expected).items():
        np.testing.assert_allclose(np.array(got[name]), np.array(value), rtol=1e-5, atol=1e-7)
    assert ps.submit(0, 0, frames[0]) == "late"
    stats = ps.get_stats()
    assert (stats["accepted"], stats["duplicates"], stats["late"], stats["applied"]) == (3, 1, 1, 1)


def decode_meta(ps):
    return _flat(ps.meta)


def test_apply_refuses_an_incomplete_iteration_and_bad_frames_are_rejected():
    spec, job, ps, worker = _setup()
    _, frame = worker.run(0, ps.meta_frame(), 0, 0, 2)
    ps.submit(0, 0, frame)
    with pytest.raises(RuntimeError, match=r"chunks missing: \[2, 4\]"):
        ps.apply(0)
    assert ps.submit(0, 2, frame).startswith("rejected: frame is for task (0, 0)")
    assert ps.submit(0, 4, b"garbage").startswith("rejected: not a msgpack frame")
    assert ps.get_stats()["rejected"] == 2


def test_async_staleness_bound_and_accounting():
    spec, job, ps, worker = _setup(["runtime.mode=async"])
    v0 = ps.meta_frame()
    results = [worker.run(0, v0, 0, s, 2)[1] for s in (0, 2, 4)]  # all read version 0
    out = [ps.submit_async(0, s, f) for s, f in zip((0, 2, 4), results, strict=True)]
    assert [o["status"] for o in out] == ["applied", "applied", "dropped"]
    assert [o["staleness"] for o in out] == [0, 1, 2]
    assert ps.submit_async(0, 0, results[0])["status"] == "duplicate"
    stats = ps.get_stats()
    assert stats["applied"] + stats["dropped"] == stats["produced"] == 3
    assert max(stats["applied_staleness"]) <= spec.runtime.staleness
    assert ps.version == 2


def test_worker_chunk_gradient_is_the_algorithms_and_frames_carry_only_trainables():
    spec, job, ps, worker = _setup()
    timings, frame = worker.run(0, ps.meta_frame(), 3, 2, 2)

    got = decode(frame, TreeSpec.of(job.initial_meta))
    assert got.header["iteration"] == 3 and got.header["start"] == 2 and got.header["count"] == 2
    algo = job.algorithm
    want, loss = algo.batch_grad(job.initial_meta, job.loss_fn(), job.batch(3, range(2, 4)),
                                 algo.step_inputs(3))
    for name, value in _flat(want).items():
        np.testing.assert_allclose(np.array(_flat(got.tree)[name]), np.array(value), rtol=1e-5)
    assert got.header["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert timings["bytes_out"] == len(frame) and timings["compute_seconds"] > 0


def test_checkpoint_and_resume_continue_identically(tmp_path):
    spec, job, ps, worker = _setup()

    def iterate(server, it):
        for s in (0, 2, 4):
            server.submit(it, s, worker.run(it, server.meta_frame(), it, s, 2)[1])
        server.apply(it)

    iterate(ps, 0)
    ps.checkpoint(str(tmp_path / "c.safetensors"), 1, {"job": "t"})
    iterate(ps, 1)
    resumed = ParameterServer(spec.to_dict(), encode(job.initial_meta, 0),
                              encode({"frozen": job.frozen}, 0), total_updates=10,
                              resume_from=str(tmp_path / "c.safetensors"))
    assert resumed.version == 1
    iterate(resumed, 1)
    for name, value in _flat(ps.meta).items():
        assert mx.array_equal(_flat(resumed.meta)[name], value)


def test_a_worker_builds_on_the_drivers_frozen_base_and_needs_none_of_its_files(
        tmp_path, tiny_digits_text):
    """On a cluster the run that algorithm.hyper.init names exists on the driver's
    machine only, and pretraining the base again on every machine is wasted: a worker
    gets the driver's frozen base and neither pretrains nor reads the run."""
    from metapeft_dist.runner import run_job

    run_job(parse_spec(tiny_digits_text), tmp_path / "lora")  # a run to start the base from
    spec = parse_spec(tiny_digits_text, overrides=[
        "algorithm.name=hyper", f"algorithm.hyper.init={tmp_path / 'lora'}",
        "algorithm.hyper.task_dim=8", "algorithm.hyper.hidden=8", "algorithm.hyper.map_rank=2"])
    driver = build_job(spec)
    frame = encode({"frozen": driver.stored_frozen()}, 0)
    (tmp_path / "lora").rename(tmp_path / "elsewhere")  # not on the worker's machine

    worker = Worker(spec.to_dict(), frame)
    assert worker.job._pretrained is None  # it did not pretrain
    assert worker.job.frozen.keys() == driver.frozen.keys() == {"hidden0.kernel", "hidden0.b"}
    assert all(mx.array_equal(worker.job.frozen[k], v) for k, v in driver.frozen.items())
    # Its gradient of the driver's meta-parameters (base adapters from the run) is the
    # driver's own.
    _, got = worker.run(0, encode(driver.initial_meta, 0), 1, 0, 2)
    algo = driver.algorithm
    want, _ = algo.batch_grad(driver.initial_meta, driver.loss_fn(), driver.batch(1, range(2)),
                              algo.step_inputs(1))
    got = _flat(decode(got, TreeSpec.of(driver.initial_meta)).tree)
    for name, value in _flat(want).items():
        np.testing.assert_allclose(np.array(got[name]), np.array(value), rtol=1e-5, atol=1e-7)
    # Built from the spec alone, the worker would need the run.
    with pytest.raises(ValueError, match="algorithm.hyper.init: .* is not a run directory"):
        Worker(spec.to_dict())
    # A frozen base of another model is refused by name.
    other = build_job(parse_spec(tiny_digits_text, overrides=["model.hidden=[16]"]))
    with pytest.raises(WireError, match=r"'frozen/hidden0.b' has shape \[16\], expected \[32\]"):
        Worker(spec.to_dict(), encode({"frozen": other.stored_frozen()}, 0))
