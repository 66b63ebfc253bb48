"""Few-shot text classification with a causal LM from mlx-lm: LoRA (mlx-lm's own tuner)
on the attention projections of its top layers, the label read off the next-token
logits, as a :class:`Model` over example *indices*.

Every corpus text becomes the prompt ``"Text: {text}\\nLabel:"``; an example's logits are
the LM's next-token logits after the prompt restricted to the verbalizer tokens of the
``ways`` labels, so cross-entropy over them is the LM's loss on the label token. Labels
are verbalized as the letters " A", " B", " C", ... (at most 26 ways): an episode's
labels 0..ways-1 are in an arbitrary order per episode (tasks/text.py), so the category
names would mislead the model; letters are neutral and single tokens in every common
vocabulary (checked at build time).

Prompts are tokenized once per corpus into the frozen entries ``inputs.ids`` and
``inputs.mask`` (int32, (N, L), L = min(max_len, longest prompt)), **right-padded**:
attention is causal, so pad tokens after a prompt never reach its real tokens and the
RoPE positions start at 0 as without padding; the logits are read at the last real
token, ``sum(mask) - 1``, and equal the unpadded LM's. A prompt longer than ``max_len``
keeps its first tokens and its ``"\\nLabel:"`` tail, so it always ends where the label
comes.

The base weights live in the mlx-lm module, loaded once per process and LoRA
configuration (they never enter the parameter dict, never travel). The parameter dict
holds the frozen inputs and the adapters, named as mlx-lm names them
(``model.layers.1.self_attn.q_proj.lora_a`` (in, r), ``.lora_b`` (r, out); the layer
computes ``linear(x) + scale * (x A) B``), so they export as they are (models/export.py).
``__call__`` sets the adapter arrays into the module (``module.update``) and runs it: a
functional interface over a stateful module.

* ``mx.value_and_grad`` w.r.t. the adapter dict works through ``module.update``: the
  arrays set into the module are the traced inputs, so gradients flow (tested against
  finite differences).
* ``mx.vmap`` over a leading task axis of the adapters (and of x) works too (tested
  against separate calls), so ``run.batching: vmap`` applies.

The module is shared by every call in the process and holds the last adapters set into
it: calls must not run concurrently in threads (actors run one task at a time).
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from metapeft_dist.tree import Params

PROMPT = "Text: {text}\nLabel:"
PROMPT_TAIL = "\nLabel:"
LABEL_PREFIX = "Label:"  # the verbalizer token is what follows it: " A", " B", ...
LETTERS = string.ascii_uppercase
DEFAULT_KEYS = ("self_attn.q_proj", "self_attn.v_proj")
# The spec's projection names (LoraSpec.targets) -> mlx-lm's module paths in a layer.
TARGET_KEYS = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
               "value": "self_attn.v_proj", "output": "self_attn.o_proj"}


@dataclass(frozen=True)
class CausalLMModel:
    """LoRA-adapted causal LM read as a ``out_dim``-way classifier. ``texts`` is the
    corpus the indices point into; ``num_layers`` top layers get adapters on ``keys``."""

    path: str
    num_layers: int
    keys: tuple[str, ...]
    lora_rank: int
    lora_scale: float
    max_len: int
    out_dim: int
    texts: tuple[str, ...] = field(compare=False, hash=False, repr=False, default=())
    kind: str = "causal_lm"

    def module(self) -> nn.Module:
        """The process's mlx-lm module for this path and LoRA configuration."""
        return _load(self.path, self.num_layers, self.keys, self.lora_rank,
                     self.lora_scale)[0]

    def verbalizer(self) -> mx.array:
        """Token ids of " A", " B", ... for labels 0..out_dim-1."""
        return mx.array(_verbalizer(self.path, self.out_dim), dtype=mx.int32)

    def init(self, key: mx.array) -> Params:
        """Fresh adapters (A uniform in +-1/sqrt(in), B = 0: the model starts equal to
        the base LM) and the tokenized corpus prompts."""
        shapes = adapter_shapes(self.module())
        keys = mx.random.split(key, len(shapes))
        adapters = {}
        for k, (name, shape) in zip(keys, shapes.items(), strict=True):
            if name.endswith(".lora_a"):
                bound = 1.0 / shape[0] ** 0.5
                adapters[name] = mx.random.uniform(-bound, bound, shape, key=k)
            else:
                adapters[name] = mx.zeros(shape)
        return {**adapters, **_prompts(self.path, self.texts, self.max_len)}

    def __call__(self, params: Params, x: mx.array) -> mx.array:
        """x: int example indices (...,) -> logits (..., out_dim) of the verbalizer
        tokens at each prompt's last position."""
        module = self.module()
        module.update(tree_unflatten([(n, v) for n, v in params.items()
                                      if not n.startswith("inputs.")]))
        index = x.astype(mx.int32)
        ids = params["inputs.ids"][index]
        mask = params["inputs.mask"][index]
        lead, length = ids.shape[:-1], ids.shape[-1]
        last = mask.reshape(-1, length).sum(axis=-1) - 1
        logits = next_token_logits(module, ids.reshape(-1, length), last)
        return logits[:, self.verbalizer()].astype(mx.float32).reshape(*lead, self.out_dim)

    def with_out_dim(self, out_dim: int) -> "CausalLMModel":
        return CausalLMModel(self.path, self.num_layers, self.keys, self.lora_rank,
                             self.lora_scale, self.max_len, out_dim, self.texts)

    def export(self, params: Params, out_dir) -> Path:
        """Write the adapters in mlx-lm's format (models/export.py)."""
        from metapeft_dist.models.export import export_adapters

        return export_adapters(params, out_dir, self.path, self.num_layers, self.lora_rank,
                               self.lora_scale, self.keys)


def build_causal_lm(spec, texts: tuple[str, ...], out_dim: int) -> CausalLMModel:
    """``spec`` is a :class:`metapeft_dist.config.ModelSpec` whose ``path`` is a local
    mlx-lm model directory; ``lora.targets`` names projections as for the encoder
    (query, key, value, output) or as mlx-lm module paths (self_attn.q_proj)."""
    if not spec.path:
        raise ValueError("model.path: a causal LM needs a local mlx-lm model directory")
    path = str(Path(spec.path).expanduser())
    layers = _config(path).get("num_hidden_layers")
    if spec.lora.layers is None or layers is None:
        num_layers = spec.lora.layers or layers or -1  # -1: every layer, as in mlx-lm
    else:
        num_layers = min(spec.lora.layers, layers)
    keys = tuple(TARGET_KEYS.get(t, t) for t in spec.lora.targets)
    return CausalLMModel(path, num_layers, keys, spec.lora.rank, spec.lora.scale,
                         spec.max_len, out_dim, tuple(texts))


def next_token_logits(module: nn.Module, ids: mx.array, last: mx.array) -> mx.array:
    """(n, vocab) logits after position ``last[i]`` of ``ids[i]``: the trunk over all
    positions, the LM head only at the read position."""
    hidden = module.model(ids)
    hidden = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    if getattr(module.args, "tie_word_embeddings", False) or not hasattr(module, "lm_head"):
        return module.model.embed_tokens.as_linear(hidden)
    return module.lm_head(hidden)


def adapter_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The adapters mlx-lm's tuner attached, by mlx-lm's names, sorted."""
    return dict(sorted((n, tuple(v.shape))
                       for n, v in tree_flatten(module.trainable_parameters())))


def _directory(path: str) -> Path:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} is not a local mlx-lm model directory "
                                "(no config.json)")
    return Path(path)


@functools.lru_cache(maxsize=4)
def _config(path: str) -> dict:
    from mlx_lm.utils import load_config

    return load_config(_directory(path))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    """mlx-lm's tokenizer wrapper, as ``mlx_lm.load`` builds it (no weights loaded)."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(_directory(path), eos_token_ids=_config(path).get("eos_token_id"))


@functools.lru_cache(maxsize=2)
def _load(path: str, num_layers: int, keys: tuple[str, ...], rank: int, scale: float):
    """(module with LoRA, tokenizer). One module per LoRA configuration: attaching LoRA
    changes the module in place, so configurations must not share one."""
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers

    module, tokenizer = mlx_lm.load(str(_directory(path)))
    _check_head(module)
    module.freeze()
    linear_to_lora_layers(module, num_layers,
                          {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)})
    module.eval()
    if not adapter_shapes(module):
        raise ValueError(f"model.lora.targets: no layer of {path} matches {list(keys)}")
    return module, tokenizer


def _check_head(module: nn.Module) -> None:
    """Reading the head at one position must give the module's own logits (models that
    scale or cap logits after the head are not supported)."""
    if not hasattr(module, "model") or not hasattr(module.model, "embed_tokens"):
        raise ValueError(f"{type(module).__module__}: unsupported causal LM layout "
                         "(needs .model.embed_tokens)")
    ids = mx.array([[1, 2, 3]], dtype=mx.int32)
    ours = next_token_logits(module, ids, mx.array([2]))
    theirs = module(ids)[:, 2]
    if not mx.allclose(ours.astype(mx.float32), theirs.astype(mx.float32), rtol=1e-2,
                       atol=1e-2).item():
        raise ValueError(f"{type(module).__module__}: the LM head read at one position "
                         "differs from the model's logits; this architecture is not supported")


@functools.lru_cache(maxsize=8)
def _verbalizer(path: str, ways: int) -> tuple[int, ...]:
    """The token after "Label:" in "Label: A", "Label: B", ...: one token each, distinct."""
    if not 1 <= ways <= len(LETTERS):
        raise ValueError(f"a causal LM classifier verbalizes 1 to {len(LETTERS)} labels as "
                         f"letters, got {ways} ways")
    tokenizer = _tokenizer(path)
    head = tokenizer.encode(LABEL_PREFIX, add_special_tokens=False)
    ids = []
    for letter in LETTERS[:ways]:
        full = tokenizer.encode(f"{LABEL_PREFIX} {letter}", add_special_tokens=False)
        if len(full) != len(head) + 1 or full[:-1] != head:
            raise ValueError(f"{path}: the label ' {letter}' is not one token after "
                             f"{LABEL_PREFIX!r} ({full} vs {head})")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: label tokens are not distinct: {ids}")
    return tuple(ids)


@functools.lru_cache(maxsize=4)
def _prompts(path: str, texts: tuple[str, ...], max_len: int) -> Params:
    """``inputs.ids`` / ``inputs.mask`` (int32, (N, L)): every text's prompt, right-padded."""
    tokenizer = _tokenizer(path)
    tail = len(tokenizer.encode(PROMPT_TAIL, add_special_tokens=False))
    if max_len <= tail:
        raise ValueError(f"model.max_len must exceed the prompt tail's {tail} tokens, "
                         f"got {max_len}")
    rows = []
    for text in texts:
        ids = list(tokenizer.encode(PROMPT.format(text=text)))
        if len(ids) > max_len:  # keep the head and the "\nLabel:" tail
            ids = ids[:max_len - tail] + ids[-tail:]
        rows.append(ids)
    width = max((len(r) for r in rows), default=1)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = np.full((len(rows), width), pad, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return {"inputs.ids": mx.array(ids), "inputs.mask": mx.array(mask)}
