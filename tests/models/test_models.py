"""models/: LoRA starts equal to its base and equals the merged weight; one LoRA layer
serves the MLP and the encoder; the im2col conv equals mx.conv2d; the trainable partition
is what the spec says."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist.models import Model, bert, split_trainable, trainable_names
from metapeft_dist.models.conv import conv_net, im2col3x3, init_conv, max_pool2
from metapeft_dist.models.lora import KERNEL, lora_linear
from metapeft_dist.models.mlp import init_mlp, linear, mlp


def _randomize_b(params, key=1):
    out = dict(params)
    for i, name in enumerate(sorted(n for n in params if n.endswith("lora_b"))):
        out[name] = mx.random.normal(params[name].shape, key=mx.random.key(key + i))
    return out


@pytest.mark.parametrize("kind,shape,widths", [("mlp", (3,), (8, 6)), ("mlp", (8, 8, 1), (16,)),
                                               ("conv", (8, 8, 1), (4, 6))])
def test_lora_starts_equal_to_base(kind, shape, widths):
    base = Model(kind, shape, widths, 5)
    lora = Model(kind, shape, widths, 5, lora_rank=2, lora_scale=4.0)
    params = lora.init(mx.random.key(0))
    assert any(n.endswith("lora_a") for n in params)
    assert all(float(mx.abs(v).max()) == 0 for n, v in params.items() if n.endswith("lora_b"))
    base_params = {n: v for n, v in params.items() if "lora" not in n}
    x = mx.random.normal((7, *shape), key=mx.random.key(3))
    # the base's own matmuls on the same shapes plus an exact zero (B = 0; for the conv,
    # kernel + 0): y + 0 == y in IEEE arithmetic, so equal bits on any kernel
    assert mx.array_equal(lora(params, x), base(base_params, x))


def test_mlp_lora_equals_merged_weight():
    params = _randomize_b(init_mlp(mx.random.key(0), 5, (8,), 3, lora_rank=2))
    scale = 0.5
    merged = {n: v for n, v in params.items() if "lora" not in n}
    delta = scale * (params["hidden0.lora_a"] @ params["hidden0.lora_b"])  # (in, out)
    merged["hidden0.kernel"] = params["hidden0.kernel"] + delta  # the kernel is (in, out)
    x = mx.random.normal((4, 5), key=mx.random.key(2))
    np.testing.assert_allclose(np.array(mlp(params, x, 1, scale)), np.array(mlp(merged, x, 1, 0.0)),
                               rtol=1e-5, atol=1e-5)


def test_one_lora_layer_serves_the_mlp_and_the_encoder():
    params = _randomize_b(init_mlp(mx.random.key(0), 5, (8,), 3, lora_rank=2))
    x = mx.random.normal((4, 5), key=mx.random.key(2))
    k, b, a, b_ = (params[f"hidden0.{n}"] for n in ("kernel", "b", "lora_a", "lora_b"))
    assert k.shape == (5, 8)  # the MLP's hidden kernels are (in, out)
    # in this order of operations, to the bit (the low-rank path, never merged)
    assert mx.array_equal(lora_linear(params, "hidden0", x, 0.5, KERNEL),
                          x @ k + b + 0.5 * ((x @ a) @ b_))
    hidden = mx.maximum(lora_linear(params, "hidden0", x, 0.5, KERNEL), 0.0)
    assert mx.array_equal(mlp(params, x, 1, 0.5), lora_linear(params, "head", hidden, 0.5))
    w = mx.contiguous(k.T)  # (out, in), as the heads and Hugging Face store a weight
    expected = x @ w.T + b + 0.5 * ((x @ a) @ b_)
    assert mx.array_equal(linear({"l.w": w, "l.b": b, "l.lora_a": a, "l.lora_b": b_}, "l", x,
                                 0.5), expected)
    hf = {"l.weight": w, "l.bias": b, "l.lora_a": a, "l.lora_b": b_}  # Hugging Face's names
    assert mx.array_equal(bert._dense(hf, "l", x, 0.5), expected)
    assert mx.array_equal(lora_linear({"l.w": w, "l.b": b}, "l", x, 0.5), x @ w.T + b)


def test_im2col_conv_equals_mx_conv2d():
    x = mx.random.normal((3, 8, 8, 2), key=mx.random.key(0))
    w = mx.random.normal((5, 3, 3, 2), key=mx.random.key(1))
    ours = im2col3x3(x) @ w.reshape(5, -1).T
    ref = mx.conv2d(x, w, padding=1)
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-5, atol=1e-5)


def test_conv_lora_equals_merged_kernel():
    params = _randomize_b(init_conv(mx.random.key(0), (8, 8, 1), (4, 3), 5, lora_rank=2))
    scale = 2.0
    merged = {n: v for n, v in params.items() if "lora" not in n}
    for layer in ("conv0", "conv1"):
        w = params[f"{layer}.w"]
        delta = scale * (params[f"{layer}.lora_a"] @ params[f"{layer}.lora_b"])  # (9 in, out)
        merged[f"{layer}.w"] = w + delta.T.reshape(w.shape)
    x = mx.random.normal((6, 8, 8, 1), key=mx.random.key(4))
    np.testing.assert_allclose(np.array(conv_net(params, x, 2, scale)),
                               np.array(conv_net(merged, x, 2, 0.0)), rtol=1e-4, atol=1e-5)


def test_max_pool_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
    expected = x.reshape(2, 3, 2, 2, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(np.array(max_pool2(mx.array(x))), expected)


def test_conv_shapes_and_vmap_through_second_order():
    model = Model("conv", (8, 8, 1), (4, 4), 5)
    params = model.init(mx.random.key(0))
    assert params["head.w"].shape == (5, 2 * 2 * 4)
    x = mx.random.normal((3, 10, 8, 8, 1), key=mx.random.key(1))

    def inner(p, xs):
        g = mx.grad(lambda q: model(q, xs).square().mean())(p)
        return model({k: p[k] - 0.1 * g[k] for k in p}, xs).square().mean()

    grads = mx.grad(lambda p: mx.vmap(inner, in_axes=(None, 0))(p, x).sum())(params)
    assert all(np.isfinite(np.array(g)).all() for g in grads.values())


def test_init_is_deterministic_in_the_key():
    model = Model("mlp", (4,), (8,), 2, lora_rank=2, lora_scale=1.0)
    a, b = model.init(mx.random.key(7)), model.init(mx.random.key(7))
    assert all(mx.array_equal(a[n], b[n]) for n in a)
    c = model.init(mx.random.key(8))
    assert not mx.array_equal(a["hidden0.kernel"], c["hidden0.kernel"])


def test_trainable_partition():
    params = Model("mlp", (4,), (8, 8), 2, lora_rank=2, lora_scale=1.0).init(mx.random.key(0))
    assert trainable_names(params, "all") == set(params)
    assert trainable_names(params, "lora") == {
        "hidden0.lora_a", "hidden0.lora_b", "hidden1.lora_a", "hidden1.lora_b",
        "head.w", "head.b"}
    trainable, frozen = split_trainable(params, "lora")
    assert set(trainable) | set(frozen) == set(params)
    assert set(frozen) == {"hidden0.kernel", "hidden0.b", "hidden1.kernel", "hidden1.b"}
