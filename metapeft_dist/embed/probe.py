"""The probe network every task embedding reads a task through: a job's frozen base
with its head taken off.

A model here ends in a linear head (``head.w`` (out, d), ``head.b``); everything before
it is the base. The probe's *features* of an input are the base's output, the d numbers
the head reads: obtained from the model itself with an identity head, so there is no
second forward function to keep in step with the model. Task2Vec differentiates the
probe's base weights (``base``), so the probe also runs the model on other base weights.

Which base: the encoder's pretrained weights (the adapted top layers, their cached
inputs below; LoRA off, B = 0 being the pretrained model anyway); for the MLP and conv
net, the base pretrained on the job's meta-train data (``Job.pretrained``). Causal LMs
classify by verbalized labels, not a head, and have no probe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Sequence

import mlx.core as mx
import numpy as np

from metapeft_dist.models import Classifier, Network, head_input, is_head
from metapeft_dist.models.lora import is_adapter
from metapeft_dist.tree import Params

_CHUNK = 256  # inputs per forward pass when computing features


class ProbeError(ValueError):
    """The model cannot serve as a probe (one line)."""


@dataclass(frozen=True)
class TaskSample:
    """A task as its embedding sees it: the support set. ``x`` are the probe's inputs
    (for text models, indices into the probe's corpus), ``y`` labels 0..ways-1, and,
    for text, the texts themselves (handcrafted features read them)."""

    x: np.ndarray
    y: np.ndarray
    texts: tuple[str, ...] | None = None

    @property
    def ways(self) -> int:
        return int(self.y.max()) + 1 if self.y.size else 0


@dataclass
class Probe:
    """``model`` with its head removed: ``features(x)`` (n, d) and ``logits`` through a
    given head on given base weights (for the Fisher information)."""

    name: str  # what the features depend on (model, base); equal names, comparable features
    model: Classifier
    params: Params  # base weights, cached inputs; no head, no adapters
    base_names: tuple[str, ...]  # the weights Task2Vec differentiates
    dim: int

    def base(self) -> Params:
        return {k: self.params[k] for k in self.base_names}

    def forward(self, base: Params, x: mx.array) -> mx.array:
        """Features (..., d) of inputs ``x`` with the base weights ``base``."""
        return head_input(self.model, {**self.params, **base}, x, self.dim)

    def narrow(self, x: np.ndarray | mx.array) -> tuple["Probe", mx.array]:
        """This probe on inputs ``x`` only, with the inputs that run it there: for a
        model that can narrow its cached inputs to them (the encoder cuts the padding
        the texts share), a probe over less data, same features up to float32 rounding;
        otherwise this probe and ``x``."""
        narrow = getattr(self.model, "narrow", None)
        if narrow is None:
            return self, mx.array(x)
        params, index = narrow(self.params, np.array(x))
        return replace(self, params=params), index

    def features(self, x: np.ndarray | mx.array) -> np.ndarray:
        """Features (n, d) of inputs ``x`` (n, ...), float32, computed in chunks (of
        inputs in order of length, for a model that narrows its inputs)."""
        x = np.array(x)
        lengths = getattr(self.model, "lengths", None)
        order = (np.argsort(lengths(self.params, x), kind="stable") if lengths is not None
                 else np.arange(len(x)))
        out = np.zeros((len(x), self.dim), np.float32)
        for start in range(0, len(x), _CHUNK):
            rows = order[start:start + _CHUNK]
            probe, index = self.narrow(x[rows])
            feats = head_input(probe.model, probe.params, index, self.dim)
            mx.eval(feats)
            out[rows] = np.array(feats.astype(mx.float32))
        return out


def probe_from_model(model: Network, params: Params, name: str) -> Probe:
    """A probe from a classification model and parameters holding its base."""
    if model.kind == "causal_lm":
        raise ProbeError("task embeddings need a model with a classification head "
                         "(encoder, mlp or conv); a causal LM classifies by verbalized labels")
    if "head.w" not in params:
        raise ProbeError("the model has no head.w: it is not a classifier")
    dim = int(params["head.w"].shape[1])
    kept = {k: v for k, v in params.items() if not (is_head(k) or is_adapter(k))}
    base = tuple(sorted(k for k, v in kept.items()
                        if not k.startswith("inputs.") and mx.issubdtype(v.dtype, mx.floating)))
    if not base:
        raise ProbeError("the model has no base weights to probe")
    return Probe(name, model, kept, base, dim)


def probe_from_job(job) -> Probe:
    """The probe of a built :class:`metapeft_dist.job.Job` (a classification family)."""
    if job.family.info.kind != "classification":
        raise ProbeError(f"task embeddings are for classification families; "
                         f"{job.spec.family.name} is {job.family.info.kind}")
    model = job.model
    if model.kind == "encoder":
        params = {**job.frozen, **model.init(mx.random.key(job.spec.seed))}
        name = f"encoder:{model.path}:{model.max_len}:{model.start_layer}"
    elif model.kind in ("mlp", "conv"):
        params = job.pretrained()
        name = (f"{model.kind}:{job.spec.family.name}:{model.widths}:seed{job.spec.seed}:"
                f"pretrain{job.spec.model.pretrain.steps}")
    else:
        return probe_from_model(model, {}, "")  # raises with the reason
    return probe_from_model(model, params, name)


def text_probe(model_spec, texts: Sequence[str]) -> Probe:
    """A probe over the given texts (a user's task file), the encoder ``model_spec``
    names (kind encoder): inputs are indices into ``texts``."""
    from metapeft_dist.models import build_model

    if model_spec.kind != "encoder":
        raise ProbeError(f"text task embeddings use an encoder; model.kind is {model_spec.kind}")
    corpus = SimpleNamespace(corpus=SimpleNamespace(texts=tuple(texts)))
    model = build_model(model_spec, (), 2, corpus)
    params = model.init(mx.random.key(0))
    return probe_from_model(model, params, f"encoder:{model.path}:{model.max_len}:"
                                           f"{model.start_layer}")


def family_samples(job, split: str, stream: int, tasks: int, shots: int | None = None
                   ) -> list[TaskSample]:
    """The support sets of ``tasks`` tasks of the job's family (keys as evaluation
    draws them), with their texts for text families."""
    episodes = job.episodes(split, stream, range(tasks), shots)
    corpus = getattr(job.family, "corpus", None)
    out = []
    for x, y in zip(episodes.support_x, episodes.support_y, strict=True):
        texts = tuple(corpus.texts[int(i)] for i in x) if corpus is not None else None
        out.append(TaskSample(np.asarray(x), np.asarray(y, dtype=np.int32), texts))
    return out
