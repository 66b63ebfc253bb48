"""A ReLU MLP as a pure function over a flat parameter dict: hidden layers ``hidden{i}``
with an (in, out) ``kernel`` (models/lora.py says why), a head ``head`` with an
(out, in) ``w`` like every model's head (the probe and the hypernetwork read it)."""

from __future__ import annotations

import math

import mlx.core as mx

from metapeft_dist.models.lora import KERNEL, init_lora, lora_linear
from metapeft_dist.tree import Params


def init_linear(key: mx.array, name: str, fan_in: int, fan_out: int) -> Params:
    """Uniform in +-1/sqrt(fan_in) for weight and bias (mlx.nn.Linear's default)."""
    kw, kb = mx.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return {
        f"{name}.w": mx.random.uniform(-bound, bound, (fan_out, fan_in), key=kw),
        f"{name}.b": mx.random.uniform(-bound, bound, (fan_out,), key=kb),
    }


def init_kernel(key: mx.array, name: str, fan_in: int, fan_out: int) -> Params:
    """:func:`init_linear`'s numbers, the weight stored (fan_in, fan_out) as the kernel."""
    params = init_linear(key, name, fan_in, fan_out)
    return {f"{name}.{KERNEL}": mx.contiguous(params.pop(f"{name}.w").T), **params}


def linear(params: Params, name: str, x: mx.array, lora_scale: float) -> mx.array:
    """The layer ``name`` (``.w``, ``.b``), with its LoRA adapter where it has one."""
    return lora_linear(params, name, x, lora_scale)


def init_mlp(key: mx.array, in_dim: int, hidden: tuple[int, ...], out_dim: int,
             lora_rank: int | None) -> Params:
    widths = (in_dim, *hidden)
    keys = mx.random.split(key, 2 * len(hidden) + 1)
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        params.update(init_kernel(keys[2 * i], f"hidden{i}", fan_in, fan_out))
        if lora_rank:
            lora = init_lora(keys[2 * i + 1], fan_in, fan_out, lora_rank)
            params.update({f"hidden{i}.{k}": v for k, v in lora.items()})
    params.update(init_linear(keys[-1], "head", widths[-1], out_dim))
    return params


def mlp(params: Params, x: mx.array, depth: int, lora_scale: float) -> mx.array:
    """x: (..., features) -> (..., out). Inputs with more axes are flattened first."""
    for i in range(depth):
        x = mx.maximum(lora_linear(params, f"hidden{i}", x, lora_scale, KERNEL), 0.0)
    return linear(params, "head", x, lora_scale)
