"""A LoRA hypernetwork (Ha et al., 2016) as a meta-learning algorithm: a task's support
set in, the LoRA adapters of every adapted layer and a classification head out. It
meta-trains on the same runtime (Ray workers, parameter server, checkpoints,
evaluation) as MAML, for any model with LoRA adapters and a head (the text encoder; the
MLP or conv net with ``train: lora`` on a pretrained base).

**Meta-parameters.** ``params``: the base LoRA matrices M0 (and a head, unused: the
head comes from the support set); ``hyper``: the task-encoding MLP, the rank-``map_rank``
maps and the metric scale.

**Task encoding.** The support set is read through the frozen base with no adapters
(the job's probe, embed/probe.py): its features are unit-normalized, averaged per class
into prototypes, and the prototypes pooled over classes (mean and standard deviation,
scaled by sqrt(d) so a unit vector has unit-RMS entries). A two-layer ReLU MLP maps the
2d pooled numbers to the task vector t. Every step is a mean over examples or classes,
so t does not change when the support examples are reordered or the classes relabelled.

**Adapters.** For every LoRA matrix M (``<layer>.lora_a`` (in, r), ``.lora_b`` (r, out)):

    M(t) = M0 + reshape(P_M (Q_M t)),     P_M (numel, map_rank) = 0 at init

so at init it outputs exactly its base adapters, which start as the job's LoRA init
(A uniform, B = 0) or as a meta-learned init (``algorithm.hyper.init``). Q_M starts
uniform; P_M at zero, so the first outer steps move the outputs only through P.

**Head (Proto-MAML, Triantafillou et al., 2020).** Computed from the support set under
the generated adapters. With z what the head reads (divided by the model's
``logit_scale``: the encoder multiplies its head's output by 10 and reads unit-norm
sentence embeddings; the MLP reads its last hidden layer as it is) and c_k the mean z
of class k, the nearest-prototype classifier's logits are, up to a per-example constant,

    -s |z - c_k|^2 = s (2 c_k . z - |c_k|^2) - s |z|^2

so ``head.w[k] = 2 s c_k / logit_scale`` and ``head.b[k] = -s |c_k|^2 / logit_scale``.
The metric scale (TADAM's, Oreshkin et al., 2018) is learned, starting at 10, and
divided by the support set's mean |z|^2, s = exp(metric.log_scale) / mean |z|^2: the
encoder's unit-norm embeddings (mean |z|^2 = 1, squared distances in [0, 4], too close
for a softmax at s = 1) and the MLP's ReLU features (|z|^2 ~ 300 on digits, where an
unscaled head saturates and a 5-shot adaptation step at lr 0.1 diverges) get logits of
the same order. This classifies from the support set alone (zero-shot: no gradient
step), and is an ordinary head that adaptation steps then tune.

**Size.** With head-input dim d, MLP width h, task dim m_t, map rank m and LoRA
matrices of n_M entries each: (2d h + h) + (h m_t + m_t) + sum_M (n_M m + m m_t) + 1,
plus the base matrices. For MiniLM (d = 384), rank 4 on the top layer's query and value
(four matrices of 1536 entries) and the defaults (h = 128, m_t = 64, m = 16): 217k.

**Dynamic rank** (``prune`` > 0; AdaLoRA's idea, Zhang et al. 2023, with the magnitude
of each direction as its importance instead of AdaLoRA's sensitivity scores): a LoRA
update B A is a sum of rank-1 directions a_i b_i; those with |a_i| |b_i| below ``prune``
times the largest in their matrix are dropped. Both factors of a dropped direction are
zero, so its gradient is zero and it stays dropped while the task adapts: the rank a
task gets is the number kept, decided by the generator from its support set.

**Outer gradient.** First-order through the ``inner.steps`` inner steps (d phi_k /
d phi_0 = I) and exact through the generator: the vjp of the generator with the query-
loss gradient at the adapted parameters (at 0 inner steps, the exact gradient).
Meta-parameters without ``hyper`` (the standard-init and head-only baselines) adapt from
``params`` as in MAML, so the same evaluation compares them.
"""

from __future__ import annotations

import math
from typing import Protocol

import mlx.core as mx

from metapeft_dist.algorithms.inner import adapt
from metapeft_dist.algorithms.maml import MAML
from metapeft_dist.models.lora import is_adapter
from metapeft_dist.models.mlp import init_linear
from metapeft_dist.tree import Meta, Params

METRIC_SCALE = 10.0  # the metric scale's start, per unit of mean |z|^2


class HeadLoss(Protocol):
    """A task loss (``loss(params, x, y)``) that also shows what its model's head reads
    (job.TaskLoss): the hypernetwork computes the support set's features with it."""

    logit_scale: float  # the model's: its head's output is multiplied by this

    def __call__(self, params: Params, x: mx.array, y: mx.array) -> mx.array: ...

    def head_input(self, params: Params, x: mx.array, dim: int) -> mx.array:
        """(..., dim): what the head reads for inputs ``x``, times ``logit_scale``, with
        ``params`` over the frozen base."""
        ...

# --- pure pieces ---------------------------------------------------------------------


def class_means(z: mx.array, y: mx.array, ways: int) -> mx.array:
    """Per-class means (ways, d) of rows z (n, d) with labels y (n,) in 0..ways-1 (a
    class without examples gets zeros)."""
    onehot = (y[:, None] == mx.arange(ways)[None, :]).astype(z.dtype)
    counts = mx.maximum(onehot.sum(axis=0), 1.0)
    return (onehot.T @ z) / counts[:, None]


def _unit(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.sqrt((x * x).sum(axis=-1, keepdims=True)), 1e-12)


def task_vector(hyper: Params, features: mx.array, y: mx.array, ways: int) -> mx.array:
    """t (task_dim,) from the probe features (n, d) of a support set and its labels."""
    protos = class_means(_unit(features), y, ways)
    mean = protos.mean(axis=0)
    std = mx.sqrt(mx.mean(mx.square(protos - mean), axis=0) + 1e-8)
    pooled = mx.concatenate([mean, std]) * math.sqrt(features.shape[-1])
    h = mx.maximum(pooled @ hyper["task.0.w"].T + hyper["task.0.b"], 0.0)
    return h @ hyper["task.1.w"].T + hyper["task.1.b"]


def generate_adapters(hyper: Params, base: Params, t: mx.array) -> Params:
    """M(t) = M0 + reshape(P_M (Q_M t)) for every LoRA matrix M0 in ``base``."""
    return {name: m0 + (hyper[f"map_p.{name}"] @ (hyper[f"map_q.{name}"] @ t)).reshape(m0.shape)
            for name, m0 in base.items()}


def prune_rank(adapters: Params, fraction: float) -> Params:
    """The adapters with every rank-1 direction (column i of ``X.lora_a``, row i of
    ``X.lora_b``) whose |a_i| |b_i| is below ``fraction`` times its matrix's largest set
    to zero in both factors."""
    out = dict(adapters)
    for name in adapters:
        if not name.endswith(".lora_a"):
            continue
        pair = name[: -len("lora_a")] + "lora_b"
        a, b = adapters[name], adapters[pair]
        importance = mx.stop_gradient(mx.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=1)))
        keep = (importance >= fraction * importance.max()).astype(a.dtype)
        out[name], out[pair] = a * keep[None, :], b * keep[:, None]
    return out


def ranks(adapters: Params) -> dict[str, int]:
    """The rank of each LoRA update (directions with a non-zero a_i and b_i)."""
    out = {}
    for name in adapters:
        if name.endswith(".lora_a"):
            a, b = adapters[name], adapters[name[: -len("lora_a")] + "lora_b"]
            live = (mx.abs(a).sum(axis=0) > 0) & (mx.abs(b).sum(axis=1) > 0)
            out[name[: -len(".lora_a")]] = int(live.sum().item())
    return out


def proto_head(z: mx.array, y: mx.array, ways: int, scale: float | mx.array,
               logit_scale: float = 1.0) -> Params:
    """The nearest-prototype head on head inputs z (n, d) (already divided by the
    model's ``logit_scale``): logits ``logit_scale (z . head.w[k] + head.b[k])`` become
    ``-scale |z - c_k|^2 + scale |z|^2`` with c_k the class means of z."""
    c = class_means(z, y, ways)
    return {"head.w": (2.0 * scale / logit_scale) * c,
            "head.b": -(scale / logit_scale) * (c * c).sum(axis=-1)}


# --- the algorithm ---------------------------------------------------------------------


class Hyper(MAML):
    name = "hyper"

    def __init__(self, inner_steps, inner_lr, inner_optimizer, task_dim: int = 64,
                 hidden: int = 128, map_rank: int = 16, prune: float = 0.0):
        super().__init__(inner_steps, inner_lr, inner_optimizer, first_order=True)
        self.task_dim, self.hidden, self.map_rank = task_dim, hidden, map_rank
        self.prune = prune

    def init_hyper(self, key: mx.array, params: Params) -> Meta:
        """Meta-parameters of a fresh hypernetwork whose output is ``params``' adapters
        for every task (its maps start at zero)."""
        names = sorted(k for k in params if is_adapter(k))
        if not names:
            raise ValueError("the model has no LoRA adapters to generate")
        dim = int(params["head.w"].shape[1])
        keys = mx.random.split(key, 2 + len(names))
        hyper = {**init_linear(keys[0], "task.0", 2 * dim, self.hidden),
                 **init_linear(keys[1], "task.1", self.hidden, self.task_dim),
                 "metric.log_scale": mx.array(math.log(METRIC_SCALE))}
        bound = 1.0 / math.sqrt(self.task_dim)
        for k, name in zip(keys[2:], names, strict=True):
            hyper[f"map_p.{name}"] = mx.zeros((params[name].size, self.map_rank))
            hyper[f"map_q.{name}"] = mx.random.uniform(-bound, bound,
                                                       (self.map_rank, self.task_dim), key=k)
        return {"params": dict(params), "hyper": hyper}

    def generate(self, meta: Meta, loss_fn: HeadLoss, x: mx.array, y: mx.array) -> Params:
        """Adapters and head for the task whose support set is (x, y), read through the
        loss's model and frozen base."""
        params, hyper = meta["params"], meta["hyper"]
        ways, dim = params["head.w"].shape
        probe = mx.stop_gradient(loss_fn.head_input({}, x, dim))
        t = task_vector(hyper, probe, y, ways)
        adapters = generate_adapters(hyper, {k: v for k, v in params.items() if is_adapter(k)},
                                     t)
        if self.prune > 0:
            adapters = prune_rank(adapters, self.prune)
        z = loss_fn.head_input(adapters, x, dim) / loss_fn.logit_scale
        scale = mx.exp(hyper["metric.log_scale"]) / mx.mean((z * z).sum(axis=-1))
        return {**adapters, **proto_head(z, y, ways, scale, loss_fn.logit_scale)}

    def adapt(self, meta: Meta, loss_fn, x: mx.array, y: mx.array, steps: int | None = None,
              first_order: bool = False) -> list[Params]:
        if "hyper" not in meta:
            return super().adapt(meta, loss_fn, x, y, steps, first_order)
        start = self.generate(meta, loss_fn, x, y)
        return adapt(start, loss_fn, x, y, self.inner_steps if steps is None else steps,
                     self.lr_rule(meta), self.inner_optimizer, first_order)
