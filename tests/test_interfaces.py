"""Each implementation has every member its Protocol declares, with the protocol's
parameters first (extra ones optional): the models (models.Network), the executors
(training.Executor), the task loss the hypernetwork reads (algorithms.hyper.HeadLoss),
where an evaluation runs (evaluate.Scorer) and the dispatch loop's work (Work).
Read from the classes, so a member added to a protocol and forgotten in one model
fails here rather than in a job."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Protocol

import pytest

from metapeft_dist.algorithms.hyper import HeadLoss
from metapeft_dist.evaluate import LocalScorer, Scorer
from metapeft_dist.job import TaskLoss
from metapeft_dist.models import Classifier, Model, Network
from metapeft_dist.models.causal_lm import CausalLMModel
from metapeft_dist.models.encoder import EncoderModel
from metapeft_dist.training import Executor
from metapeft_dist.runtime.dispatch import ChunkWork, Work
from metapeft_dist.runtime.driver import RayExecutor
from metapeft_dist.runtime.evaluation import PieceWork, RayScorer
from metapeft_dist.trainer import MetaTrainer


def _declared(protocol: type) -> tuple[set[str], dict[str, inspect.Signature]]:
    """(attributes, methods with their signatures) a Protocol declares, its Protocol
    bases' included."""
    attributes: set[str] = set()
    methods: dict[str, inspect.Signature] = {}
    for cls in protocol.__mro__:
        if cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        attributes |= set(vars(cls).get("__annotations__", {}))
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and (not name.startswith("_") or name == "__call__"):
                methods.setdefault(name, inspect.signature(value))
            elif isinstance(value, property):
                attributes.add(name)
    return attributes, methods


def _missing(protocol: type, cls: type) -> list[str]:
    """What ``cls`` lacks or takes differently, one line each."""
    attributes, methods = _declared(protocol)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    problems = [f"no attribute {name}" for name in sorted(attributes)
                if name not in fields and not hasattr(cls, name)]
    for name, wanted in sorted(methods.items()):
        if not inspect.isfunction(getattr(cls, name, None)):
            problems.append(f"no method {name}")
            continue
        want = [p.name for p in wanted.parameters.values()]
        have = list(inspect.signature(getattr(cls, name)).parameters.values())
        extra = have[len(want):]
        if [p.name for p in have[:len(want)]] != want or any(
                p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                       p.VAR_KEYWORD)
                for p in extra):
            problems.append(f"{name}{inspect.signature(getattr(cls, name))} is not "
                            f"{name}{wanted}")
    return problems


@pytest.mark.parametrize("protocol, cls", [
    (Classifier, Model), (Classifier, EncoderModel), (Network, CausalLMModel),
    (Executor, MetaTrainer), (Executor, RayExecutor), (HeadLoss, TaskLoss),
    (Scorer, LocalScorer), (Scorer, RayScorer), (Work, ChunkWork), (Work, PieceWork)])
def test_each_implementation_has_its_protocols_members(protocol, cls):
    assert _missing(protocol, cls) == []


def test_the_check_sees_a_missing_member_and_a_changed_signature():
    class Half:
        kind = "mlp"
        out_dim = 2
        logit_scale = 1.0

        def init(self, key): ...

        def __call__(self, x, params): ...  # the protocol's parameters swapped

        def with_out_dim(self, out_dim, strict): ...  # an extra one without a default

    assert _missing(Network, Half) == [
        "__call__(self, x, params) is not __call__(self, params: 'Params', x: 'mx.array') "
        "-> 'mx.array'",
        "no method export",
        "with_out_dim(self, out_dim, strict) is not with_out_dim(self, out_dim: 'int') "
        "-> 'Network'"]
