"""Job specs: frozen dataclasses, loaded from YAML and validated once, at the edge.

Every field carries a help string (``metadata["help"]``), which is also the source of
the spec reference. Loading collects every problem it finds, each with the path of the
field (``inner.lr: must be > 0, got -0.1``), and raises one :class:`ConfigError`.
After loading, only these dataclasses travel through the code.

This module imports neither mlx nor ray.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from metapeft_dist.tasks.catalog import FAMILIES, SPLITS


class ConfigError(ValueError):
    """A job spec is wrong. ``errors`` holds every (field path, message) found."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(errors)
        first = _format(*self.errors[0])
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(first + more)

    def lines(self) -> list[str]:
        return [_format(path, msg) for path, msg in self.errors]


def _format(path: str, msg: str) -> str:
    return f"{path}: {msg}" if path else msg


class _FieldErrors(Exception):
    """Raised by ``__post_init__`` checks; the loader prefixes the dataclass's path."""

    def __init__(self, errors: list[tuple[str, str]]):
        super().__init__(errors[0][1])
        self.errors = errors


class _Checks:
    """Collects every failed check of a ``__post_init__``, then raises them together.

        with _Checks() as check:
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
    """

    def __enter__(self) -> "_Checks":
        self.failed: list[tuple[str, str]] = []
        return self

    def __call__(self, ok: bool, field_name: str, message: str) -> None:
        if not ok:
            self.failed.append((field_name, message))

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None and self.failed:
            raise _FieldErrors(self.failed)


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class FamilySpec:
    """The task family and the shape of its episodes."""

    name: Literal["sinusoid", "gaussian", "digits"] = _help(
        "task family: sinusoid (regression), gaussian (binary classification), "
        "digits (N-way image classification)"
    )
    ways: int | None = _help(
        "classes per task (classification); gaussian is always 2; unset for regression",
        default=None,
    )
    shots: int = _help(
        "support examples per class (classification) or per task (regression)", default=5
    )
    query: int = _help(
        "query examples per class (classification) or per task (regression)", default=15
    )
    augment: bool = _help(
        "digits: shift each class of a meta-train episode by a random whole pixel (one "
        "of 9 offsets), making new class variants against meta-overfitting",
        default=False,
    )

    def __post_init__(self) -> None:
        with _Checks() as check:
            info = FAMILIES[self.name]
            check(self.shots >= 1, "shots", f"must be >= 1, got {self.shots}")
            check(self.query >= 1, "query", f"must be >= 1, got {self.query}")
            check(not self.augment or info.image, "augment",
                  f"augmentation applies to image families, not {self.name}")
            if info.kind == "regression":
                check(self.ways is None, "ways", f"{self.name} is a regression family; remove ways")
                return
            if self.ways is None:
                object.__setattr__(self, "ways", info.fixed_ways or 5)
            assert self.ways is not None
            if info.fixed_ways is not None:
                check(
                    self.ways == info.fixed_ways,
                    "ways",
                    f"{self.name} tasks always have {info.fixed_ways} classes, got {self.ways}",
                )
            check(self.ways >= 2, "ways", f"must be >= 2, got {self.ways}")
            if info.classes_per_split is not None:
                fewest = min(info.classes_per_split.values())
                check(
                    self.ways <= fewest,
                    "ways",
                    f"{self.name}'s smallest split has {fewest} classes, got ways = {self.ways}",
                )

    @property
    def info(self):
        return FAMILIES[self.name]


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (Hu et al. 2021) on every hidden linear / conv layer."""

    rank: int = _help("adapter rank r", default=4)
    alpha: float = _help("adapter scale numerator: the update is (alpha / r) * B A", default=8.0)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
            check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class PretrainSpec:
    """Supervised training on all meta-train data: the pretrained base and baseline."""

    steps: int = _help("optimizer steps", default=1000)
    lr: float = _help("Adam learning rate", default=1e-3)
    batch: int = _help("examples per step", default=64)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
            check(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")


@dataclass(frozen=True)
class ModelSpec:
    """The network whose initialization is meta-learned."""

    kind: Literal["mlp", "conv"] = _help("mlp, or conv (image families only)", default="mlp")
    hidden: tuple[int, ...] = _help("mlp hidden layer widths", default=(40, 40))
    channels: tuple[int, ...] = _help(
        "conv channels per 3x3 conv block (each block: conv, ReLU, 2x2 max-pool)",
        default=(32, 32),
    )
    lora: LoraSpec | None = _help("LoRA adapters on the hidden layers; unset: none", default=None)
    train: Literal["all", "lora"] = _help(
        "what is meta-learned: all weights, or only the LoRA adapters and the head "
        "(base frozen)",
        default="all",
    )
    base: Literal["random", "pretrained"] = _help(
        "base weights: a random init, or pretrained on all meta-train data", default="random"
    )
    pretrain: PretrainSpec = _help("pretraining (base: pretrained, and the pretrained baseline)",
                                   default_factory=PretrainSpec)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "hidden",
                   f"must be a non-empty list of positive widths, got {list(self.hidden)}")
            check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "channels",
                  f"must be a non-empty list of positive channel counts, "
                  f"got {list(self.channels)}")
            check(self.train != "lora" or self.lora is not None, "train",
                   "train: lora needs a model.lora section")


@dataclass(frozen=True)
class ReptileSpec:
    serial: bool = _help(
        "apply each task's update in turn (Nichol et al. serial form) instead of the "
        "batched mean",
        default=False,
    )


@dataclass(frozen=True)
class MetaSgdSpec:
    first_order: bool = _help(
        "drop second-order terms; the learning rates still get gradients", default=False
    )


@dataclass(frozen=True)
class MamlppSpec:
    """MAML++ (Antoniou et al. 2019); all off makes it plain second-order MAML."""

    multi_step_loss: bool = _help("weight the query loss after every inner step (MSL)",
                                  default=True)
    msl_anneal_iterations: int = _help(
        "iterations over which MSL weights anneal onto the last step", default=1000
    )
    per_step_lr: bool = _help("learn a learning rate per layer and per inner step (LSLR)",
                              default=True)
    first_order_until: int = _help(
        "derivative-order annealing: first-order meta-gradients before this iteration",
        default=0,
    )

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.msl_anneal_iterations >= 0, "msl_anneal_iterations",
                   f"must be >= 0, got {self.msl_anneal_iterations}")
            check(self.first_order_until >= 0, "first_order_until",
                   f"must be >= 0, got {self.first_order_until}")


ALGORITHMS = ("reptile", "fomaml", "maml", "metasgd", "mamlpp")


@dataclass(frozen=True)
class AlgorithmSpec:
    """The meta-learning algorithm and the length of meta-training."""

    name: Literal["reptile", "fomaml", "maml", "metasgd", "mamlpp"] = _help(
        "reptile, fomaml (first-order MAML), maml (second order), metasgd, mamlpp"
    )
    meta_batch: int = _help("tasks per meta-iteration", default=25)
    iterations: int = _help("meta-iterations (outer steps for the batched forms)", default=1000)
    reptile: ReptileSpec | None = _help("Reptile options (name: reptile only)", default=None)
    metasgd: MetaSgdSpec | None = _help("Meta-SGD options (name: metasgd only)", default=None)
    mamlpp: MamlppSpec | None = _help("MAML++ options (name: mamlpp only)", default=None)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.meta_batch >= 1, "meta_batch", f"must be >= 1, got {self.meta_batch}")
            check(self.iterations >= 0, "iterations", f"must be >= 0, got {self.iterations}")
            for section, cls in (("reptile", ReptileSpec), ("metasgd", MetaSgdSpec),
                                 ("mamlpp", MamlppSpec)):
                given = getattr(self, section)
                if section == self.name:
                    if given is None:
                        object.__setattr__(self, section, cls())
                else:
                    check(given is None, section,
                           f"options for {section} given, but algorithm.name is {self.name}")


@dataclass(frozen=True)
class InnerSpec:
    """The inner loop: task adaptation from the meta-learned initialization."""

    steps: int = _help("adaptation steps per task during meta-training", default=1)
    lr: float = _help("inner learning rate (initial value for Meta-SGD / MAML++)", default=0.01)
    optimizer: Literal["sgd", "adam"] = _help("sgd, or adam (moments reset per task)",
                                              default="sgd")
    beta1: float = _help("Adam beta1 (0 as in Nichol et al. 2018)", default=0.0)
    beta2: float = _help("Adam beta2", default=0.999)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
            check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
            check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")


@dataclass(frozen=True)
class OuterSpec:
    """The outer (meta) optimizer, from mlx.optimizers."""

    optimizer: Literal["adam", "adamw", "sgd"] = _help("adam, adamw or sgd", default="adam")
    lr: float = _help("peak outer learning rate (Reptile: the step size epsilon)", default=1e-3)
    schedule: Literal["constant", "cosine", "linear"] = _help(
        "learning-rate schedule after warm-up: constant, cosine or linear decay to end_lr",
        default="constant",
    )
    end_lr: float = _help("final learning rate of a decaying schedule", default=0.0)
    warmup: int = _help("linear warm-up steps from 0", default=0)
    clip_norm: float | None = _help("clip the meta-gradient's global norm; unset: no clipping",
                                    default=None)
    weight_decay: float = _help("AdamW decoupled weight decay", default=0.01)
    momentum: float = _help("SGD momentum", default=0.0)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
            check(0 <= self.end_lr <= self.lr, "end_lr",
                   f"must be in [0, lr = {self.lr}], got {self.end_lr}")
            check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
            check(self.clip_norm is None or self.clip_norm > 0, "clip_norm",
                   f"must be > 0, got {self.clip_norm}")
            check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
            check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")


BASELINES = ("random", "pretrained")


@dataclass(frozen=True)
class EvalSpec:
    """Meta-validation during training and the final meta-test evaluation."""

    tasks: int = _help("meta-test tasks per shot setting", default=600)
    shots: tuple[int, ...] = _help("shot settings to evaluate", default=(1, 5, 10))
    steps: int = _help("adaptation steps at evaluation (curve recorded at every step)",
                       default=10)
    every: int = _help("meta-validate every N iterations; 0: never", default=500)
    val_tasks: int = _help("meta-validation tasks", default=100)
    select: Literal["best", "last"] = _help(
        "which init is evaluated: the one with the best meta-validation metric (early "
        "stopping), or the last; 'best' needs every > 0",
        default="best",
    )
    baselines: tuple[Literal["random", "pretrained"], ...] = _help(
        "inits to compare the meta-learned one against: random (a fresh standard init, "
        "same frozen base) and pretrained (trained on all meta-train data, then fine-tuned)",
        default=("random", "pretrained"),
    )
    target: float | None = _help(
        "steps-to-target threshold; unset: the random init's value after the last step",
        default=None,
    )
    query: int | None = _help(
        "query examples per class (or per task) at meta-test; unset: family.query",
        default=None)
    chunk: int = _help("tasks adapted together (vmapped) at evaluation", default=100)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.tasks >= 1, "tasks", f"must be >= 1, got {self.tasks}")
            check(len(self.shots) >= 1 and all(s >= 1 for s in self.shots), "shots",
                   f"must be a non-empty list of positive shot counts, got {list(self.shots)}")
            check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
            check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
            check(self.val_tasks >= 1, "val_tasks", f"must be >= 1, got {self.val_tasks}")
            check(self.select == "last" or self.every > 0, "select",
                  "best needs meta-validation (every > 0); use select: last")
            check(len(set(self.baselines)) == len(self.baselines), "baselines",
                   f"has duplicates: {list(self.baselines)}")
            check(self.chunk >= 1, "chunk", f"must be >= 1, got {self.chunk}")
            check(self.query is None or self.query >= 1, "query",
                   f"must be >= 1, got {self.query}")


@dataclass(frozen=True)
class CheckpointSpec:
    every: int = _help("checkpoint every N iterations (and always at the end); 0: end only",
                       default=1000)
    keep: int = _help("periodic checkpoints kept on disk", default=3)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
            check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class RunSpec:
    """Where results go and how the meta-batch is executed in one process."""

    out_dir: str = _help("parent directory of run directories", default="runs")
    batching: Literal["vmap", "loop"] = _help(
        "vmap the meta-batch's tasks, or loop over them", default="vmap"
    )
    compile: bool = _help("mx.compile the meta-step and the evaluation", default=True)


@dataclass(frozen=True)
class JobSpec:
    """A meta-training job: what to learn, how, and how to evaluate it."""

    family: FamilySpec = _help("task family")
    algorithm: AlgorithmSpec = _help("meta-learning algorithm")
    name: str = _help("job name (default: the spec file's name)", default="job")
    seed: int = _help("seed of everything random: init, task sampling, evaluation", default=0)
    model: ModelSpec = _help("model", default_factory=ModelSpec)
    inner: InnerSpec = _help("inner loop", default_factory=InnerSpec)
    outer: OuterSpec = _help("outer optimizer", default_factory=OuterSpec)
    eval: EvalSpec = _help("evaluation", default_factory=EvalSpec)
    checkpoint: CheckpointSpec = _help("checkpoints", default_factory=CheckpointSpec)
    run: RunSpec = _help("execution", default_factory=RunSpec)

    def __post_init__(self) -> None:
        with _Checks() as check:
            check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name)), "name",
                   f"must be letters, digits, '.', '_' or '-', got {self.name!r}")
            check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
            info = self.family.info
            check(self.model.kind != "conv" or info.image, "model.kind",
                   f"conv needs an image family, and {info.name} is not one")
            if info.min_class_size is not None:
                for where, shots, query in (
                        ("family.shots", self.family.shots, self.family.query),
                        ("eval.shots", max(self.eval.shots), self.eval.query or self.family.query)):
                    check(shots + query <= info.min_class_size, where,
                           f"{shots} shots + {query} query examples exceed the "
                           f"{info.min_class_size} examples of {info.name}'s smallest class")

    @property
    def is_classification(self) -> bool:
        return self.family.info.kind == "classification"

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants a dot: 1.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> JobSpec:
    """Read, validate and return the job spec at ``path``.

    ``overrides`` are ``dotted.path=value`` strings (value in YAML syntax) applied
    before validation, e.g. ``algorithm.iterations=100``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([("", f"spec file not found: {path}")]) from None
    except IsADirectoryError:
        raise ConfigError([("", f"spec path is a directory, not a file: {path}")]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([("", f"cannot read spec {path}: {err}")]) from None
    return parse_spec(text, default_name=path.stem, overrides=overrides, source=str(path))


def parse_spec(text: str, default_name: str = "job", overrides: typing.Sequence[str] = (),
               source: str = "spec") -> JobSpec:
    """Validate a job spec given as YAML text."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([("", f"{source} is not valid YAML{where}: {problem}")]) from None
    if data is None:
        raise ConfigError([("", f"{source} is empty")])
    if not isinstance(data, dict):
        raise ConfigError([("", f"{source} must be a mapping of sections, "
                                f"got {_type_name(data)}")])
    data = dict(data)
    data.setdefault("name", default_name)
    errors: list[tuple[str, str]] = []
    for item in overrides:
        _apply_override(data, item, errors)
    if errors:
        raise ConfigError(errors)
    return from_dict(data)


def from_dict(data: Any) -> JobSpec:
    """Validate a job spec given as plain data (as parsed from YAML or JSON)."""
    errors: list[tuple[str, str]] = []
    spec = _build(JobSpec, data, "", errors)
    if errors:
        raise ConfigError(errors)
    assert isinstance(spec, JobSpec)
    return spec


def _apply_override(data: dict, item: str, errors: list[tuple[str, str]]) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        errors.append(("", f"override {item!r} must look like section.key=value"))
        return
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            errors.append((key, f"cannot override inside {part!r}, which is not a section"))
            return
        node = child
    node[parts[-1]] = value


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(
        type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    if not isinstance(data, dict):
        errors.append((path, f"must be a mapping, got {_type_name(data)}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            errors.append((_join(path, str(key)), f"unknown key (expected one of: {known})"))
    kwargs: dict[str, Any] = {}
    ok = True
    for name, f in fields.items():
        fpath = _join(path, name)
        if name in data:
            before = len(errors)
            value = _convert(hints[name], data[name], fpath, errors)
            if len(errors) > before:
                ok = False
            else:
                kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append((fpath, "missing (required)"))
            ok = False
    if not ok or any(str(k) not in fields for k in data):
        return None
    try:
        return cls(**kwargs)
    except _FieldErrors as err:
        errors.extend((_join(path, name), message) for name, message in err.errors)
        return None


def _convert(tp: Any, value: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, errors)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(str(a) for a in args)
        errors.append((path, f"must be one of {choices}; got {value!r}"))
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append((path, f"must be a list, got {_type_name(value)}"))
            return None
        items = [_convert(args[0], v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items)
    if dataclasses.is_dataclass(tp):
        if value is None:
            errors.append((path, "must be a mapping, got nothing"))
            return None
        return _build(tp, value, path, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append((path, f"must be true or false, got {value!r}"))
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        errors.append((path, f"must be an integer, got {value!r}"))
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            errors.append((path, f"must be a finite number, got {value!r}"))
            return None
        errors.append((path, f"must be a number, got {value!r}"))
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        errors.append((path, f"must be a string, got {value!r}"))
        return None
    raise TypeError(f"config type {tp!r} at {path} has no converter")  # a bug, not bad input


def reference() -> str:
    """The spec reference in Markdown, generated from the dataclasses' help strings."""
    out = ["# Job spec reference", "",
           "Generated from `metapeft_dist/config.py`; every key, its type, default and "
           "meaning.", ""]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            sub = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
            if f.default is not dataclasses.MISSING:
                default = "unset" if f.default is None else f"`{_to_plain(f.default)}`"
            elif f.default_factory is not dataclasses.MISSING:
                default = "section" if sub else f"`{_to_plain(f.default_factory())}`"
            else:
                default = "**required**"
            rows.append(f"| `{_join(prefix, f.name)}` | {_type_label(tp)} | {default} | "
                        f"{f.metadata.get('help', '')} |")
            if sub:
                nested.append((sub[0], _join(prefix, f.name)))
        out.extend([f"## `{prefix or 'top level'}`", "", (cls.__doc__ or "").strip(), "",
                    "| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""])
        for sub_cls, sub_prefix in nested:
            walk(sub_cls, sub_prefix)

    walk(JobSpec, "")
    return "\n".join(out).replace("\n\n\n", "\n\n")


def _type_label(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_label(a) for a in args if a is not type(None)) + " (optional)"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_type_label(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))


if __name__ == "__main__":  # python -m metapeft_dist.config > docs/job-spec.md
    print(reference())


__all__ = ["ConfigError", "JobSpec", "load_spec", "parse_spec", "from_dict", "reference",
           "SPLITS", "ALGORITHMS", "BASELINES"]
