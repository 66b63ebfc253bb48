"""A learned task embedding: a set-pooling network over the class prototypes of a
task's probe features, trained over the task distribution.

    z_i = relu(W1 f_i + b1)             each support example (f_i: unit-norm probe features)
    h_c = mean_{i in class c} z_i       its class prototype (Snell et al., 2017)
    u_c = relu(W2 h_c + b2)
    e   = normalize(W3 [mean_c u_c, std_c u_c] + b3)

invariant to the order of examples and of classes, and sized by the network, not the
task. Trained contrastively (InfoNCE, as in SimCLR): two disjoint support sets of the
same task are one positive pair; the other tasks of the batch are the negatives. So two
tasks are close when they look like draws of the same task: the same kinds of classes,
told apart in the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from metapeft_dist.embed.probe import Probe, ProbeError, TaskSample
from metapeft_dist.files import failure_reason
from metapeft_dist.tree import Params

FORMAT = "metapeft-task-embedding/1"


def init_network(key: mx.array, in_dim: int, hidden: int, out_dim: int) -> Params:
    from metapeft_dist.models.mlp import init_linear

    k1, k2, k3 = mx.random.split(key, 3)
    return {**init_linear(k1, "pool1", in_dim, hidden), **init_linear(k2, "pool2", hidden, hidden),
            **init_linear(k3, "out", 2 * hidden, out_dim)}


def _unit(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.sqrt((x * x).sum(axis=-1, keepdims=True)), 1e-12)


def _linear(params: Params, name: str, x: mx.array) -> mx.array:
    return x @ params[f"{name}.w"].T + params[f"{name}.b"]


def embed_grouped(params: Params, features: mx.array) -> mx.array:
    """features (..., ways, shots, d) -> embeddings (..., out_dim), unit norm."""
    z = mx.maximum(_linear(params, "pool1", _unit(features)), 0.0)
    u = mx.maximum(_linear(params, "pool2", z.mean(axis=-2)), 0.0)  # (..., ways, hidden)
    mean = u.mean(axis=-2)
    std = mx.sqrt(mx.maximum(((u - mean[..., None, :]) ** 2).mean(axis=-2), 0.0) + 1e-8)
    return _unit(_linear(params, "out", mx.concatenate([mean, std], axis=-1)))


def info_nce(params: Params, view1: mx.array, view2: mx.array, temperature: float
             ) -> mx.array:
    """Symmetric InfoNCE: task i's two views match each other, not the other tasks'."""
    e1, e2 = embed_grouped(params, view1), embed_grouped(params, view2)
    logits = e1 @ e2.T / temperature
    labels = mx.arange(logits.shape[0])

    def ce(lg):
        return mx.mean(mx.logsumexp(lg, axis=-1)
                       - mx.take_along_axis(lg, labels[:, None], axis=-1)[:, 0])

    return 0.5 * (ce(logits) + ce(logits.T))


def sample_views(rng: np.random.Generator, sources: Sequence[Sequence[np.ndarray]],
                 batch: int, ways: int, shots: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` tasks, each ``ways`` classes of one source (a family's meta-train
    classes, as feature arrays), as two views of ``shots`` disjoint examples per class:
    arrays (batch, ways, shots, d)."""
    views1, views2 = [], []
    for _ in range(batch):
        classes = sources[rng.integers(len(sources))]
        chosen = rng.choice(len(classes), size=ways, replace=False)
        picks = [classes[c][rng.choice(len(classes[c]), size=2 * shots, replace=False)]
                 for c in chosen]
        views1.append(np.stack([p[:shots] for p in picks]))
        views2.append(np.stack([p[shots:] for p in picks]))
    return np.stack(views1), np.stack(views2)


def fit_network(sources: Sequence[Sequence[np.ndarray]], ways: int, shots: int,
                steps: int = 400, batch: int = 32, hidden: int = 128, out_dim: int = 32,
                lr: float = 1e-3, temperature: float = 0.1, seed: int = 0,
                on_progress: Callable[[int, float], None] | None = None
                ) -> tuple[Params, list[float]]:
    """Train the pooling network by Adam on InfoNCE; returns (params, loss per step)."""
    import mlx.optimizers as optim

    smallest = min(len(c) for s in sources for c in s)
    if smallest < 2 * shots:
        raise ValueError(f"a class has {smallest} examples; two views need 2 x shots = "
                         f"{2 * shots}")
    if min(len(s) for s in sources) < ways:
        raise ValueError(f"every source needs at least ways = {ways} classes")
    rng = np.random.default_rng(seed)
    params = init_network(mx.random.key(seed), sources[0][0].shape[-1], hidden, out_dim)
    optimizer = optim.Adam(learning_rate=lr)
    grad = mx.value_and_grad(lambda p, a, b: info_nce(p, a, b, temperature))
    losses = []
    for step in range(steps):
        v1, v2 = sample_views(rng, sources, batch, ways, shots)
        loss, grads = grad(params, mx.array(v1), mx.array(v2))
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, loss)
        losses.append(float(loss))
        if on_progress is not None:
            on_progress(step + 1, losses[-1])
    return params, losses


class LearnedEmbedder:
    """Embeds tasks with a trained pooling network, reading them through ``probe``."""

    kind = "learned"

    def __init__(self, probe: Probe, params: Params, info: dict):
        self.probe = probe
        self.params = params
        self.info = info

    @property
    def dim(self) -> int:
        return int(self.params["out.w"].shape[0])

    def embed_one(self, task: TaskSample) -> np.ndarray:
        features = mx.array(self.probe.features(task.x))
        labels = np.asarray(task.y)
        # Classes may differ in size: pool each class, then the classes.
        z = mx.maximum(_linear(self.params, "pool1", _unit(features)), 0.0)
        protos = mx.stack([z[mx.array(np.flatnonzero(labels == c))].mean(axis=0)
                           for c in np.unique(labels)])
        u = mx.maximum(_linear(self.params, "pool2", protos), 0.0)
        mean = u.mean(axis=0)
        std = mx.sqrt(mx.maximum(((u - mean) ** 2).mean(axis=0), 0.0) + 1e-8)
        out = _unit(_linear(self.params, "out", mx.concatenate([mean, std])))
        return np.array(out, dtype=np.float64)

    def embed(self, tasks: Sequence[TaskSample]) -> np.ndarray:
        return np.stack([self.embed_one(t) for t in tasks])

    def save(self, path: str | Path) -> Path:
        """The network as safetensors, with what it was trained on in its metadata."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            mx.save_safetensors(str(path), self.params,
                                metadata={"format": FORMAT, "info": json.dumps(self.info)})
        except (OSError, RuntimeError) as err:  # a full disk, a folder not writable
            raise ProbeError(f"cannot save the learned embedding as {path}: "
                             f"{failure_reason(err)}") from None
        return path

    @classmethod
    def load(cls, path: str | Path, probe: Probe) -> "LearnedEmbedder":
        """A saved network; refuses one trained through a different probe, whose
        features it would misread."""
        try:
            params, metadata = mx.load(str(path), return_metadata=True)
            info = json.loads(metadata.get("info", "{}"))
        except (OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"cannot read a task-embedding network from {path}: {err}") \
                from None
        if metadata.get("format") != FORMAT or not {"pool1.w", "pool2.w", "out.w"} <= set(params):
            raise ValueError(f"{path} is not a metapeft task-embedding network")
        if info.get("probe") != probe.name:
            raise ValueError(f"{path} was trained on the features of {info.get('probe')!r}, "
                             f"not of {probe.name!r}")
        return cls(probe, params, info)


def class_features(probe: Probe, members: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The probe's features of each class's examples (``members``: inputs per class)."""
    flat = np.concatenate(members)
    features = probe.features(flat)
    bounds = np.cumsum([len(m) for m in members])[:-1]
    return np.split(features, bounds)


def fit(probe: Probe, sources: Sequence[Sequence[np.ndarray]], ways: int, shots: int,
        names: Sequence[str] = (), **options) -> tuple[LearnedEmbedder, list[float]]:
    """Train the network on feature arrays per class per source (see
    :func:`sample_views`); ``names`` says what the sources were."""
    params, losses = fit_network(sources, ways, shots, **options)
    info = {"probe": probe.name, "sources": list(names), "ways": ways, "shots": shots,
            "steps": len(losses), "final_loss": losses[-1] if losses else None}
    return LearnedEmbedder(probe, params, info), losses
