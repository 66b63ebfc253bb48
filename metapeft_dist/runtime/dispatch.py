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


class StallError(RuntimeError):
    """No task result arrived for ``runtime.stall_timeout`` seconds."""


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


class Dispatcher:
    """Runs chunks on the pool's workers at the parameter server's current version."""

    def __init__(self, spec: JobSpec, pool: WorkerPool, ps: Any, version: int,
                 metrics: JobMetrics, spend: SpendMeter, log: Callable[[str], None]):
        self.pool, self.ps, self.log = pool, ps, log
        self.stall_timeout = spec.runtime.stall_timeout
        self.version = version  # of the meta-parameters chunks are computed at
        self.ledger = ChunkLog(spec, pool, metrics, spend)
        # timings ref -> (worker, key, result ref, when dispatched, its work)
        self.inflight: dict[Any, tuple[Any, Any, Any, float, Work]] = {}
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

    def _dispatch(self, handle: Any, key: Any, work: Work) -> None:
        timings_ref, result_ref = work.submit(handle, key)
        self.inflight[timings_ref] = (handle, key, result_ref, time.monotonic(), work)

    def lost(self, handle: Any | None, err: BaseException, key: Any,
             work: Work | None = None) -> None:
        """A key was lost with its worker (``handle``, to be pinged until it answers
        again) or, with ``handle`` None, its result object was."""
        (work or self.chunks).lost(handle, key)
        self.log(f"a chunk was lost ({type(err).__name__}); it goes to another worker")
        if handle is not None:
            self.pool.lost(handle)

    def _wait(self) -> tuple[list[tuple[Any, Key, Any, dict]], list[Key]]:
        """Wait (at most WAIT_SECONDS) for chunks and pings to finish. Returns the
        finished chunks as (handle, key, frame_ref, timings) and the keys of lost ones."""
        refs = list(self.inflight) + self.pool.ping_refs()
        if not refs:
            time.sleep(WAIT_SECONDS)
            return [], []
        ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS)
        if ready:  # take everything else that is already done too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done, lost = [], []
        for ref in ready:
            if self.pool.answered(ref):
                continue
            handle, key, result_ref, dispatched, work = self.inflight.pop(ref)
            try:
                timings = ray.get(ref)
            except LOST as err:
                self.lost(handle, err, key, work)
                lost.append(key)
                continue
            self.pool.slots.append(handle)
            work.done(handle, key, timings, time.monotonic() - dispatched)
            done.append((handle, key, result_ref, timings))
        self.pool.report()
        return done, lost

    def loop(self, todo: deque, finished: Callable[[], bool], on_result: Callable,
             work: Work | None = None) -> None:
        """Dispatch ``todo``'s keys of ``work`` (default: meta-training's chunks; lost
        ones are put back) until ``finished()``; ``on_result(handle, key, result_ref,
        timings)`` takes each finished one and may raise LOST when its result object
        went with its node."""
        work = work if work is not None else self.chunks
        last_progress = time.monotonic()
        slots = self.pool.slots
        while not finished():
            while todo and slots:
                self._dispatch(slots.popleft(), todo.popleft(), work)
            results, lost = self._wait()
            todo.extend(lost)
            for item in results:
                try:
                    on_result(*item)
                except LOST as err:  # the result object went with its node
                    self.lost(None, err, item[1], work)
                    todo.append(item[1])
            if results:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout:
                raise StallError(
                    f"no task result for {self.stall_timeout:.0f} s "
                    f"({self.pool.answering()} of {len(self.pool.workers)} workers answering)")
