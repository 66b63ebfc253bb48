"""Text classification with a frozen pretrained encoder: LoRA on the attention
projections of its top layers and a linear head (models/bert.py), as a :class:`Model`
over example *indices*.

A text family's episodes hold indices into the family's corpus (tasks/text.py). So the
corpus is tokenized once, and the layers below the first adapted one, which no
adaptation changes, are run once over the whole corpus: their output enters the
parameter dict as the frozen entries ``inputs.hidden`` (float16, (N, max_len, hidden))
and ``inputs.mask``, next to the weights of the adapted layers. Adapting a task then
runs only the top layers. Frozen entries never travel (only adapters and the head do);
every process builds them, from a disk cache keyed by the model, the corpus, ``max_len``
and the first adapted layer (``$METAPEFT_CACHE``, default ``~/.cache/metapeft``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from metapeft_dist import blas
from metapeft_dist.models import bert
from metapeft_dist.models.disk import building, cache_dir, save_atomic
from metapeft_dist.tree import Params

# The head reads unit-norm sentence embeddings, so a standard init gives logits of
# ~0.05 and a softmax that barely moves in a few steps. A fixed temperature, as in
# cosine classifiers for few-shot learning (Chen et al. 2019), gives every init (the
# standard one included) logits of order one.
LOGIT_SCALE = 10.0
_BATCH = 64  # texts per forward pass when building the cache
# 2: GELU through bert._erf (its last bits differ from mx.erf's); 3: built on
# blas.CACHE_THREADS OpenBLAS threads
STATES_VERSION = 3


@dataclass(frozen=True)
class EncoderModel:
    """LoRA-adapted encoder + head. ``texts`` is the corpus the indices point into."""

    path: str
    config: bert.BertConfig
    max_len: int
    adapted_layers: tuple[int, ...]
    targets: tuple[str, ...]
    lora_rank: int
    lora_scale: float
    out_dim: int
    texts: tuple[str, ...] = field(compare=False, hash=False, repr=False, default=())
    kind: str = "encoder"
    logit_scale = LOGIT_SCALE  # the head's output is multiplied by this (not a field)

    @property
    def start_layer(self) -> int:
        return min(self.adapted_layers) if self.adapted_layers else self.config.layers

    def init(self, key: mx.array) -> Params:
        """Frozen weights of the adapted layers, the cached corpus states, fresh
        adapters (B = 0: the model starts equal to the pretrained encoder) and head."""
        k_lora, k_head = mx.random.split(key)
        return {**_top_layers(self.path, self.start_layer),
                **_corpus_states(self.path, self.texts, self.max_len, self.start_layer),
                **bert.init_lora(k_lora, self.config, self.adapted_layers, self.targets,
                                 self.lora_rank),
                **bert.init_head(k_head, self.config.hidden, self.out_dim)}

    def __call__(self, params: Params, x: mx.array) -> mx.array:
        """x: int example indices (...,) -> logits (..., out_dim)."""
        index = x.astype(mx.int32)
        hidden = params["inputs.hidden"][index].astype(mx.float32)
        mask = params["inputs.mask"][index]
        return LOGIT_SCALE * bert.classify(params, self.config, None, mask, self.lora_scale,
                                           self.start_layer, hidden)

    def lengths(self, params: Params, x: np.ndarray) -> np.ndarray:
        """The number of tokens of each text ``x`` indexes."""
        rows = mx.array(np.asarray(x, dtype=np.int32))
        return np.array(params["inputs.mask"][rows].astype(mx.int32).sum(axis=1))

    def narrow(self, params: Params, x: np.ndarray) -> tuple[Params, mx.array]:
        """``params`` whose cached states are the rows ``x`` only, cut to their longest
        text, and the indices (0..n-1) that run them: the same logits up to float32
        rounding (padding is masked, so only the shapes, and so the kernels, differ) for
        less work. For eager use outside a transformation (the cut reads the data)."""
        cut = max(int(self.lengths(params, x).max()), 1) if len(x) else 1
        rows = mx.array(np.asarray(x, dtype=np.int32))
        narrowed = {**params, "inputs.hidden": params["inputs.hidden"][rows, :cut],
                    "inputs.mask": params["inputs.mask"][rows, :cut]}
        return narrowed, mx.arange(len(x))

    def export(self, params: Params, out_dir) -> Path:
        """Adapters and head as ``adapters.safetensors``, with ``adapter_config.json``
        naming the base model and where the adapters sit (mlx-lm has no BERT models, so
        this is the project's own format, laid out like mlx-lm's)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {k: v for k, v in params.items() if not k.startswith("inputs.")}
        mx.save_safetensors(str(out / "adapters.safetensors"), arrays)
        config = {"fine_tune_type": "lora", "model_type": "metapeft-encoder",
                  "model": self.path, "max_len": self.max_len,
                  "layers": list(self.adapted_layers), "targets": list(self.targets),
                  "lora_parameters": {"rank": self.lora_rank, "scale": self.lora_scale},
                  "logit_scale": LOGIT_SCALE, "out_dim": int(arrays["head.w"].shape[0])}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return out

    def with_out_dim(self, out_dim: int) -> "EncoderModel":
        return EncoderModel(self.path, self.config, self.max_len, self.adapted_layers,
                            self.targets, self.lora_rank, self.lora_scale, out_dim,
                            self.texts)


def build_encoder(spec, texts: tuple[str, ...], out_dim: int) -> EncoderModel:
    """``spec`` is a :class:`metapeft_dist.config.ModelSpec` with kind encoder."""
    path = str(Path(spec.path).expanduser()) if spec.path else str(bert.minilm_path())
    config = _config(path)
    adapted = config.layers if spec.lora.layers is None else spec.lora.layers
    layers = tuple(range(config.layers - min(adapted, config.layers), config.layers))
    return EncoderModel(path, config, spec.max_len, layers, tuple(spec.lora.targets),
                        spec.lora.rank, spec.lora.scale, out_dim, tuple(texts))


@functools.lru_cache(maxsize=4)
def _config(path: str) -> bert.BertConfig:
    return _load(path)[0]


@functools.lru_cache(maxsize=2)
def _load(path: str) -> tuple[bert.BertConfig, Params]:
    return bert.load_bert(path)


@functools.lru_cache(maxsize=4)
def _top_layers(path: str, start: int) -> Params:
    """Weights of encoder layers ``start`` and up (those below are in the cache)."""
    _, params = _load(path)
    keep = tuple(f"encoder.layer.{i}." for i in range(start, _config(path).layers))
    return {k: v for k, v in params.items() if k.startswith(keep)}


def corpus_key(path: str, texts: tuple[str, ...], max_len: int, start: int) -> str:
    """What the cached states depend on: the model's weights file, the texts, the token
    budget, the layer they enter and the code that computes them (STATES_VERSION)."""
    digest = hashlib.sha256(f"v{STATES_VERSION}|".encode())
    weights = Path(path) / "model.safetensors"
    stat = weights.stat()
    digest.update(f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{max_len}|{start}"
                  .encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


@functools.lru_cache(maxsize=4)
def _corpus_states(path: str, texts: tuple[str, ...], max_len: int, start: int) -> Params:
    """``inputs.hidden`` (float16) and ``inputs.mask`` for every corpus text: from the
    disk cache, else computed (and cached)."""
    file = cache_dir("encoder") / f"{corpus_key(path, texts, max_len, start)}.safetensors"
    with building(file, f"the states of {len(texts)} texts"):
        cached = _read_states(file, len(texts))
        if cached is not None:
            return cached
        return _build_states(file, path, texts, max_len, start)


def _read_states(file: Path, count: int) -> Params | None:
    """The cached states of ``count`` texts, or None for a missing or damaged file."""
    if file.is_file():
        try:
            cached = mx.load(str(file))
            if cached["inputs.hidden"].shape[0] == count:
                return cached
        except (ValueError, KeyError, RuntimeError):
            pass  # a damaged cache file is rebuilt
    return None


def _build_states(file: Path, path: str, texts: tuple[str, ...], max_len: int,
                  start: int) -> Params:
    """Run every text through the frozen layers below ``start`` and cache the states in
    ``file`` (the caller holds its build lock)."""
    config, params = _load(path)
    tokenizer = bert.Tokenizer(path)
    print(f"metapeft: encoding {len(texts)} texts through the frozen layers 0-{start - 1} of "
          f"{Path(path).name} (once; cached in {file.parent})", file=sys.stderr)
    ids, mask = (np.array(a) for a in tokenizer.encode(list(texts), max_len))
    # Texts in order of length, each batch cut to its longest: most texts are far
    # shorter than max_len, and a real token's state does not depend on padding it does
    # not attend to. Positions past a batch's longest stay zero (padding, masked).
    lengths = mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    hidden = np.zeros((len(texts), max_len, config.hidden), dtype=np.float16)
    with blas.threads(blas.CACHE_THREADS):
        for begin in range(0, len(texts), _BATCH):
            rows = order[begin:begin + _BATCH]
            cut = int(lengths[rows].max())
            batch_ids, batch_mask = mx.array(ids[rows, :cut]), mx.array(mask[rows, :cut])
            if start == 0:
                states = bert.embed(params, config, batch_ids)
            else:
                states = bert.hidden_states(params, config, batch_ids, batch_mask, 0.0,
                                            stop_layer=start)
            hidden[rows, :cut] = np.array(states.astype(mx.float16))
    out = {"inputs.hidden": mx.array(hidden), "inputs.mask": mx.array(mask)}
    save_atomic(file, out)
    return out
