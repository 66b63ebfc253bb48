"""LoRA (Hu et al. 2021) on flat parameter dicts.

A layer ``name`` with weight ``name.w`` (out, in) gets ``name.lora_a`` (in, r) and
``name.lora_b`` (r, out), stored in mlx-lm's layout so adapters export as they are.
The layer computes ``x W^T + b + scale * (x A) B`` with ``scale = alpha / r``.
A starts uniform in +-1/sqrt(in) and B at zero, so an adapted model starts equal to
its base. Conv kernels (out, kh, kw, in) are adapted as the (out, kh*kw*in) matrix
they multiply im2col patches with, as loralib's ConvLoRA does.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import mlx.core as mx

from metapeft_dist.tree import Params

LORA_KEYS = ("lora_a", "lora_b")
# A weight keyed ``kernel`` is stored (in, out) and multiplies its input as ``x K`` (the
# MLP's hidden layers); one keyed otherwise is (out, in), as mlx.nn.Linear and Hugging
# Face store it, and multiplies as ``x W^T``. In the inner loop's batched, adapted copies
# the (in, out) layout runs ~20% faster: the copies stay in the layout the matmuls read.
KERNEL = "kernel"

# Where a linear layer's inputs are kept while :func:`recording_inputs` is active.
_INPUTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lora_inputs",
                                                                      default=None)


@contextlib.contextmanager
def recording_inputs() -> Iterator[dict[str, tuple[mx.array, str]]]:
    """Within it, every linear layer a model runs (:func:`lora_linear`, the conv net's
    im2col matmul) records ``weight key -> (its input, its bias key)``, the input as the
    weight multiplies it: (..., fan_in); so does every layer norm (the BERT encoder's),
    whose weight and bias scale and shift its normalized input elementwise. Task2Vec's
    per-unit Fisher reads them (embed/task2vec.py). Only for eager calls: inside a
    transformation the inputs are placeholders."""
    inputs: dict[str, tuple[mx.array, str]] = {}
    token = _INPUTS.set(inputs)
    try:
        yield inputs
    finally:
        _INPUTS.reset(token)


def record_input(weight: str, bias: str, x: mx.array) -> None:
    """Keep ``x`` as the input of the layer with keys ``weight`` and ``bias`` while
    :func:`recording_inputs` is active."""
    inputs = _INPUTS.get()
    if inputs is not None:
        inputs[weight] = (x, bias)


def init_lora(key: mx.array, fan_in: int, fan_out: int, rank: int) -> dict[str, mx.array]:
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "lora_a": mx.random.uniform(-bound, bound, (fan_in, rank), key=key),
        "lora_b": mx.zeros((rank, fan_out)),
    }


def lora_linear(params: Params, layer: str, x: mx.array, scale: float, weight: str = "w",
                bias: str = "b") -> mx.array:
    """``x W^T + b + scale * (x A) B``, the adapter term only where ``layer`` has one.

    ``weight`` / ``bias``: the layer's key suffixes (``w`` / ``b`` in the conv net's and
    the MLP's heads, :data:`KERNEL` / ``b`` in the MLP's hidden layers, whose weight is
    stored transposed, Hugging Face's ``weight`` / ``bias`` in the BERT encoder). The
    adapter path stays low-rank, ``(x A) B``, never merged into W as :func:`lora_delta`
    is: that is a different order of operations, so different bits.
    """
    record_input(f"{layer}.{weight}", f"{layer}.{bias}", x)
    w = params[f"{layer}.{weight}"]
    y = (x @ w if weight == KERNEL else x @ w.T) + params[f"{layer}.{bias}"]
    a = params.get(f"{layer}.lora_a")
    if a is not None:
        y = y + scale * ((x @ a) @ params[f"{layer}.lora_b"])
    return y


def lora_delta(params: Params, layer: str, scale: float) -> mx.array | None:
    """scale * A B as an (in, out) matrix, or None if ``layer`` has no adapter: the
    update merged into a weight, for a layer that multiplies its input once by a
    reshaped kernel (the conv net's im2col patches)."""
    a = params.get(f"{layer}.lora_a")
    if a is None:
        return None
    return scale * (a @ params[f"{layer}.lora_b"])


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_KEYS
