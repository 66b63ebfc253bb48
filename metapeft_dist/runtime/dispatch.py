"""The dispatch loop: keys of work out to the workers' free slots, results back.

The work is meta-training's by default: a chunk ``(iteration, start, count)``, tasks
``start .. start+count-1`` of the iteration's meta-batch. Only the key goes out, with an
object ref of the current meta-parameter frame (fetched once per version); the result
comes back as two refs, the chunk's timings (waited for here) and its gradient frame
(passed on to the parameter server without coming through this process). Other work
(the evaluation's pieces, runtime/evaluation.py) brings its own :class:`Work`. A key
lost with its worker, or whose result object went with its node, is queued again for
another worker.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Protocol

import ray

from metapeft_dist.config import JobSpec
from metapeft_dist.cost import SpendMeter
from metapeft_dist.metrics import JobMetrics
from metapeft_dist.throughput import Throughput
from metapeft_dist.runtime.errors import StallError
from metapeft_dist.runtime.pool import LOST, WorkerPool

WAIT_SECONDS = 0.5

Key = tuple[int, int, int]  # (iteration, start, count)


class Work(Protocol):
    """A kind of work the loop dispatches: how a key goes out and what its end records."""

    def submit(self, handle: Any, key: Any) -> tuple[Any, Any]:
        """Start ``key`` on the worker ``handle``: (timings ref, result ref)."""
        ...

    def done(self, handle: Any, key: Any, timings: dict[str, Any], round_trip: float) -> None:
        ...

    def lost(self, handle: Any | None, key: Any) -> None:
        ...


class LostTooOften(StallError):
    """A key was lost MAX_LOSSES times, each time with its worker: the job cannot
    progress (a worker that dies on the same work again and again, e.g. killed for
    memory, would otherwise retry it forever)."""


MAX_LOSSES = 3


class ChunkLog:
    """What the finished chunks add up to: counts, times, bytes, per worker and kind."""

    def __init__(self, spec: JobSpec, pool: WorkerPool, metrics: JobMetrics,
                 spend: SpendMeter):
        self.spec, self.pool, self.metrics, self.spend = spec, pool, metrics, spend
        self.counters = {"dispatched": 0, "completed": 0, "lost": 0, "duplicates": 0,
                         "tasks_completed": 0, "tasks_lost": 0}
        self.throughput = Throughput()
        self.task_seconds: list[float] = []
        self.per_host: dict[str, dict[str, Any]] = {}
        self.bytes_out: list[int] = []
        self.bytes_in: list[int] = []

    def done(self, handle: Any, key: Key, timings: dict[str, Any], round_trip: float) -> None:
        node = self.pool.node_of.get(handle) or self.pool.node_label(
            {"id": timings["node_id"], "host": timings["host"]})
        tasks = key[2]
        self.metrics.chunk_done(node, tasks, self.spec.inner.steps, timings["compute_seconds"],
                                timings["seconds"], round_trip, timings["bytes_in"],
                                timings["bytes_out"], timings.get("tokens", 0))
        self.spend.power_reading(node, timings.get("energy_joules"), timings["ended"])
        self.throughput.add(node, timings["ended"], tasks)
        self.counters["tasks_completed"] += tasks
        self.counters["completed"] += 1
        self.task_seconds.append(timings["seconds"])
        self.bytes_out.append(timings["bytes_out"])
        self.bytes_in.append(timings["bytes_in"])
        worker = f"{timings['host']}:{timings['pid']}"
        host = self.per_host.setdefault(worker, {"chunks": 0, "compute_seconds": 0.0})
        host["chunks"] += 1
        host["kind"] = timings.get("kind", "unknown")
        self.pool.counted_on(host["kind"])
        host["compute_seconds"] += timings["compute_seconds"]

    def lost(self, handle: Any | None, key: Key) -> None:
        self.counters["lost"] += 1
        self.counters["tasks_lost"] += key[2]
        self.metrics.chunk_lost(self.pool.node_of.get(handle), key[2])

    def summary(self) -> dict[str, Any]:
        """The figures results.json's runtime section reports (besides the counters)."""
        seconds = sorted(self.task_seconds)
        n = len(self.bytes_out) or 1
        return {"chunk_seconds_median": seconds[len(seconds) // 2] if seconds else None,
                "bytes_out_per_task": sum(self.bytes_out) / n / self.spec.runtime.chunk,
                "bytes_in_per_chunk": sum(self.bytes_in) / n,
                "per_worker": self.per_host,
                "throughput": self.throughput.summary()}


class ChunkWork:
    """Meta-training's work: chunks computed at the dispatcher's current version,
    recorded on its ledger."""

    def __init__(self, dispatcher: "Dispatcher"):
        self.dispatcher = dispatcher

    def submit(self, handle: Any, key: Key) -> tuple[Any, Any]:
        d = self.dispatcher
        iteration, start, count = key
        d.ledger.counters["dispatched"] += 1
        return handle.run_ref.options(num_returns=2).remote(
            d.version, [d.meta_ref()], iteration, start, count)

    def done(self, handle: Any, key: Key, timings: dict[str, Any], round_trip: float) -> None:
        self.dispatcher.ledger.done(handle, key, timings, round_trip)

    def lost(self, handle: Any | None, key: Key) -> None:
        self.dispatcher.ledger.lost(handle, key)


class Batch:
    """Keys of one kind of work in the loop: those still to go out (``todo``; a lost one
    comes back here), ``on_result(handle, key, result_ref, timings)`` for each finished
    one (it may raise LOST when the result object went with its node), and how many
    are out now."""

    def __init__(self, todo: deque, work: Work, on_result: Callable):
        self.todo, self.work, self.on_result = todo, work, on_result
        self.out = 0

    def finished(self) -> bool:
        return not self.todo and not self.out


class Dispatcher:
    """Runs keys of work on the pool's workers: meta-training's chunks at the parameter
    server's current version, in the loop a stepper runs, and beside them the
    background batches (a meta-validation's pieces), which run while the steps go on.

    A free slot goes to the loop's own keys first, so meta-training runs at the pace it
    would alone and a background batch fills the slots it leaves idle (in sync mode, at
    each iteration's barrier); a background batch with nothing out gets a slot anyway,
    so it progresses while async chunks keep every slot busy."""

    def __init__(self, spec: JobSpec, pool: WorkerPool, ps: Any, version: int,
                 metrics: JobMetrics, spend: SpendMeter, log: Callable[[str], None]):
        self.pool, self.ps, self.log = pool, ps, log
        self.stall_timeout = spec.runtime.stall_timeout
        self.version = version  # of the meta-parameters chunks are computed at
        self.ledger = ChunkLog(spec, pool, metrics, spend)
        # timings ref -> (worker, key, result ref, when dispatched, its batch)
        self.inflight: dict[Any, tuple[Any, Any, Any, float, Batch]] = {}
        self.background: list[Batch] = []
        self.losses: dict[tuple[Work, Any], int] = {}  # (its work, key) -> times lost
        self._meta_ref: tuple[int, Any] | None = None
        self.chunks = ChunkWork(self)

    def at_version(self, version: int, frame_ref: Any | None = None) -> None:
        """Chunks from now on are computed at ``version`` (whose frame is ``frame_ref``,
        when the caller already has it)."""
        self.version = version
        if frame_ref is not None:
            self._meta_ref = (version, frame_ref)

    def meta_ref(self) -> Any:
        """An object ref of the current meta-parameter frame (one fetch per version)."""
        if self._meta_ref is None or self._meta_ref[0] != self.version:
            self._meta_ref = (self.version, self.ps.meta_frame.remote())
        return self._meta_ref[1]

    def _dispatch(self, handle: Any, batch: Batch) -> None:
        key = batch.todo.popleft()
        timings_ref, result_ref = batch.work.submit(handle, key)
        batch.out += 1
        self.inflight[timings_ref] = (handle, key, result_ref, time.monotonic(), batch)

    def _fill(self, batch: Batch) -> None:
        """Hand out keys to the free slots: ``batch``'s first, then the background's
        (module docstring)."""
        slots = self.pool.slots
        waiting = [b for b in self.background if b.todo]
        for b in waiting:  # each background batch keeps one key out
            if slots and not b.out:
                self._dispatch(slots.popleft(), b)
        while slots and batch.todo:
            self._dispatch(slots.popleft(), batch)
        for b in waiting:
            while slots and b.todo:
                self._dispatch(slots.popleft(), b)

    def lost(self, handle: Any | None, err: BaseException, key: Any,
             work: Work | None = None) -> None:
        """A key was lost with its worker (``handle``, to be pinged until it answers
        again) or, with ``handle`` None, its result object was. The MAX_LOSSES-th loss
        of one key ends the job (LostTooOften)."""
        work = work or self.chunks
        work.lost(handle, key)
        self.log(f"a chunk was lost ({type(err).__name__}); it goes to another worker")
        if handle is not None:
            self.pool.lost(handle)
        times = self.losses[work, key] = self.losses.get((work, key), 0) + 1
        if times >= MAX_LOSSES:
            cause = next((line.strip() for line in str(err).splitlines() if line.strip()),
                         type(err).__name__)
            memory = ("; its workers ran out of memory: make the pieces smaller (eval.chunk "
                      "for an evaluation, runtime.chunk for meta-training)"
                      if "memory" in str(err).lower() else "")
            raise LostTooOften(f"{type(work).__name__} {key} was lost {times} times with its "
                               f"worker (last: {cause}){memory}")

    def _wait(self) -> bool:
        """Wait (at most WAIT_SECONDS) for keys and pings to finish, and hand each
        finished key to its batch (a lost one back to its batch's todo). Returns
        whether any key finished."""
        refs = list(self.inflight) + self.pool.ping_refs()
        if not refs:
            time.sleep(WAIT_SECONDS)
            return False
        ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS)
        if ready:  # take everything else that is already done too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        finished = False
        for ref in ready:
            if self.pool.answered(ref):
                continue
            handle, key, result_ref, dispatched, batch = self.inflight.pop(ref)
            batch.out -= 1
            try:
                timings = ray.get(ref)
            except LOST as err:
                self.lost(handle, err, key, batch.work)
                batch.todo.append(key)
                continue
            self.pool.slots.append(handle)
            batch.work.done(handle, key, timings, time.monotonic() - dispatched)
            finished = True
            try:
                batch.on_result(handle, key, result_ref, timings)
            except LOST as err:  # the result object went with its node
                self.lost(None, err, key, batch.work)
                batch.todo.append(key)
        self.background = [b for b in self.background if not b.finished()]
        self.pool.report()
        return finished

    def loop(self, todo: deque, on_result: Callable, work: Work | None = None,
             finished: Callable[[], bool] | None = None) -> None:
        """Dispatch ``todo``'s keys of ``work`` (default: meta-training's chunks; lost
        ones are put back) until ``finished()`` (default: all of them done), the
        background batches beside them; ``on_result(handle, key, result_ref, timings)``
        takes each finished one and may raise LOST when its result object went with its
        node."""
        batch = Batch(todo, work if work is not None else self.chunks, on_result)
        done = finished if finished is not None else batch.finished
        last_progress = time.monotonic()
        while not done():
            self._fill(batch)
            if self._wait():
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout:
                raise StallError(
                    f"no task result for {self.stall_timeout:.0f} s "
                    f"({self.pool.answering()} of {len(self.pool.workers)} workers answering)")

    def start(self, todo: deque, on_result: Callable, work: Work) -> Batch:
        """Run ``todo``'s keys of ``work`` in the background: they go out whenever a
        loop runs (a step, or :meth:`drain`)."""
        batch = Batch(todo, work, on_result)
        if not batch.finished():
            self.background.append(batch)
        return batch

    def drain(self, batch: Batch) -> None:
        """Run the loop until the background ``batch`` is done."""
        self.loop(deque(), lambda *item: None, self.chunks, batch.finished)
