"""A job spec made concrete: the task family, model, objective, algorithm, the initial
meta-parameters and the frozen base.

The same :class:`Job` is built wherever the job runs: the driver builds it from the
spec, pretraining the base (``model.base: pretrained``) and reading the run that
``algorithm.hyper.init`` names; a worker builds it from the spec and the frozen base the
driver sends (:meth:`Job.stored_frozen`, one wire frame), so it neither repeats the
pretraining nor needs the driver's files (the meta-parameters arrive by wire anyway); a
resumed run builds it on its checkpoint's frozen base the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from metapeft_dist.algorithms import MetaAlgorithm, Task, make_algorithm
from metapeft_dist.algorithms.hyper import Hyper
from metapeft_dist.config import JobSpec
from metapeft_dist.models import Network, build_model, head_input, is_head, split_trainable
from metapeft_dist.models.lora import is_adapter
from metapeft_dist.objectives import Objective, objective_for
from metapeft_dist.tasks import make_family
from metapeft_dist.tasks.base import Episode, TaskFamily, sample_batch
from metapeft_dist.tree import Meta, Params
from metapeft_dist.wire import TreeSpec, decode, declared_spec, encode

LossFn = Callable[[Params, mx.array, mx.array], mx.array]


@dataclass(frozen=True, eq=False)
class TaskLoss:
    """The task loss of the trainable parameters, the frozen ones closed over:
    ``loss(model({**frozen, **params}, x)[..., :ways], y)``. The LoRA hypernetwork,
    which computes features of the support set, reads them through :meth:`head_input`."""

    model: Network
    frozen: Params
    loss: Callable[[mx.array, mx.array], mx.array]
    ways: int | None = None  # use only the first ``ways`` outputs (a task with fewer labels)

    def __call__(self, params: Params, x: mx.array, y: mx.array) -> mx.array:
        out = self.model({**self.frozen, **params}, x)
        return self.loss(out if self.ways is None else out[..., :self.ways], y)

    def head_input(self, params: Params, x: mx.array, dim: int) -> mx.array:
        """What the model's head reads (models.head_input) with ``params`` over the
        frozen base (a :class:`metapeft_dist.algorithms.hyper.HeadLoss`)."""
        return head_input(self.model, {**self.frozen, **params}, x, dim)

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale


@dataclass
class Init:
    """A starting point to adapt from: meta-parameters and the frozen rest."""

    name: str
    meta: Meta
    frozen: Params
    # scored by in-context prompting with the support set instead of adapted on it
    # (models/in_context.py): "plain" (the classifier's prompts, one after another) or
    # "chat" (through the model's chat template); no steps, the same value at every
    # step of its curve
    prompted: str | None = None


def init_frame(init: Init, frozen: Params) -> bytes:
    """``init`` as a wire frame for a worker whose job's frozen base is ``frozen``: its
    meta-parameters and only the frozen arrays that differ from that base (a baseline's
    fresh rest, a pretrained base), never the corpus states both sides hold."""
    missing = sorted(set(frozen) - set(init.frozen))
    if missing:
        raise ValueError(f"init {init.name} lacks frozen arrays of the job: {missing[:3]}")
    extra = {k: v for k, v in init.frozen.items()
             if k not in frozen or not (v is frozen[k] or (v.shape == frozen[k].shape and
                                                          mx.array_equal(v, frozen[k])))}
    return encode({"meta": init.meta, "frozen": extra}, 0,
                  {"name": init.name, "prompted": init.prompted})


def read_init_frame(frame: bytes, frozen: Params) -> Init:
    """The :class:`Init` of :func:`init_frame`, on this job's frozen base ``frozen``.
    For frames from the driver (a trusted peer): the tree is the one the frame declares."""
    received = decode(frame, declared_spec(frame))
    tree = received.tree
    return Init(str(received.header["name"]), tree["meta"],
                {**frozen, **tree.get("frozen", {})}, received.header.get("prompted"))


@dataclass
class Job:
    spec: JobSpec
    family: TaskFamily
    model: Network
    objective: Objective
    algorithm: MetaAlgorithm
    frozen: Params
    initial_meta: Meta
    # the task files the family was built from, by name, when they are the user's (a
    # jsonl family's): a worker on another machine gets them by wire
    files: dict[str, bytes] | None = field(default=None, repr=False)
    _pretrained: Params | None = field(default=None, repr=False)

    def loss_fn(self, frozen: Params | None = None) -> LossFn:
        """Task loss of the trainable parameters, the frozen ones closed over."""
        return TaskLoss(self.model, self.frozen if frozen is None else frozen,
                        self.objective.loss)

    def stored_frozen(self) -> Params:
        """The frozen part a checkpoint keeps: all of it for the MLP and the conv net (a
        pretrained base exists only in this run); nothing for the text models, whose
        weights are the model directory the spec names and whose corpus inputs are
        rebuilt from the texts (models/encoder.py, models/causal_lm.py)."""
        return {} if self.model.kind in ("encoder", "causal_lm") else self.frozen

    def episodes(self, split: str, iteration: int, indices, shots: int | None = None,
                 query: int | None = None) -> Episode:
        fam = self.spec.family
        return sample_batch(self.family, self.spec.seed, split, iteration, indices,
                            fam.shots if shots is None else shots,
                            fam.query if query is None else query)

    def batch(self, iteration: int, indices=None) -> Task:
        """The meta-train tasks of ``iteration`` as MLX arrays with a leading task axis."""
        if indices is None:
            indices = range(self.spec.algorithm.meta_batch)
        return to_mx(self.episodes("train", iteration, indices))

    def pretrained(self) -> Params:
        """All parameters pretrained on the meta-train data (computed once per Job)."""
        if self._pretrained is None:
            from metapeft_dist.pretrain import pretrain

            self._pretrained = pretrain(self.model, self.family, self.objective,
                                        self.spec.model.pretrain, self.spec.seed,
                                        self.spec.run.compile)
        return self._pretrained

    def baseline(self, name: str) -> Init:
        """random: a fresh standard init of the trainable part, same frozen base.
        pretrained: the pretrained network with a fresh head, split like the job.
        head: the same fresh head as random, tuned alone; the rest frozen (adapters at
        B = 0, so the base as it is). in_context (causal_lm): random's adapters (B = 0,
        so the base LM), not adapted but prompted with the support set; in_context_chat
        the same through the model's chat template."""
        if name in ("in_context", "in_context_chat"):
            if self.model.kind != "causal_lm":
                raise ValueError(f"eval.baselines: {name} applies to kind causal_lm, "
                                 f"not {self.model.kind}")
            return dataclasses.replace(self.baseline("random"), name=name,
                                       prompted="chat" if name.endswith("chat") else "plain")
        if name == "head":
            fresh = self.model.init(mx.random.key(self.spec.seed + 1))
            head = {k: v for k, v in fresh.items() if is_head(k)}
            rest = {k: v for k, v in fresh.items() if not is_head(k)}
            return Init("head", self.algorithm.init_meta(head), {**self.frozen, **rest})
        if name == "random":
            fresh = self.model.init(mx.random.key(self.spec.seed + 1))
            trainable, _ = split_trainable(fresh, self.spec.model.train)
            return Init("random", self.algorithm.init_meta(trainable), self.frozen)
        if name == "pretrained":
            trainable, frozen = split_trainable(self.pretrained(), self.spec.model.train)
            return Init("pretrained", self.algorithm.init_meta(trainable), frozen)
        raise ValueError(f"unknown baseline {name!r}")


def to_mx(episode: Episode) -> Task:
    support_x, support_y, query_x, query_y = episode.arrays()
    return mx.array(support_x), mx.array(support_y), mx.array(query_x), mx.array(query_y)


def with_family_path(spec: JobSpec, path: str | Path) -> JobSpec:
    """``spec`` reading its (jsonl) task files from ``path``."""
    return dataclasses.replace(spec, family=dataclasses.replace(spec.family, path=str(path)))


def build_job(spec: JobSpec, frozen_frame: bytes | None = None,
              files: dict[str, bytes] | None = None) -> Job:
    """The job of ``spec``. ``frozen_frame``: a frozen base built before, as a wire frame
    of ``{"frozen": Job.stored_frozen()}`` (the driver's, sent to a worker; a
    checkpoint's, when a run resumes), checked against this job's own frozen tree and
    used instead of pretraining. The initial meta-parameters are then only the tree the
    real ones arrive in (by wire, or from the checkpoint): a hypernetwork's base adapters
    stay the standard init, and ``algorithm.hyper.init``'s run is not read. Raises
    :class:`metapeft_dist.wire.WireError` for a frame of another tree. ``files``: a jsonl
    family's task files (the driver's ``Job.files``), parsed instead of reading
    ``family.path``, so the machine needs no copy of them on disk."""
    family = make_family(spec.family, files)
    info = family.info
    out_dim = 1 if info.kind == "regression" else spec.family.ways
    model = build_model(spec.model, info.input_shape, out_dim, family)
    objective = objective_for(info.kind, spec.model.label_loss == "vocabulary")
    algorithm = make_algorithm(spec)
    job = Job(spec, family, model, objective, algorithm, frozen={}, initial_meta={},
              files=family.files)
    params = model.init(mx.random.key(spec.seed))
    if spec.model.base == "pretrained" and frozen_frame is None:
        base = job.pretrained()
        # The pretrained weights replace the random ones; adapters stay freshly
        # initialized (B = 0, so the model starts equal to the pretrained base).
        params = {**params, **{k: v for k, v in base.items()
                               if not (is_adapter(k) or is_head(k))}}
    trainable, frozen = split_trainable(params, spec.model.train)
    job.frozen = frozen
    if frozen_frame is not None:
        stored = TreeSpec.of({"frozen": job.stored_frozen()})
        job.frozen = {**frozen, **decode(frozen_frame, stored).tree.get("frozen", {})}
    job.initial_meta = algorithm.init_meta(trainable)
    if isinstance(algorithm, Hyper):
        base = trainable if frozen_frame is not None else _hyper_base(spec, trainable)
        job.initial_meta = algorithm.init_hyper(mx.random.key(spec.seed + 2), base)
    return job


def _hyper_base(spec: JobSpec, trainable: Params) -> Params:
    """The hypernetwork's base adapters: the standard LoRA init, or the meta-learned
    init of the run ``algorithm.hyper.init`` names (same model; its head is not used)."""
    # a run of another model is refused below by its adapters' names and shapes
    run = spec.algorithm.hyper.init
    if run is None:
        return trainable
    from metapeft_dist.rundir import AdaptError, load_init

    try:
        _, meta, _ = load_init(run, text=False)
    except AdaptError as err:
        raise ValueError(f"algorithm.hyper.init: {err}") from None
    given = meta["params"]
    for name, value in trainable.items():
        if is_adapter(name) and (name not in given or given[name].shape != value.shape):
            raise ValueError(f"algorithm.hyper.init: {run} has no adapter {name} of shape "
                             f"{tuple(value.shape)}: a different model")
    return {k: given[k] if is_adapter(k) else v for k, v in trainable.items()}
