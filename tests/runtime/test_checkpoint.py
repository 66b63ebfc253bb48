"""runtime/checkpoint.py: bit-exact round trip; torn, corrupted or foreign files are
refused with a clear error; writes are atomic; pruning keeps the newest."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import pytest

from metapeft_dist.runtime.checkpoint import (
    CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints,
    save_checkpoint)


def _state():
    meta = {"params": {"hidden0.w": mx.random.normal((4, 3), key=mx.random.key(0)),
                       "head.b": mx.arange(2, dtype=mx.float32)},
            "lr": {"hidden0.w": mx.full((4, 3), 0.1), "head.b": mx.full((2,), 0.1)}}
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(meta)
    meta2 = opt.apply_gradients({k: {n: mx.ones_like(v) for n, v in g.items()}
                                 for k, g in meta.items()}, meta)
    frozen = {"hidden1.w": mx.ones((2, 2), dtype=mx.bfloat16)}
    return meta2, opt.state, frozen


def test_round_trip_is_bit_exact(tmp_path):
    meta, opt_state, frozen = _state()
    path = save_checkpoint(checkpoint_path(tmp_path, 42), 42, meta, opt_state, frozen,
                           {"job": "t"})
    assert path.name == "ckpt-00000042.safetensors"
    ck = load_checkpoint(path)
    assert ck.iteration == 42 and ck.info == {"job": "t"}
    for group in meta:
        for name in meta[group]:
            assert mx.array_equal(ck.meta[group][name], meta[group][name])
    assert ck.frozen["hidden1.w"].dtype == mx.bfloat16
    assert int(ck.optimizer_state["step"]) == int(opt_state["step"])
    assert mx.array_equal(ck.optimizer_state["params"]["hidden0.w"]["v"],
                          opt_state["params"]["hidden0.w"]["v"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    # the trees come back in their own key order, not the file's sorted one
    assert list(ck.meta) == ["params", "lr"] and list(ck.meta["params"]) == ["hidden0.w",
                                                                             "head.b"]


def test_a_checkpoint_without_its_order_loads_sorted_and_a_bad_order_is_refused(tmp_path):
    meta, opt_state, frozen = _state()
    path = save_checkpoint(tmp_path / "c.safetensors", 1, meta, opt_state, frozen)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    older = tmp_path / "older.safetensors"  # as written before the order was kept
    mx.save_safetensors(str(older), arrays, {k: v for k, v in metadata.items() if k != "order"})
    assert list(load_checkpoint(older).meta["params"]) == ["head.b", "hidden0.w"]
    for order in ('["meta/params/head.b"]', "[1, 2]", "{}", "[]", "not json"):
        bad = tmp_path / "bad.safetensors"
        mx.save_safetensors(str(bad), arrays, {**metadata, "order": order})
        with pytest.raises(CheckpointError, match="has bad metadata"):
            load_checkpoint(bad)


def test_restored_optimizer_state_continues_identically(tmp_path):
    meta, opt_state, frozen = _state()
    grads = {k: {n: mx.full(v.shape, 0.5) for n, v in g.items()} for k, g in meta.items()}
    path = save_checkpoint(tmp_path / "c.safetensors", 1, meta, opt_state, frozen)
    a = optim.Adam(learning_rate=1e-3)
    a.init(meta)
    a.state = opt_state  # apply_gradients updates this state in place
    expected = a.apply_gradients(grads, meta)
    ck = load_checkpoint(path)
    b = optim.Adam(learning_rate=1e-3)
    b.init(ck.meta)
    b.state = ck.optimizer_state
    got = b.apply_gradients(grads, ck.meta)
    assert mx.array_equal(got["params"]["hidden0.w"], expected["params"]["hidden0.w"])


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    meta, opt_state, frozen = _state()
    path = save_checkpoint(tmp_path / "c.safetensors", 1, meta, opt_state, frozen)
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: its checksum does not match"):
        load_checkpoint(flipped)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(torn)
    foreign = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(foreign), {"x": mx.ones(2)}, {"format": "other"})
    with pytest.raises(CheckpointError, match="has format 'other'"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    meta, opt_state, frozen = _state()
    for it in (10, 20, 30, 40, 50):
        save_checkpoint(checkpoint_path(tmp_path, it), it, meta, opt_state, frozen)
    prune_checkpoints(tmp_path, keep=2, protect={10})
    assert [it for it, _ in list_checkpoints(tmp_path)] == [10, 40, 50]


def test_best_group_round_trips_and_newest_good_skips_corrupt(tmp_path):
    from metapeft_dist.runtime.checkpoint import newest_good_checkpoint

    meta, opt_state, frozen = _state()
    best = {"params": {"hidden0.w": mx.zeros((4, 3)), "head.b": mx.ones((2,))}}
    save_checkpoint(checkpoint_path(tmp_path, 10), 10, meta, opt_state, frozen,
                    {"best_iteration": 5}, best=best)
    newer = save_checkpoint(checkpoint_path(tmp_path, 20), 20, meta, opt_state, frozen)
    data = bytearray(newer.read_bytes())
    data[-1] ^= 0x01
    newer.write_bytes(bytes(data))
    warnings = []
    ck = newest_good_checkpoint(tmp_path, warnings.append)
    assert ck.iteration == 10 and ck.info == {"best_iteration": 5}
    assert mx.array_equal(ck.best["params"]["head.b"], best["params"]["head.b"])
    assert warnings == ["skipping ckpt-00000020.safetensors: checkpoint "
                        f"{newer} is corrupt: its checksum does not match"]
    assert load_checkpoint(checkpoint_path(tmp_path, 10)).best is not None
    assert newest_good_checkpoint(tmp_path / "empty") is None
