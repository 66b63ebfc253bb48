"""Models as pure functions over flat parameter dicts, with optional LoRA adapters.

A :class:`Model` is a frozen description (layer sizes, LoRA scale) with ``init(key)``
and ``__call__(params, x)``; it holds no arrays. The text encoder
(:class:`metapeft_dist.models.encoder.EncoderModel`) has the same three methods. Which
parameters are meta-learned is a partition of the names (:func:`trainable_names`):
everything, or only the LoRA adapters and the head, with the rest frozen and closed over
by the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from metapeft_dist.models import conv, mlp
from metapeft_dist.models.lora import is_adapter
from metapeft_dist.tree import Params, select


@dataclass(frozen=True)
class Model:
    kind: str  # "mlp" | "conv"
    input_shape: tuple[int, ...]
    widths: tuple[int, ...]  # mlp hidden widths or conv channels
    out_dim: int
    lora_rank: int | None = None
    lora_scale: float = 0.0
    logit_scale = 1.0  # the head's output as it is (the encoder scales its own)

    def init(self, key: mx.array) -> Params:
        if self.kind == "mlp":
            in_dim = 1
            for d in self.input_shape:
                in_dim *= d
            return mlp.init_mlp(key, in_dim, self.widths, self.out_dim, self.lora_rank)
        return conv.init_conv(key, self.input_shape, self.widths, self.out_dim, self.lora_rank)

    def __call__(self, params: Params, x: mx.array) -> mx.array:
        """x: (..., *input_shape) -> (..., out_dim)."""
        if self.kind == "mlp":
            if len(self.input_shape) > 1:
                x = x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1)
            return mlp.mlp(params, x, len(self.widths), self.lora_scale)
        return conv.conv_net(params, x, len(self.widths), self.lora_scale)

    def with_out_dim(self, out_dim: int) -> "Model":
        return Model(self.kind, self.input_shape, self.widths, out_dim, self.lora_rank,
                     self.lora_scale)


def build_model(spec, input_shape: tuple[int, ...], out_dim: int, family=None) -> Model:
    """``spec`` is a :class:`metapeft_dist.config.ModelSpec`; a text family's model (kind
    encoder or causal_lm) reads the texts of ``family.corpus`` (models/encoder.py,
    models/causal_lm.py)."""
    if spec.kind == "encoder":
        from metapeft_dist.models.encoder import build_encoder

        return build_encoder(spec, tuple(family.corpus.texts), out_dim)  # type: ignore[return-value]
    if spec.kind == "causal_lm":
        from metapeft_dist.models.causal_lm import build_causal_lm

        return build_causal_lm(spec, tuple(family.corpus.texts), out_dim)  # type: ignore[return-value]
    widths = tuple(spec.hidden if spec.kind == "mlp" else spec.channels)
    if spec.lora is None:
        return Model(spec.kind, tuple(input_shape), widths, out_dim)
    return Model(spec.kind, tuple(input_shape), widths, out_dim, spec.lora.rank,
                 spec.lora.scale)


def is_head(name: str) -> bool:
    return name.startswith("head.")


def trainable_names(params: Params, train: str) -> set[str]:
    """Names meta-learned under ``train``: "all", or "lora" (adapters and the head)."""
    if train == "all":
        return set(params)
    return {n for n in params if is_adapter(n) or is_head(n)}


def split_trainable(params: Params, train: str) -> tuple[Params, Params]:
    """(trainable, frozen) by :func:`trainable_names`."""
    names = trainable_names(params, train)
    return select(params, names.__contains__)
