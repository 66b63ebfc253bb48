"""dispatch.py's pure logic: a key lost again and again ends the job with one error
naming it (a worker that dies on the same work, e.g. killed for memory, would otherwise
retry it forever)."""

from __future__ import annotations

import pytest

from metapeft_dist.config import parse_spec
from metapeft_dist.cost import SpendMeter
from metapeft_dist.metrics import NoMetrics
from metapeft_dist.runtime.dispatch import MAX_LOSSES, Dispatcher, LostTooOften

SPEC = "family: {name: sinusoid}\nalgorithm: {name: maml, meta_batch: 4}\n"


class Pool:
    """The two calls Dispatcher.lost makes on a pool, recorded."""

    node_of: dict = {}

    def __init__(self):
        self.lost_handles = []

    def lost(self, handle):
        self.lost_handles.append(handle)


class Work:
    def __init__(self):
        self.lost_keys = []

    def lost(self, handle, key):
        self.lost_keys.append(key)


def _dispatcher(messages):
    return Dispatcher(parse_spec(SPEC), Pool(), None, 0, NoMetrics(), SpendMeter({}),
                      messages.append)


def test_a_key_lost_max_times_ends_the_job_naming_it_and_memory():
    messages = []
    d = _dispatcher(messages)
    work = Work()
    oom = RuntimeError("The actor died: the node ran out of memory (OOM killer)\ndetails")
    for _ in range(MAX_LOSSES - 1):
        d.lost("worker", oom, ("meta", 5, 0, 20, "test"), work)
    d.lost("worker", oom, ("meta", 5, 20, 20, "test"), work)  # another key: counted apart
    with pytest.raises(LostTooOften) as caught:
        d.lost("worker", oom, ("meta", 5, 0, 20, "test"), work)
    message = str(caught.value)
    assert f"('meta', 5, 0, 20, 'test') was lost {MAX_LOSSES} times" in message
    assert "the node ran out of memory (OOM killer)" in message and "details" not in message
    assert "eval.chunk" in message
    assert len(work.lost_keys) == MAX_LOSSES + 1 == len(d.pool.lost_handles)
    assert len(messages) == MAX_LOSSES + 1  # each loss said as it happened


def test_the_same_key_of_another_batch_counts_apart():
    """Each meta-validation sends pieces of the same keys: a loss in one is not one in
    the next."""
    d = _dispatcher([])
    err = RuntimeError("worker died")
    key = ("meta", 5, 0, 20, "val")
    for _ in range(MAX_LOSSES - 1):
        for work in (Work(), Work()):
            d.lost(None, err, key, work)
    with pytest.raises(LostTooOften) as caught:
        first = Work()
        for _ in range(MAX_LOSSES):
            d.lost(None, err, key, first)
    assert "eval.chunk" not in str(caught.value)  # nothing said of memory
