"""The two protocols a meta-iteration follows on the Ray runtime.

sync: every chunk of iteration t is computed at meta-parameter version t; the parameter
server applies one update when it holds every chunk, summed in chunk order, so the run
is bitwise the same for any number of workers and any faults. A chunk whose result went
missing before it reached the server is redone, and the update waits for it.

async: chunks flow across iteration boundaries, each computed at whatever version is
current when it is dispatched; the server applies each chunk as it arrives, or drops it
when it is more than ``runtime.staleness`` versions old (param_server.py).
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import ray

from metapeft_dist.metrics import JobMetrics
from metapeft_dist.runtime.dispatch import Dispatcher
from metapeft_dist.runtime.pool import LOST


class SyncStepper:
    def __init__(self, dispatcher: Dispatcher, chunks: list[tuple[int, int]],
                 metrics: JobMetrics):
        self.dispatcher, self.chunks, self.metrics = dispatcher, chunks, metrics
        self.ps = dispatcher.ps

    def step(self, iteration: int) -> tuple[float, float]:
        """One meta-iteration: (mean query loss after adaptation, gradient norm)."""
        d = self.dispatcher
        if iteration != d.version:
            raise RuntimeError(f"sync step {iteration} at parameter-server version "
                               f"{d.version}")
        todo = deque((iteration, s, n) for s, n in self.chunks)
        accepted: set[int] = set()
        submitted: dict[Any, tuple[int, int, int]] = {}  # ps.submit ref -> chunk

        def on_result(handle, key, frame_ref, timings):
            # Not waited for here: the parameter server takes results in the order they
            # are sent, and all are checked before the update is applied.
            submitted[self.ps.submit.remote(iteration, key[1], frame_ref)] = key

        while len(accepted) < len(self.chunks):
            d.loop(todo, on_result)
            # Queued behind the submits (an actor runs calls in order): applies the update
            # as soon as the last result is in, and returns the next meta-parameters.
            applied, frame_ref = self.ps.apply_and_frame.options(num_returns=2).remote(
                iteration)
            for ref, key in list(submitted.items()):
                del submitted[ref]
                try:
                    status = ray.get(ref)
                except LOST as err:  # the result object went with its node
                    d.lost(None, err, key)
                    todo.append(key)
                    continue
                if status == "accepted":
                    accepted.add(key[1])
                elif status == "duplicate":
                    d.ledger.counters["duplicates"] += 1
                else:
                    raise RuntimeError(f"parameter server refused chunk {key}: {status}")
            if len(accepted) < len(self.chunks):  # the update found chunks missing: redo them
                with contextlib.suppress(ray.exceptions.RayTaskError):
                    ray.get(applied)
        out = ray.get(applied)
        d.at_version(out["version"], frame_ref)
        self.metrics.update_applied(out["version"], out["update_seconds"])
        return out["loss"], out["grad_norm"]


class AsyncStepper:
    def __init__(self, dispatcher: Dispatcher, chunks: list[tuple[int, int]],
                 metrics: JobMetrics, start_iteration: int, iterations: int):
        self.dispatcher, self.metrics = dispatcher, metrics
        self.ps = dispatcher.ps
        self.queue: deque = deque((it, s, n) for it in range(start_iteration, iterations)
                                  for s, n in chunks)
        self.left = {it: len(chunks) for it in range(start_iteration, iterations)}
        self.losses: dict[int, list[tuple[float, float]]] = {}

    def step(self, iteration: int) -> tuple[float, float]:
        """Run chunks until every chunk of iterations up to ``iteration`` is applied or
        dropped: (mean query loss, mean gradient norm) of its applied chunks, NaN when
        all were dropped."""
        d = self.dispatcher

        def on_result(handle, key, frame_ref, timings):
            it, start, _ = key
            out = ray.get(self.ps.submit_async.remote(it, start, frame_ref))
            if out["status"] == "duplicate":
                d.ledger.counters["duplicates"] += 1
                return
            if out["status"].startswith("rejected"):
                raise RuntimeError(f"parameter server refused chunk {key}: {out['status']}")
            d.at_version(out["version"])
            self.left[it] -= 1
            if out["status"] == "applied":
                self.losses.setdefault(it, []).append((out["loss"], out["grad_norm"]))
                self.metrics.update_applied(out["version"], out["update_seconds"],
                                            out["staleness"])
            else:
                self.metrics.update_dropped(out["staleness"])

        d.loop(self.queue, on_result,
               finished=lambda: all(n == 0 for i, n in self.left.items() if i <= iteration))
        losses = self.losses.pop(iteration, [])
        if not losses:
            return float("nan"), float("nan")
        return (sum(loss for loss, _ in losses) / len(losses),
                sum(norm for _, norm in losses) / len(losses))
