"""A LoRA hypernetwork (Ha et al., 2016) for the text encoder: a task's support set in,
the LoRA adapters of every adapted projection and a classification head out.

**Task encoding.** The support set is read through the job's probe (embed/probe.py: the
frozen pretrained encoder, no adapters). Its features are unit-normalized, averaged per
class into prototypes, and the prototypes pooled over classes (mean and standard
deviation, scaled by sqrt(d) so a unit vector has unit-RMS entries). A two-layer ReLU
MLP maps the 2d pooled numbers to the task vector t. Every step is a mean over
examples or classes, so t does not change when the support examples are reordered or
the classes relabelled.

**Adapters.** For every LoRA matrix M (``<projection>.lora_a`` (in, r), ``.lora_b``
(r, out)) the hypernetwork holds a base M0 and a rank-``map_rank`` linear map of t:

    M(t) = M0 + reshape(P_M (Q_M t)),     P_M (numel, map_rank) = 0 at init

so at init it outputs exactly its base adapters, which start as the job's LoRA init
(A uniform, B = 0) or as a meta-learned init. Q_M starts uniform; P_M starts at zero so
the first outer steps move the outputs only through P (Q and the MLP get gradient once
P is non-zero).

**Head (Proto-MAML, Triantafillou et al., 2020).** The head is not generated: it is
computed from the support set under the generated adapters. With z the adapted model's
pooled, unit-norm sentence embedding and c_k the mean z of class k, the nearest-prototype
classifier's logits are, up to a per-example constant,

    -s |z - c_k|^2 = s (2 c_k . z - |c_k|^2) - s |z|^2

so ``head.w[k] = 2 s c_k / LOGIT_SCALE`` and ``head.b[k] = -s |c_k|^2 / LOGIT_SCALE``
(the encoder multiplies its head's output by LOGIT_SCALE, models/encoder.py). The metric
scale s (TADAM's, Oreshkin et al., 2018) is learned, starting at LOGIT_SCALE: unit-norm
embeddings lie at squared distances in [0, 4], too close for a softmax at s = 1. This is
a classifier from the support set alone (zero-shot: no gradient step), and an ordinary
head that adaptation steps then tune.

**Size.** With pooled-feature dim d, MLP width h, task dim m_t, map rank m and LoRA
matrices of n_M entries each:  (2d h + h) + (h m_t + m_t) + sum_M (n_M + n_M m + m m_t)
+ 1. For MiniLM (d = 384), rank 4 on the top layer's query and value (four matrices of
1536 entries) and the defaults (h = 128, m_t = 64, m = 16): 106,688 + 4 x 27,136 + 1 =
215,233 parameters.

**Meta-training** minimizes the query cross-entropy after ``inner_steps`` first-order
steps of the job's inner loop on the support set, starting from the generated adapters
and head. With zero steps the loss is differentiated exactly through the generator;
otherwise the inner gradients are stopped (first-order MAML, d(phi_k)/d(phi_0) = I), so
the outer gradient is the vjp of the generator with the query-loss gradient at the
adapted parameters. Adam is the outer optimizer.

Everything but :func:`save_hypernetwork` / :func:`load_hypernetwork` is pure.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from metapeft_dist.algorithms.base import Task, map_tasks
from metapeft_dist.algorithms.inner import InnerOptimizer, adapt, constant_lr
from metapeft_dist.algorithms.outer import outer_step
from metapeft_dist.models.encoder import LOGIT_SCALE
from metapeft_dist.models.lora import is_adapter
from metapeft_dist.models.mlp import init_linear
from metapeft_dist.objectives import CLASSIFICATION
from metapeft_dist.tree import Params

FORMAT = "metapeft-lora-hypernetwork/1"


@dataclass(frozen=True)
class HyperSpec:
    """The hypernetwork's architecture."""

    task_dim: int = 64  # length of the task vector t
    hidden: int = 128  # width of the task-encoding MLP
    map_rank: int = 16  # rank of each t -> LoRA-matrix map

    def __post_init__(self) -> None:
        for name in ("task_dim", "hidden", "map_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hyper.{name} must be > 0, got {getattr(self, name)}")


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


def generate_adapters(hyper: Params, t: mx.array, names: tuple[str, ...]) -> Params:
    """M(t) = M0 + reshape(P_M (Q_M t)) for every LoRA matrix name M."""
    out = {}
    for name in names:
        base = hyper[f"base.{name}"]
        delta = hyper[f"map_p.{name}"] @ (hyper[f"map_q.{name}"] @ t)
        out[name] = base + delta.reshape(base.shape)
    return out


def proto_head(z: mx.array, y: mx.array, ways: int, scale: float | mx.array = LOGIT_SCALE
               ) -> Params:
    """The nearest-prototype head on pooled embeddings z (n, d): the encoder's logits
    ``LOGIT_SCALE (z . head.w[k] + head.b[k])`` become ``-scale |z - c_k|^2 + scale |z|^2``
    with c_k the class means of z (Proto-MAML's head init)."""
    c = class_means(z, y, ways)
    return {"head.w": (2.0 * scale / LOGIT_SCALE) * c,
            "head.b": -(scale / LOGIT_SCALE) * (c * c).sum(axis=-1)}


def count_parameters(hyper: Params) -> int:
    return sum(int(v.size) for v in hyper.values())


# --- the hypernetwork over a job's encoder --------------------------------------------


class LoraHypernetwork:
    """The hypernetwork for a built :class:`metapeft_dist.job.Job` whose model is the
    text encoder (kind ``encoder``). Its parameters are a flat dict (:meth:`init`); the
    methods are pure functions of them and of MLX task arrays (corpus indices), so they
    vmap over tasks and compile."""

    def __init__(self, job, spec: HyperSpec = HyperSpec(), probe=None):
        from metapeft_dist.embed.probe import probe_from_job

        if job.model.kind != "encoder":
            raise ValueError(f"the LoRA hypernetwork is for model.kind encoder, got "
                             f"{job.model.kind!r}")
        self.job = job
        self.spec = spec
        self.model = job.model
        self.frozen = job.frozen
        self.probe = probe_from_job(job) if probe is None else probe
        self.ways = int(job.model.out_dim)
        start = job.initial_meta["params"]
        self.names = tuple(sorted(k for k in start if is_adapter(k)))
        if not self.names:
            raise ValueError("the job's model has no LoRA adapters to generate")
        self.shapes = {k: tuple(start[k].shape) for k in self.names}
        self.dim = int(start["head.w"].shape[1])
        self._pooled_model = job.model.with_out_dim(self.dim)
        self._identity = {"head.w": mx.eye(self.dim), "head.b": mx.zeros((self.dim,))}
        self.inner_lr = float(job.spec.inner.lr)
        inner = job.spec.inner
        self.inner_optimizer = InnerOptimizer(inner.optimizer, inner.beta1, inner.beta2)

    # parameters ----------------------------------------------------------------------

    def init(self, key: mx.array, base: Params | None = None) -> Params:
        """Fresh hypernetwork parameters whose outputs are the base adapters ``base``
        (default: the job's LoRA init); ``base`` may hold more (a head), which is ignored."""
        base = self.job.initial_meta["params"] if base is None else base
        for name in self.names:
            if name not in base:
                raise ValueError(f"base adapters lack {name}")
            if tuple(base[name].shape) != self.shapes[name]:
                raise ValueError(f"base adapter {name} has shape {tuple(base[name].shape)}, "
                                 f"expected {self.shapes[name]}")
        s = self.spec
        keys = mx.random.split(key, 2 + len(self.names))
        hyper = {**init_linear(keys[0], "task.0", 2 * self.dim, s.hidden),
                 **init_linear(keys[1], "task.1", s.hidden, s.task_dim),
                 "metric.log_scale": mx.array(math.log(LOGIT_SCALE))}
        bound = 1.0 / math.sqrt(s.task_dim)
        for k, name in zip(keys[2:], self.names, strict=True):
            size = math.prod(self.shapes[name])
            hyper[f"base.{name}"] = mx.array(base[name])
            hyper[f"map_p.{name}"] = mx.zeros((size, s.map_rank))
            hyper[f"map_q.{name}"] = mx.random.uniform(-bound, bound, (s.map_rank, s.task_dim),
                                                       key=k)
        return hyper

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s, d = self.spec, self.dim
        shapes = {"task.0.w": (s.hidden, 2 * d), "task.0.b": (s.hidden,),
                  "task.1.w": (s.task_dim, s.hidden), "task.1.b": (s.task_dim,),
                  "metric.log_scale": ()}
        for name, shape in self.shapes.items():
            shapes[f"base.{name}"] = shape
            shapes[f"map_p.{name}"] = (math.prod(shape), s.map_rank)
            shapes[f"map_q.{name}"] = (s.map_rank, s.task_dim)
        return shapes

    # forward -------------------------------------------------------------------------

    def probe_features(self, x: mx.array) -> mx.array:
        """The probe's features (n, d) of examples x, in the graph (what
        ``probe.features`` returns as numpy); no gradient flows into them."""
        return mx.stop_gradient(self.probe.forward(self.probe.base(), x))

    def pooled(self, params: Params, x: mx.array) -> mx.array:
        """The unit-norm pooled embeddings (n, d) of x under adapters ``params``."""
        adapters = {k: v for k, v in params.items() if is_adapter(k)}
        return self._pooled_model({**self.frozen, **adapters, **self._identity}, x) / LOGIT_SCALE

    def task_vector(self, hyper: Params, sx: mx.array, sy: mx.array) -> mx.array:
        return task_vector(hyper, self.probe_features(sx), sy, self.ways)

    def adapters(self, hyper: Params, sx: mx.array, sy: mx.array) -> Params:
        return generate_adapters(hyper, self.task_vector(hyper, sx, sy), self.names)

    def with_proto_head(self, adapters: Params, sx: mx.array, sy: mx.array,
                        scale: float | mx.array = LOGIT_SCALE) -> Params:
        """``adapters`` plus the prototype head of the support set under them."""
        adapters = {k: adapters[k] for k in self.names}
        return {**adapters, **proto_head(self.pooled(adapters, sx), sy, self.ways, scale)}

    def generate(self, hyper: Params, sx: mx.array, sy: mx.array) -> Params:
        """Adapters and head for the task with support set (sx, sy): what adaptation
        starts from (or what classifies, zero-shot)."""
        return self.with_proto_head(self.adapters(hyper, sx, sy), sx, sy,
                                    mx.exp(hyper["metric.log_scale"]))

    def loss_fn(self, params: Params, x: mx.array, y: mx.array) -> mx.array:
        return CLASSIFICATION.loss(self.model({**self.frozen, **params}, x), y)

    def adapt(self, start: Params, sx: mx.array, sy: mx.array, steps: int,
              first_order: bool = False) -> list[Params]:
        """The job's inner loop (its optimizer, ``inner.lr``) from ``start``."""
        return adapt(start, self.loss_fn, sx, sy, steps, constant_lr(self.inner_lr),
                     self.inner_optimizer, first_order)

    def task_loss(self, hyper: Params, sx: mx.array, sy: mx.array, qx: mx.array,
                  qy: mx.array, inner_steps: int = 0) -> mx.array:
        """Query loss after ``inner_steps`` first-order steps from the generated start."""
        phi = self.adapt(self.generate(hyper, sx, sy), sx, sy, inner_steps, True)[-1]
        return self.loss_fn(phi, qx, qy)

    def curve(self, start: Params, sx: mx.array, sy: mx.array, qx: mx.array, qy: mx.array,
              steps: int) -> mx.array:
        """Query accuracy after 0..steps inner steps from ``start`` (steps + 1,)."""
        trajectory = self.adapt(start, sx, sy, steps)
        return mx.stack([CLASSIFICATION.metric(self.model({**self.frozen, **p}, qx), qy)
                         for p in trajectory])


# --- meta-training and evaluation ------------------------------------------------------


def meta_train(net: LoraHypernetwork, hyper: Params, batches: Iterable[Task],
               inner_steps: int = 0, outer_lr: float = 1e-3, clip_norm: float | None = 10.0,
               vmap: bool = True, compile: bool = True,
               on_step: Callable[[int, float, Params], None] | None = None
               ) -> tuple[Params, list[float]]:
    """Adam (bias-corrected) on the mean query loss of each batch of tasks
    (``job.batch(i)``: arrays with a leading task axis), the gradient clipped to global
    norm ``clip_norm`` (None: no clipping); returns the trained parameters and the loss
    of every step (before its update). With ``compile`` one step, optimizer included,
    is a single ``mx.compile``d graph, as in trainer.py. ``on_step(i, loss, hyper)`` is
    called after each step with the updated parameters (new containers, safe to keep:
    e.g. to validate and keep the best)."""
    holder = {"hyper": tree_map(lambda a: a, hyper)}
    optimizer = optim.Adam(learning_rate=outer_lr, bias_correction=True)
    optimizer.init(holder["hyper"])

    def per_task(h, sx, sy, qx, qy):
        return net.task_loss(h, sx, sy, qx, qy, inner_steps)

    def mean_loss(h, batch):
        return mx.mean(map_tasks(per_task, h, batch, vmap))

    def step(batch):
        loss, grad = mx.value_and_grad(mean_loss)(holder["hyper"], batch)
        holder["hyper"], _ = outer_step(optimizer, holder["hyper"], grad, clip_norm)
        return loss

    if compile:
        state = [holder, optimizer.state]
        step = mx.compile(step, inputs=state, outputs=state)
    losses = []
    for i, batch in enumerate(batches):
        loss = step(tuple(batch))
        mx.eval(loss, holder, optimizer.state)
        losses.append(loss.item())
        if on_step is not None:
            on_step(i, losses[-1], tree_map(lambda a: a, holder["hyper"]))
    return holder["hyper"], losses


def curves(net: LoraHypernetwork, start: Callable[[Params, mx.array, mx.array], Params],
           shared: Params, batches: Iterable[Task], steps: int, vmap: bool = True,
           compile: bool = True) -> mx.array:
    """Query accuracy (tasks, steps + 1) after 0..steps inner steps from
    ``start(shared, sx, sy)`` on every task of ``batches``; e.g. ``start =
    net.generate`` with ``shared`` the hypernetwork's parameters."""
    def per_task(params, sx, sy, qx, qy):
        return net.curve(start(params, sx, sy), sx, sy, qx, qy, steps)

    def batch_curves(params, batch):
        return map_tasks(per_task, params, batch, vmap)

    fn = mx.compile(batch_curves) if compile else batch_curves
    out = []
    for batch in batches:
        values = fn(shared, tuple(batch))
        mx.eval(values)
        out.append(values)
    return mx.concatenate(out)


# --- files ---------------------------------------------------------------------------


def _metadata(net: LoraHypernetwork) -> dict[str, str]:
    return {"format": FORMAT, "probe": net.probe.name, "model": str(net.model.path),
            "ways": str(net.ways), "lora_rank": str(net.model.lora_rank),
            "lora_scale": str(net.model.lora_scale), "targets": json.dumps(list(net.names)),
            "spec": json.dumps(asdict(net.spec))}


def save_hypernetwork(path: str | Path, net: LoraHypernetwork, hyper: Params) -> Path:
    """The parameters as safetensors; the metadata names the format, the probe, the model
    and the architecture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), dict(hyper), metadata=_metadata(net))
    return path


def read_spec(path: str | Path) -> HyperSpec:
    """The architecture a saved hypernetwork file records (to build the network to load
    it into)."""
    _, metadata = _read(path)
    try:
        return HyperSpec(**json.loads(metadata["spec"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad hypernetwork spec in its metadata: {err}") from None


def load_hypernetwork(path: str | Path, net: LoraHypernetwork) -> Params:
    """Parameters saved by :func:`save_hypernetwork` for a network like ``net`` (same
    probe, adapters, ways and architecture); ValueError naming the difference otherwise."""
    hyper, metadata = _read(path)
    expected = _metadata(net)
    for key in ("probe", "ways", "lora_rank", "lora_scale", "targets", "spec"):
        if metadata.get(key) != expected[key]:
            raise ValueError(f"{path} was saved for {key} {metadata.get(key)!r}; this network "
                             f"has {expected[key]!r}")
    shapes = net.expected_shapes()
    if set(hyper) != set(shapes):
        missing = sorted(set(shapes) - set(hyper)) or sorted(set(hyper) - set(shapes))
        raise ValueError(f"{path} does not hold this network's parameters (differs at "
                         f"{missing[0]})")
    for name, shape in shapes.items():
        if tuple(hyper[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(hyper[name].shape)}, "
                             f"expected {shape}")
    return hyper


def _read(path: str | Path) -> tuple[Params, dict[str, str]]:
    try:
        hyper, metadata = mx.load(str(path), return_metadata=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"cannot read a LoRA hypernetwork from {path}: {err}") from None
    if not isinstance(hyper, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a metapeft LoRA hypernetwork ({FORMAT})")
    return hyper, metadata
