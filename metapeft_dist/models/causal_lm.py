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

For the same reason a prompt's hidden states entering the first adapted layer do not
depend on the adapters: the layers below it run once per corpus, as the encoder's do
(models/encoder.py), into the frozen entry ``inputs.hidden`` ((N, L, hidden), float16
unless a state overflows it, then float32), cached on disk under
``$METAPEFT_CACHE/causal_lm`` (default ``~/.cache/metapeft``) by a key over the model's
files, the texts, ``max_len`` and that layer (models/lm_states.py). With every layer
adapted it holds the embedding lookup. A call then runs only the adapted layers (the top
one's MLP at the read position alone), the final norm, and the head's rows of the
verbalizer tokens: never the full vocabulary. With ``model.label_loss: vocabulary`` the
whole head runs at the read position (one row of logits per prompt, ~49k x hidden for
SmolLM2) and the outputs are the letters' log-probabilities over the vocabulary: the
objective is their negative log-likelihood, the LM's own loss on the label token, so
the adapted LM also ranks the right letter above every other token (what
``mlx_lm.generate`` answers). Frozen entries never travel
(``Job.stored_frozen``): each process builds them, from the cache.

The base weights live in the mlx-lm module, loaded once per process and LoRA
configuration (they never enter the parameter dict, never travel). The parameter dict
holds the frozen inputs and the adapters, named as mlx-lm names them
(``model.layers.1.self_attn.q_proj.lora_a`` (in, r), ``.lora_b`` (r, out); the layer
computes ``linear(x) + scale * (x A) B``), so they export as they are (models/export.py).
``__call__`` sets the adapter arrays into the module (``module.update``) and runs its
adapted layers: a functional interface over a stateful module. Splitting the forward
this way assumes llama's layout (embedding, blocks ``x + attn(norm(x))`` then
``h + mlp(norm(h))``, final norm, head); it is checked against the module's own logits
when the module is loaded, and an architecture that differs is refused.

``model.path`` is an mlx-lm directory, a GGUF file or a known model name, resolved by
models/gguf.py (converted once, to ``model.dtype``).

* ``mx.value_and_grad`` w.r.t. the adapter dict works through ``module.update``: the
  arrays set into the module are the traced inputs, so gradients flow (tested against
  finite differences).
* ``mx.vmap`` over a leading task axis of the adapters (and of x) and ``mx.compile``
  work too (tested against separate, uncompiled calls), so ``run.batching: vmap`` and
  ``run.compile`` apply.

The module is shared by every call in the process and holds the last adapters set into
it: calls must not run concurrently in threads (actors run one task at a time).
"""

from __future__ import annotations

import functools
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from metapeft_dist import blas
from metapeft_dist.models.disk import building, cache_dir, save_atomic
from metapeft_dist.models.gguf import stderr_progress  # the conversion's progress lines
from metapeft_dist.models.lm_states import (
    check_layout,
    corpus_key,
    corpus_states,
    first_adapted,
    full_logits,
    head_rows,
    read_states,
    state_dtype,
    tied,
    upper_states,
)
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
    corpus the indices point into; ``num_layers`` top layers get adapters on ``keys``
    (-1: every layer)."""

    path: str
    num_layers: int
    keys: tuple[str, ...]
    lora_rank: int
    lora_scale: float
    max_len: int
    out_dim: int
    texts: tuple[str, ...] = field(compare=False, hash=False, repr=False, default=())
    label_loss: str = "letters"  # or "vocabulary": the letters' log-probabilities
    kind: str = "causal_lm"
    logit_scale = 1.0  # the LM's logits of the label tokens as they are (not a field)

    def module(self) -> nn.Module:
        """The process's mlx-lm module for this path and LoRA configuration."""
        return _load(self.path, *self._lora)[0]

    @property
    def start_layer(self) -> int:
        """The first adapted layer: the cached corpus states enter it."""
        return first_adapted(len(self.module().model.layers), self.num_layers)

    def tokenizer(self):
        """mlx-lm's tokenizer wrapper for this model (no weights loaded)."""
        return _tokenizer(self.path)

    def verbalizer(self) -> mx.array:
        """Token ids of " A", " B", ... for labels 0..out_dim-1."""
        return mx.array(_verbalizer(self.path, self.out_dim), dtype=mx.int32)

    def init(self, key: mx.array) -> Params:
        """Fresh adapters (A uniform in +-1/sqrt(in), B = 0: the model starts equal to
        the base LM), the tokenized corpus prompts and their cached lower-layer states."""
        shapes = adapter_shapes(self.module())
        keys = mx.random.split(key, len(shapes))
        adapters = {}
        for k, (name, shape) in zip(keys, shapes.items(), strict=True):
            if name.endswith(".lora_a"):
                bound = 1.0 / shape[0] ** 0.5
                adapters[name] = mx.random.uniform(-bound, bound, shape, key=k)
            else:
                adapters[name] = mx.zeros(shape)
        return {**adapters, **_corpus_states(self.path, self.texts, self.max_len,
                                             self.start_layer, self._lora)}

    def __call__(self, params: Params, x: mx.array) -> mx.array:
        """x: int example indices (...,) -> logits (..., out_dim) of the verbalizer
        tokens at each prompt's last position, from its cached states through the
        adapted layers; with ``label_loss`` "vocabulary" their log-probabilities over
        the whole vocabulary (the full head at that position alone)."""
        module = self.module()
        module.update(tree_unflatten([(n, v) for n, v in params.items()
                                      if not n.startswith("inputs.")]))
        index = x.astype(mx.int32)
        hidden = params["inputs.hidden"][index]
        mask = params["inputs.mask"][index]
        length, width = hidden.shape[-2:]
        last = mask.reshape(-1, length).sum(axis=-1) - 1
        states = hidden.reshape(-1, length, width).astype(state_dtype(module))
        read = upper_states(module, self.start_layer, states, last)
        if self.label_loss == "vocabulary":
            every = full_logits(module, read).astype(mx.float32)
            logits = (every[:, self.verbalizer()]
                      - mx.logsumexp(every, axis=-1, keepdims=True))
        else:
            logits = (read @ self.label_rows().T).astype(mx.float32)
        return logits.reshape(*index.shape, self.out_dim)

    def label_rows(self) -> mx.array:
        """(out_dim, hidden): the LM head's rows of the verbalizer tokens."""
        return _label_rows(self.path, self._lora, self.out_dim)

    def with_out_dim(self, out_dim: int) -> "CausalLMModel":
        return CausalLMModel(self.path, self.num_layers, self.keys, self.lora_rank,
                             self.lora_scale, self.max_len, out_dim, self.texts,
                             self.label_loss)

    def export(self, params: Params, out_dir) -> Path:
        """Write the adapters in mlx-lm's format (models/export.py)."""
        from metapeft_dist.models.export import export_adapters

        return export_adapters(params, out_dir, self.path, self.num_layers, self.lora_rank,
                               self.lora_scale, self.keys)

    @property
    def _lora(self) -> tuple:
        return (self.num_layers, self.keys, self.lora_rank, self.lora_scale)


def build_causal_lm(spec, texts: tuple[str, ...], out_dim: int) -> CausalLMModel:
    """``spec`` is a :class:`metapeft_dist.config.ModelSpec` whose ``path`` is an mlx-lm
    model directory, a GGUF file or a known model name (:func:`resolve_path`, at
    ``spec.dtype``); ``lora.targets`` names projections as for the encoder (query, key,
    value, output) or as mlx-lm module paths (self_attn.q_proj)."""
    if not spec.path:
        raise ValueError("model.path: a causal LM needs a local mlx-lm model directory, a "
                         "GGUF file or a known model name")
    path = str(resolve_path(spec.path, spec.dtype))
    layers = _config(path).get("num_hidden_layers")
    if spec.lora.layers is None or layers is None:
        num_layers = spec.lora.layers or layers or -1  # -1: every layer, as in mlx-lm
    else:
        num_layers = min(spec.lora.layers, layers)
    keys = tuple(TARGET_KEYS.get(t, t) for t in spec.lora.targets)
    return CausalLMModel(path, num_layers, keys, spec.lora.rank, spec.lora.scale,
                         spec.max_len, out_dim, tuple(texts), spec.label_loss)


def platform_dtype() -> str:
    """What ``dtype: auto`` means here: q4 on macOS (QLoRA on MLX's Metal kernels, as
    mlx-lm users run it), float32 elsewhere (MLX's CPU quantized matmul is ~17x slower
    than its BLAS float32 one)."""
    return "q4" if sys.platform == "darwin" else "float32"


def resolve_path(path_or_name: str, dtype: str = "auto") -> Path:
    """The mlx-lm model directory ``model.path`` names: a directory as it is stored, a
    GGUF file or a known model converted once to ``dtype`` (models/gguf.py). Errors name
    the field: FileNotFoundError for what does not exist, ValueError for the rest."""
    from metapeft_dist.models import gguf

    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if dtype != "auto":
            raise ValueError(f"model.dtype: {path} is an mlx-lm model directory, used as "
                             f"stored; dtype {dtype} applies to GGUF files and known names "
                             "(leave it auto)")
        return _directory(str(path))
    if not path.exists() and path_or_name not in gguf.KNOWN_MODELS:
        if path.suffix == ".gguf":
            raise FileNotFoundError(f"model.path: no GGUF file {path}")
        if os.sep in path_or_name:
            _directory(str(path))  # raises, naming the missing config.json
        raise FileNotFoundError(f"model.path: {path_or_name!r} is neither a model directory, "
                                f"a GGUF file nor a known model ({', '.join(gguf.KNOWN_MODELS)})")
    chosen = platform_dtype() if dtype == "auto" else dtype
    try:
        return gguf.resolve_model(path_or_name, chosen)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"model.path: {err}") from err


def next_token_logits(module: nn.Module, ids: mx.array, last: mx.array) -> mx.array:
    """(n, vocab) logits after position ``last[i]`` of ``ids[i]``: the trunk over all
    positions, the LM head only at the read position. The uncached reference path."""
    hidden = module.model(ids)
    hidden = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    if tied(module):
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
    check_layout(module, first_adapted(len(module.model.layers), num_layers))
    module.freeze()
    linear_to_lora_layers(module, num_layers,
                          {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)})
    module.eval()
    if not adapter_shapes(module):
        raise ValueError(f"model.lora.targets: no layer of {path} matches {list(keys)}")
    return module, tokenizer


@functools.lru_cache(maxsize=8)
def _label_rows(path: str, lora: tuple, ways: int) -> mx.array:
    rows = head_rows(_load(path, *lora)[0], mx.array(_verbalizer(path, ways), dtype=mx.int32))
    mx.eval(rows)
    return rows


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
def tokenized_prompts(path: str, texts: tuple[str, ...], max_len: int) -> Params:
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


@functools.lru_cache(maxsize=4)
def _corpus_states(path: str, texts: tuple[str, ...], max_len: int, start: int,
                   lora: tuple) -> Params:
    """``inputs.ids``, ``inputs.mask`` and ``inputs.hidden`` (the states entering layer
    ``start``) for every corpus text: from the disk cache, else computed and cached."""
    prompts = tokenized_prompts(path, texts, max_len)
    file = cache_dir("causal_lm") / f"{corpus_key(path, PROMPT, texts, max_len, start)}.safetensors"
    with building(file, f"the states of {len(texts)} prompts"):
        hidden = read_states(file, prompts)
        if hidden is None:
            print(f"metapeft: running {len(texts)} prompts through the frozen layers below "
                  f"layer {start} of {Path(path).name} (once; cached in {file.parent})",
                  file=sys.stderr, flush=True)
            with blas.threads(blas.CACHE_THREADS):
                hidden = corpus_states(_load(path, *lora)[0], prompts["inputs.ids"],
                                       prompts["inputs.mask"], start,
                                       progress=stderr_progress())
            save_atomic(file, {**prompts, "inputs.hidden": hidden})
    return {**prompts, "inputs.hidden": hidden}


