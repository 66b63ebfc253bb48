"""A small conv net (3x3 conv, ReLU, 2x2 max-pool blocks, then a linear head).

The convolution is written as im2col (nine shifted slices, concatenated, one matmul)
rather than ``mx.conv2d``: MLX cannot vmap conv2d's gradient (``AsStrided`` has no
vmap rule), and meta-batches are vmapped through second-order gradients. On 8x8
images the two are equally fast and give the same numbers (tests/models).
"""

from __future__ import annotations

import math

import mlx.core as mx

from metapeft_dist.models.lora import init_lora, lora_delta, record_input
from metapeft_dist.models.mlp import init_linear, linear
from metapeft_dist.tree import Params


def im2col3x3(x: mx.array) -> mx.array:
    """(N, H, W, C) -> (N, H, W, 9C) patches of a 3x3 'same' convolution."""
    h, w = x.shape[-3], x.shape[-2]
    pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    xp = mx.pad(x, pad)
    return mx.concatenate(
        [xp[..., i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1
    )


def conv3x3(params: Params, name: str, x: mx.array, lora_scale: float) -> mx.array:
    w = params[f"{name}.w"]  # (out, 3, 3, in), mlx.nn.Conv2d's layout
    kernel = w.reshape(w.shape[0], -1).T  # (9 in, out)
    delta = lora_delta(params, name, lora_scale)
    if delta is not None:
        kernel = kernel + delta
    patches = im2col3x3(x)
    record_input(f"{name}.w", f"{name}.b", patches)
    return patches @ kernel + params[f"{name}.b"]


def max_pool2(x: mx.array) -> mx.array:
    *lead, h, w, c = x.shape
    x = x[..., : h - h % 2, : w - w % 2, :]
    return x.reshape(*lead, h // 2, 2, w // 2, 2, c).max(axis=(-4, -2))


def init_conv(key: mx.array, input_shape: tuple[int, int, int], channels: tuple[int, ...],
              out_dim: int, lora_rank: int | None) -> Params:
    h, w, c_in = input_shape
    keys = mx.random.split(key, 2 * len(channels) + 1)
    params: Params = {}
    for i, c_out in enumerate(channels):
        fan_in = 9 * c_in
        kw, kb = mx.random.split(keys[2 * i])
        bound = 1.0 / math.sqrt(fan_in)
        params[f"conv{i}.w"] = mx.random.uniform(-bound, bound, (c_out, 3, 3, c_in), key=kw)
        params[f"conv{i}.b"] = mx.random.uniform(-bound, bound, (c_out,), key=kb)
        if lora_rank:
            lora = init_lora(keys[2 * i + 1], fan_in, c_out, lora_rank)
            params.update({f"conv{i}.{k}": v for k, v in lora.items()})
        c_in = c_out
        h, w = h // 2, w // 2
    params.update(init_linear(keys[-1], "head", h * w * c_in, out_dim))
    return params


def conv_net(params: Params, x: mx.array, depth: int, lora_scale: float) -> mx.array:
    """x: (..., H, W, C) -> (..., out)."""
    for i in range(depth):
        x = max_pool2(mx.maximum(conv3x3(params, f"conv{i}", x, lora_scale), 0.0))
    x = x.reshape(*x.shape[:-3], -1)
    return linear(params, "head", x, lora_scale)
