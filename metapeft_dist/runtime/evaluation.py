"""The evaluation on the Ray workers: the pieces of an evaluation (sweeps.Piece: an
init, a shot count, a chunk of meta-test tasks) go to the workers through the same
dispatch loop as meta-training's chunks, and their curves come back.

Each init travels once to each worker that needs it (job.init_frame: its
meta-parameters and the frozen arrays that differ from the job's base), as an object
ref fetched only by a worker that does not hold it yet. A worker computes a piece as the
driver would (evaluate.LocalScorer.piece), and the driver assembles the curves in task
order, so the evaluation is bitwise the same for any number of workers and any faults
(a piece lost with its worker is computed again by another), and equal to the
in-process evaluation on the same kind of machine.

The standard init's fine-tune to the target (finetune.Finetune) runs on the workers
too: at each scored step, each piece's next segment (FINETUNE_CHUNK tasks, their Adam
state as a wire frame) goes out as a key of the same loop, and the driver takes the
mean and decides whether to go on; the same bits as in-process for any number of
workers and any faults.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from typing import Any, Callable

import numpy as np
import ray

from metapeft_dist.finetune import Finetune, Request, State
from metapeft_dist.job import Init, Job, init_frame
from metapeft_dist.sweeps import Piece
from metapeft_dist.wire import declared_spec, encode, decode
from metapeft_dist.runtime.dispatch import Batch, Dispatcher


class PieceWork:
    """The evaluation's work for the dispatch loop: pieces of known inits."""

    def __init__(self, refs: dict[str, tuple[str, Any]]):
        self.refs = refs  # init name -> (its id on the workers, its frame's object ref)
        self.counters = {"dispatched": 0, "completed": 0, "lost": 0}
        self.per_worker: dict[str, int] = {}  # host:pid -> pieces computed

    def submit(self, handle: Any, key: Piece) -> tuple[Any, Any]:
        name, shots, start, count, sweep = key
        init_id, ref = self.refs[name]
        self.counters["dispatched"] += 1
        return handle.evaluate_ref.options(num_returns=2).remote(init_id, [ref], shots,
                                                                 start, count, sweep)

    def done(self, handle: Any, key: Piece, timings: dict[str, Any],
             round_trip: float) -> None:
        self.counters["completed"] += 1
        worker = f"{timings['host']}:{timings['pid']}"
        self.per_worker[worker] = self.per_worker.get(worker, 0) + 1

    def lost(self, handle: Any | None, key: Piece) -> None:
        self.counters["lost"] += 1


class FinetuneWork(PieceWork):
    """A fine-tune's segments for the dispatch loop: key (point, first task), its
    request (finetune.Request) sent with the standard init's frame ref."""

    def __init__(self, refs: dict[str, tuple[str, Any]], name: str, shots: int):
        super().__init__(refs)
        self.name, self.shots = name, shots
        self.requests: dict[tuple[int, int], tuple[int, int, bytes, int]] = {}

    def submit(self, handle: Any, key: tuple[int, int]) -> tuple[Any, Any]:
        init_id, ref = self.refs[self.name]
        start, count, frame, steps = self.requests[key]
        self.counters["dispatched"] += 1
        return handle.finetune_ref.options(num_returns=2).remote(
            init_id, [ref], self.shots, start, count, frame, steps)


class RayScorer:
    """An evaluate.Scorer on the run's Ray workers."""

    def __init__(self, job: Job, dispatcher: Dispatcher):
        self.job, self.dispatcher = job, dispatcher
        self.last: PieceWork | None = None  # the latest run's counters, for the stats
        self.last_finetune: FinetuneWork | None = None  # the latest fine-tune's

    def start(self, inits: list[Init], todo: list[Piece],
              on_piece: Callable[[Piece], None]) -> "RayPending":
        """The pieces go out in the background (dispatch.Dispatcher.start): whenever
        the dispatch loop runs, beside meta-training's chunks."""
        tag = uuid.uuid4().hex[:8]
        refs = {init.name: (f"{init.name}-{tag}", ray.put(init_frame(init, self.job.frozen)))
                for init in inits}
        work = PieceWork(refs)
        self.last = work
        curves: dict[Piece, np.ndarray] = {}

        def on_result(handle: Any, piece: Piece, result_ref: Any, timings: dict) -> None:
            # a piece is queued again only when its result is lost: each arrives once
            curves[piece] = np.asarray(ray.get(result_ref))
            on_piece(piece)

        batch = self.dispatcher.start(deque(todo), on_result, work)
        return RayPending(self.dispatcher, batch, curves)

    def run(self, inits: list[Init], todo: list[Piece],
            on_piece: Callable[[Piece], None]) -> dict[Piece, np.ndarray]:
        return self.start(inits, todo, on_piece).wait()

    def finetune(self, init: Init, shots: int, target: float | None,
                 on_step: Callable[[int, int, float], None]) -> dict[str, Any]:
        """Finetune.run with each scored step's segments spread over the workers (the
        pieces' states travel as wire frames, so any worker takes any piece)."""
        name = f"{init.name}-{uuid.uuid4().hex[:8]}"
        work = FinetuneWork({init.name: (name, ray.put(init_frame(init, self.job.frozen)))},
                            init.name, shots)
        self.last_finetune = work
        point = itertools.count()  # the scored step a call is for: keys stay unique

        def advance_all(requests: list[Request]) -> list[tuple[State, np.ndarray]]:
            at = next(point)
            work.requests = {(at, start): (start, count, encode(state, 0), steps)
                             for start, count, state, steps in requests}
            out: dict[tuple[int, int], tuple[State, np.ndarray]] = {}

            def on_result(handle: Any, key: tuple[int, int], result_ref: Any,
                          timings: dict) -> None:
                frame, metric = ray.get(result_ref)
                out[key] = (decode(frame, declared_spec(frame)).tree, np.asarray(metric))

            self.dispatcher.loop(deque(work.requests), on_result, work)
            return [out[key] for key in work.requests]

        return Finetune(self.job).run(init, shots, target, on_step, advance_all)

    def stats(self) -> dict[str, Any]:
        if self.last is None:
            return {}
        out = {**self.last.counters, "per_worker": dict(self.last.per_worker)}
        if self.last_finetune is not None:
            work = self.last_finetune
            out["finetune"] = {**work.counters, "per_worker": dict(work.per_worker)}
        return out


class RayPending:
    """An evaluate.Pending: pieces out on the workers."""

    def __init__(self, dispatcher: Dispatcher, batch: Batch, curves: dict[Piece, np.ndarray]):
        self.dispatcher, self.batch, self.curves = dispatcher, batch, curves

    def ready(self) -> bool:
        return self.batch.finished()

    def wait(self) -> dict[Piece, np.ndarray]:
        self.dispatcher.drain(self.batch)
        return self.curves
