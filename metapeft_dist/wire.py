"""The msgpack wire format for parameter trees (meta-parameters out, outer gradients back).

A frame is one msgpack map:

    {"format": "metapeft-wire/1",
     "version": <meta-parameter version, int >= 0>,
     "header": {<str>: <int | float | str | bool | None | list of ints>},
     "tensors": {"<group>/<name>": {"dtype": "float32", "shape": [r, c], "data": <bytes>}}}

Decoding never executes code (msgpack only builds plain values, and anything but the
types above is refused) and checks every tensor's name, dtype, shape and byte count
against the tree the receiver expects, so a frame from a buggy or hostile peer is
rejected with one :class:`WireError` naming what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import mlx.core as mx
import msgpack
import numpy as np

from metapeft_dist.tree import flatten, unflatten

FORMAT = "metapeft-wire/1"
_KEYS = {"format", "version", "header", "tensors"}
_TENSOR_KEYS = {"dtype", "shape", "data"}
# dtype name -> (numpy dtype of the raw bytes, mlx dtype); bfloat16 travels as raw uint16.
DTYPES: dict[str, tuple[np.dtype, Any]] = {
    "float32": (np.dtype("<f4"), mx.float32),
    "float16": (np.dtype("<f2"), mx.float16),
    "bfloat16": (np.dtype("<u2"), mx.bfloat16),
    "int32": (np.dtype("<i4"), mx.int32),
}
_HEADER_SCALARS = (int, float, str, bool, type(None))
MAX_HEADER_ITEMS = 64
HEADER_SLACK = 64 * 1024  # bytes a frame may carry beyond its tensors


class WireError(ValueError):
    """A frame is malformed or does not match the expected tree."""


def _dtype_name(dtype: Any) -> str:
    for name, (_, mlx_dtype) in DTYPES.items():
        if dtype == mlx_dtype:
            return name
    raise WireError(f"dtype {dtype} cannot travel (allowed: {', '.join(DTYPES)})")


@dataclass(frozen=True)
class TreeSpec:
    """What a receiver expects: every tensor's flat name, dtype name and shape."""

    entries: Mapping[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def of(cls, tree: Mapping[str, Any]) -> "TreeSpec":
        return cls({name: (_dtype_name(a.dtype), tuple(int(d) for d in a.shape))
                    for name, a in sorted(flatten(tree).items())})

    @property
    def nbytes(self) -> int:
        return sum(DTYPES[d][0].itemsize * math.prod(s) for d, s in self.entries.values())


@dataclass(frozen=True)
class Frame:
    version: int
    header: dict[str, Any]
    tree: dict[str, Any]


def encode(tree: Mapping[str, Any], version: int, header: Mapping[str, Any] | None = None) -> bytes:
    """A frame carrying ``tree`` (nested dicts of MLX arrays) at ``version``."""
    flat = flatten(tree)
    mx.eval(list(flat.values()))
    tensors = {}
    for name, array in sorted(flat.items()):
        dtype = _dtype_name(array.dtype)
        raw = array.view(mx.uint16) if dtype == "bfloat16" else array
        tensors[name] = {"dtype": dtype, "shape": list(array.shape),
                         "data": np.asarray(raw).astype(DTYPES[dtype][0], copy=False).tobytes()}
    return msgpack.packb({"format": FORMAT, "version": int(version), "header": dict(header or {}),
                          "tensors": tensors}, use_bin_type=True)


def decode(frame: Any, expected: TreeSpec) -> Frame:
    """The frame's version, header and tree; :class:`WireError` if anything is off."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"frame must be bytes, got {type(frame).__name__}")
    limit = expected.nbytes + HEADER_SLACK + 256 * len(expected.entries)
    if len(frame) > limit:
        raise WireError(f"frame of {len(frame)} bytes exceeds the {limit} this tree can take")
    try:
        message = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on bad input
        raise WireError(f"not a msgpack frame: {type(err).__name__}: {err}") from None
    if not isinstance(message, dict) or set(message) != _KEYS:
        keys = sorted(message) if isinstance(message, dict) else type(message).__name__
        raise WireError(f"frame must be a map with keys {sorted(_KEYS)}, got {keys}")
    if message["format"] != FORMAT:
        raise WireError(f"frame format {message['format']!r}, expected {FORMAT!r}")
    version = message["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise WireError(f"frame version must be an integer >= 0, got {version!r}")
    header = _check_header(message["header"])
    tensors = message["tensors"]
    if not isinstance(tensors, dict):
        raise WireError(f"frame tensors must be a map, got {type(tensors).__name__}")
    missing = sorted(set(expected.entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected.entries))
    if missing or unexpected:
        raise WireError(f"frame tensors do not match the expected tree: missing {missing}, "
                        f"unexpected {unexpected}")
    flat = {name: _tensor(name, tensors[name], *expected.entries[name]) for name in tensors}
    return Frame(version, header, unflatten(flat))


def declared_spec(frame: bytes) -> TreeSpec:
    """The tree a frame declares (names, dtypes, shapes), checked for form.

    For frames from a trusted peer only (the driver's own initial meta-parameters): the
    result becomes the spec every later frame is decoded against.
    """
    try:
        message = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
        tensors = message["tensors"]
        entries = {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in tensors.items()}
    except Exception as err:
        raise WireError(f"cannot read the tree a frame declares: {err}") from None
    spec = TreeSpec(entries)
    for name, (dtype, shape) in entries.items():
        if dtype not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WireError(f"tensor {name!r} declares dtype {dtype!r}, shape {list(shape)}")
    decode(frame, spec)
    return spec


def _check_header(header: Any) -> dict[str, Any]:
    if not isinstance(header, dict) or len(header) > MAX_HEADER_ITEMS:
        raise WireError("frame header must be a map of at most "
                        f"{MAX_HEADER_ITEMS} entries")
    for key, value in header.items():
        ok = isinstance(value, _HEADER_SCALARS) or (
            isinstance(value, list) and len(value) <= 4096
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise WireError(f"frame header {key!r} has a value of type {type(value).__name__}")
    return header


def _tensor(name: str, entry: Any, dtype: str, shape: tuple[int, ...]) -> mx.array:
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise WireError(f"tensor {name!r} must be a map with keys {sorted(_TENSOR_KEYS)}")
    if entry["dtype"] != dtype:
        raise WireError(f"tensor {name!r} has dtype {entry['dtype']!r}, expected {dtype!r}")
    got_shape = entry["shape"]
    if (not isinstance(got_shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in got_shape)
            or tuple(got_shape) != shape):
        raise WireError(f"tensor {name!r} has shape {got_shape!r}, expected {list(shape)}")
    data = entry["data"]
    raw_dtype, mlx_dtype = DTYPES[dtype]
    size = raw_dtype.itemsize * math.prod(shape)
    if not isinstance(data, bytes) or len(data) != size:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise WireError(f"tensor {name!r} carries {got} bytes, expected {size}")
    array = mx.array(np.frombuffer(data, dtype=raw_dtype).reshape(shape))
    return array.view(mlx_dtype) if dtype == "bfloat16" else array
