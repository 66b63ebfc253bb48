"""Models as pure functions over flat parameter dicts, with optional LoRA adapters.

Every model is a frozen description (sizes, paths, LoRA scale) that holds no arrays and
satisfies :class:`Network`: ``init(key)`` gives its parameters, ``model(params, x)`` its
outputs. :class:`Model` here is the MLP and the conv net; the text encoder
(models/encoder.py) and the causal LM (models/causal_lm.py) are the others. The MLP, the
conv net and the encoder end in a linear head (``head.w`` (out, d), ``head.b``) and are
also :class:`Classifier`s: what the head reads (:func:`head_input`) is what the task
embeddings' probe and the LoRA hypernetwork look at; the causal LM classifies by
verbalized labels instead. Which parameters are meta-learned is a partition of the
names (:func:`trainable_names`): everything, or only the LoRA adapters and the head,
with the rest frozen and closed over by the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import mlx.core as mx

from metapeft_dist.models import conv, mlp
from metapeft_dist.models.lora import is_adapter
from metapeft_dist.tree import Params, select


class Network(Protocol):
    """What the algorithms, a job and its evaluation use of a model."""

    kind: str  # "mlp" | "conv" | "encoder" | "causal_lm"
    out_dim: int
    logit_scale: float  # the outputs are the head's (or LM's) times this

    def init(self, key: mx.array) -> Params:
        """Fresh parameters: frozen base, adapters, head, cached inputs."""
        ...

    def __call__(self, params: Params, x: mx.array) -> mx.array:
        """Outputs (..., out_dim) of inputs ``x`` (for text models, indices into the
        corpus) under ``params``."""
        ...

    def with_out_dim(self, out_dim: int) -> Network:
        """The same model with ``out_dim`` outputs."""
        ...

    def export(self, params: Params, out_dir: str | Path) -> Path | None:
        """The adapters in ``params`` as a directory to share (mlx-lm's format for the
        causal LM), or None for models that have no such format (MLP, conv net)."""
        ...


class Classifier(Network, Protocol):
    """A network ending in a linear head ``head.w`` (out, d), ``head.b`` (the MLP, the
    conv net, the encoder; not the causal LM), its output multiplied by
    ``logit_scale``: what the head reads is :func:`head_input`."""


def head_input(model: Classifier, params: Params, x: mx.array, dim: int) -> mx.array:
    """What the head of ``model`` reads for inputs ``x``: (..., dim), times the model's
    ``logit_scale``; the model run on ``params`` (any head in them is replaced) with an
    identity head."""
    identity = {"head.w": mx.eye(dim), "head.b": mx.zeros((dim,))}
    return model.with_out_dim(dim)({**params, **identity}, x)


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

    def export(self, params: Params, out_dir: str | Path) -> None:
        """Nothing: the MLP and the conv net have no adapter format to share."""
        return None


def build_model(spec, input_shape: tuple[int, ...], out_dim: int, family=None) -> Network:
    """``spec`` is a :class:`metapeft_dist.config.ModelSpec`; a text family's model (kind
    encoder or causal_lm) reads the texts of ``family.corpus`` (models/encoder.py,
    models/causal_lm.py)."""
    if spec.kind == "encoder":
        from metapeft_dist.models.encoder import build_encoder

        return build_encoder(spec, tuple(family.corpus.texts), out_dim)
    if spec.kind == "causal_lm":
        from metapeft_dist.models.causal_lm import build_causal_lm

        return build_causal_lm(spec, tuple(family.corpus.texts), out_dim)
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
