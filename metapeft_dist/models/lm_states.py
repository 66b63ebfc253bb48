"""A llama-layout mlx-lm module run in two parts, and the corpus states between them.

With right-padded prompts and causal attention, a prompt's hidden states entering a
layer depend on its own tokens only: not on padding, nor on adapters in the layers
above. So :func:`lower_states` (the embedding and the layers below the first adapted
one) runs once per corpus (:func:`corpus_states`, cached on disk by
:func:`corpus_key`), and :func:`upper_states` runs the adapted layers per call, reading
the final-norm state at each prompt's last real token, whose logits for a few tokens
are ``state @ head_rows(module, tokens).T``. :func:`check_layout` checks the split
against the module's own logits (the layout it assumes: llama's).

The cache lives in ``$METAPEFT_CACHE/causal_lm`` (default ``~/.cache/metapeft``), one
safetensors file per key, written atomically; a damaged or stale file reads as missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metapeft_dist.tree import Params

# Part of every corpus cache key: bump it when what the cached states mean changes (or
# their bits: 2, built on blas.CACHE_THREADS OpenBLAS threads).
CACHE_VERSION = 2
_BATCH = 64  # prompts per forward pass when building the corpus states
_FLOAT16_MAX = 65504.0
# The files of a model directory the corpus states depend on (with model*.safetensors).
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def first_adapted(layers: int, num_layers: int) -> int:
    """Index of the first of the top ``num_layers`` of ``layers`` (mlx-lm's tuner adapts
    every layer for num_layers <= 0 or past the count)."""
    return layers - num_layers if 0 < num_layers < layers else 0


def lower_states(module: nn.Module, ids: mx.array, start: int) -> mx.array:
    """(n, L, hidden) states of right-padded prompts ``ids`` entering layer ``start``:
    the embedding and layers 0..start-1, with the causal mask and RoPE positions from 0
    that mlx-lm's llama forward uses."""
    from mlx_lm.models.base import create_attention_mask

    states = module.model.embed_tokens(ids)
    mask = create_attention_mask(states, None)
    for layer in module.model.layers[:start]:
        states = layer(states, mask)
    return states


def upper_states(module: nn.Module, start: int, states: mx.array, last: mx.array) -> mx.array:
    """(n, hidden) final-norm states at positions ``last`` from ``states`` (n, L, hidden)
    entering layer ``start``: layers start.. over every position, except that the top
    layer's MLP (a block's costliest part) runs at the read position alone; no position
    attends past itself, so the read position's state is the full forward's."""
    from mlx_lm.models.base import create_attention_mask

    layers = module.model.layers[start:]
    mask = create_attention_mask(states, None)
    for layer in layers[:-1]:
        states = layer(states, mask)
    top = layers[-1]
    states = states + top.self_attn(top.input_layernorm(states), mask)
    states = mx.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
    states = states + top.mlp(top.post_attention_layernorm(states))
    return module.model.norm(states)


def full_logits(module: nn.Module, read: mx.array) -> mx.array:
    """(n, vocabulary) logits of final-norm states ``read`` (n, hidden): the whole LM
    head (a tied one through the embedding's as_linear, quantized or not)."""
    if tied(module):
        return module.model.embed_tokens.as_linear(read)
    return module.lm_head(read)


def head_rows(module: nn.Module, tokens: mx.array) -> mx.array:
    """(k, hidden) rows of the LM head for ``tokens``: ``hidden @ rows.T`` are those
    tokens' logits. A tied head is the embedding, whose lookup dequantizes a quantized
    one; an ``lm_head``'s rows are sliced (and dequantized)."""
    if tied(module):
        return module.model.embed_tokens(tokens)
    head = module.lm_head
    if isinstance(head, nn.QuantizedLinear):
        return mx.dequantize(head.weight[tokens], head.scales[tokens],
                             None if head.get("biases") is None else head.biases[tokens],
                             head.group_size, head.bits, mode=head.mode)
    return head.weight[tokens]


def state_dtype(module: nn.Module) -> mx.Dtype:
    """The dtype the module computes its states in: its embedding's output (float32
    for a quantized model whose scales are float32)."""
    return module.model.embed_tokens(mx.zeros((1,), dtype=mx.int32)).dtype


def tied(module: nn.Module) -> bool:
    return getattr(module.args, "tie_word_embeddings", False) or not hasattr(module, "lm_head")


def check_layout(module: nn.Module, start: int) -> None:
    """The split forward (:func:`lower_states`, :func:`upper_states`, :func:`head_rows`)
    must give the module's own logits: models that scale embeddings or logits, use
    sliding windows or other blocks than llama's are refused."""
    name = type(module).__module__
    if not hasattr(module, "model") or not all(
            hasattr(module.model, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(f"{name}: unsupported causal LM layout (needs .model.embed_tokens, "
                         ".layers and .norm)")
    if any(getattr(layer, "use_sliding", False) for layer in module.model.layers):
        raise ValueError(f"{name}: sliding-window attention layers are not supported")
    ids = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
    tokens = mx.arange(8, dtype=mx.int32)
    last = mx.array([3])
    theirs = module(ids)[:, 3, :8]
    ours = upper_states(module, start, lower_states(module, ids, start), last) @ head_rows(
        module, tokens).T
    if not mx.allclose(ours.astype(mx.float32), theirs.astype(mx.float32), rtol=1e-2,
                       atol=1e-2).item():
        raise ValueError(f"{name}: the layers and head run apart differ from the model's "
                         "logits; this architecture is not supported")


def corpus_states(module: nn.Module, ids: mx.array, mask: mx.array, start: int,
                  batch: int = _BATCH,
                  progress: Callable[[int, int], None] | None = None) -> mx.array:
    """(N, L, hidden) states entering layer ``start`` of right-padded prompts ``ids``,
    float16 (float32 if a state overflows float16). Prompts go in order of length, each
    batch cut to its longest: a real token's state does not depend on the padding after
    it. Positions past a batch's longest stay zero (padding: never read).
    ``progress(done, total)`` is called after each batch, with prompts done."""
    ids, mask = np.array(ids), np.array(mask)
    lengths = mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    width = lower_states(module, mx.array(ids[:1, :1]), 0).shape[-1]  # shape only
    hidden = np.zeros((*ids.shape, width), dtype=np.float16)
    for begin in range(0, len(ids), batch):
        rows = order[begin:begin + batch]
        cut = int(lengths[rows].max())
        states = np.array(lower_states(module, mx.array(ids[rows, :cut]), start)
                          .astype(mx.float32))
        if hidden.dtype == np.float16 and not np.abs(states).max() <= _FLOAT16_MAX:
            hidden = hidden.astype(np.float32)
        hidden[rows, :cut] = states
        if progress:
            progress(begin + len(rows), len(ids))
    return mx.array(hidden)


def read_states(file: Path, prompts: Params) -> mx.array | None:
    """The cached states in ``file`` if it holds them for exactly these prompts; None
    for a missing, damaged or stale file (rebuilt by the caller)."""
    if not file.is_file():
        return None
    try:
        cached = mx.load(str(file))
        hidden = cached["inputs.hidden"]
        mx.eval(hidden)
    except (OSError, RuntimeError, ValueError, KeyError):
        return None
    same = all(k in cached and cached[k].shape == v.shape and mx.array_equal(cached[k], v).item()
               for k, v in prompts.items())
    return hidden if same and hidden.shape[:2] == prompts["inputs.ids"].shape else None


def corpus_key(path: str, prompt: str, texts: tuple[str, ...], max_len: int,
               start: int) -> str:
    """What the cached states depend on: the model directory's weights, config and
    tokenizer files (resolved path, size, mtime), the prompt template, the texts, the
    token budget and the layer they enter."""
    directory = Path(path).resolve()
    files = sorted(directory.glob("model*.safetensors")) + [
        directory / n for n in _MODEL_FILES if (directory / n).is_file()]
    digest = hashlib.sha256()
    digest.update(f"{CACHE_VERSION}|{directory}|{prompt}|{max_len}|{start}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for text in texts:
        digest.update(b"\0" + text.encode())
    return digest.hexdigest()[:24]
