"""wire.py: frames round-trip bit-exactly; every malformed frame (hand-made and fuzzed)
is refused with a WireError, never another exception."""

from __future__ import annotations

import mlx.core as mx
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metapeft_dist.wire import FORMAT, TreeSpec, WireError, decode, encode

TREE = {"params": {"hidden0.w": mx.random.normal((4, 3), key=mx.random.key(0)),
                   "head.b": mx.arange(2, dtype=mx.float32)},
        "lr": {"hidden0.w": mx.full((4, 3), 0.1), "head.b": mx.full((2,), 0.1)},
        "half": {"x": mx.ones((3,), dtype=mx.bfloat16)}}
SPEC = TreeSpec.of(TREE)


def test_round_trip_is_bit_exact():
    frame = encode(TREE, 7, {"iteration": 3, "indices": [0, 1], "loss": 0.25})
    got = decode(frame, SPEC)
    assert got.version == 7 and got.header == {"iteration": 3, "indices": [0, 1], "loss": 0.25}
    for group in TREE:
        for name, value in TREE[group].items():
            assert got.tree[group][name].dtype == value.dtype
            assert mx.array_equal(got.tree[group][name], value)
    assert len(frame) < SPEC.nbytes + 400  # the tensors plus a small envelope


def _message(*path, value):
    """A valid frame with the entry at ``path`` replaced by ``value`` (or deleted)."""
    message = msgpack.unpackb(encode(TREE, 1), raw=False)
    node = message
    *parts, last = path
    for p in parts:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return msgpack.packb(message, use_bin_type=True)


_DELETE = object()
W = "params/hidden0.w"

BAD = [
    ("not bytes", "frame must be bytes"),
    (b"\xc1", "not a msgpack frame"),
    (msgpack.packb([1, 2]), "must be a map with keys"),
    (_message("extra", value=1), "must be a map with keys"),
    (_message("format", value="pickle/1"), "frame format 'pickle/1'"),
    (_message("version", value=-1), "version must be an integer >= 0"),
    (_message("version", value=True), "version must be an integer >= 0"),
    (_message("version", value="1"), "version must be an integer >= 0"),
    (_message("header", value=[1]), "header must be a map"),
    (_message("header", "x", value={"a": 1}), "header 'x' has a value of type dict"),
    (_message("tensors", value=[]), "tensors must be a map"),
    (_message("tensors", W, value=_DELETE), f"missing ['{W}']"),
    (_message("tensors", "params/evil",
              value={"dtype": "float32", "shape": [1], "data": b"\0" * 4}),
     "unexpected ['params/evil']"),
    (_message("tensors", W, "dtype", value="float64"), "has dtype 'float64', expected 'float32'"),
    (_message("tensors", W, "shape", value=[3, 4]), "has shape [3, 4], expected [4, 3]"),
    (_message("tensors", W, "shape", value=[4, True]), "has shape"),
    (_message("tensors", W, "data", value=b"\0" * 47), "carries 47 bytes, expected 48"),
    (_message("tensors", W, "data", value="text"), "carries str bytes"),
    (_message("tensors", W, "pickle", value=b"x"), "must be a map with keys"),
    (_message("tensors", W, value=msgpack.ExtType(1, b"code")), "must be a map with keys"),
    (msgpack.packb({"format": FORMAT, "version": 1, "header": {}, "tensors": {}}),
     "missing"),
    (encode(TREE, 1)[:-5], "not a msgpack frame"),
    (encode(TREE, 1) + b"\0", "not a msgpack frame"),
    (b"\0" * (SPEC.nbytes + 10**6), "exceeds the"),
]


@pytest.mark.parametrize("frame,phrase", BAD)
def test_malformed_frames_are_refused_with_a_clear_error(frame, phrase):
    with pytest.raises(WireError) as info:
        decode(frame, SPEC)
    assert phrase in str(info.value)


def test_a_frame_for_another_tree_is_refused():
    other = {"params": {"hidden0.w": mx.zeros((4, 3))}}
    with pytest.raises(WireError, match="missing"):
        decode(encode(other, 1), SPEC)
    with pytest.raises(WireError, match="cannot travel"):
        encode({"params": {"x": mx.zeros((2,), dtype=mx.float64)}}, 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(frame):
    with pytest.raises(WireError):
        decode(frame, SPEC)


GOOD = encode(TREE, 3, {"iteration": 1})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1,
                max_size=8),
       st.integers(0, len(GOOD)))
def test_fuzz_mutated_frames(flips, cut):
    data = bytearray(GOOD)
    for position, value in flips:
        data[position] = value
    data = bytes(data[:cut]) if cut < len(GOOD) else bytes(data)
    try:
        got = decode(data, SPEC)
    except WireError:
        return
    # A mutation that still decodes can only have changed tensor bytes or header values,
    # never the structure the receiver relies on.
    for group in TREE:
        for name, value in TREE[group].items():
            assert got.tree[group][name].shape == value.shape
            assert got.tree[group][name].dtype == value.dtype


plain = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(),
                  st.text(max_size=5), st.binary(max_size=16))
structures = st.recursive(plain, lambda c: st.one_of(st.lists(c, max_size=4),
                                                     st.dictionaries(st.text(max_size=12), c,
                                                                     max_size=4)),
                          max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures)
def test_fuzz_well_formed_msgpack_of_any_shape(value):
    with pytest.raises(WireError):
        decode(msgpack.packb(value, use_bin_type=True), SPEC)


def test_fuzz_strategy_covers_the_real_frame_shape():
    # The expected-tree checks are what stop a structurally valid frame: a correct frame
    # passes, the same frame for a wider tree does not.
    assert decode(GOOD, SPEC).version == 3
    wider = TreeSpec.of({**TREE, "extra": {"y": mx.zeros((1,))}})
    with pytest.raises(WireError, match="missing"):
        decode(GOOD, wider)
    assert np.isfinite(SPEC.nbytes)
