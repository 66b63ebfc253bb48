"""The parameter server: holds the meta-parameters, the outer-optimizer state and a
version number, and applies outer updates from the gradients workers send.

A plain class; the driver runs it as a Ray actor on its own node (it writes the run's
checkpoints). Results are keyed by (iteration, first task index of the chunk), so each
is counted exactly once however often a chunk was dispatched.

sync:  a meta-iteration's chunks are collected, then summed in task-index order
       (chunk mean x chunk size), divided by the meta-batch and applied as one update:
       the same bits whichever worker computed which chunk.
async: each chunk's mean gradient is applied when it arrives if the meta-parameters
       moved at most ``staleness`` versions since its worker read them; older results
       are dropped and counted.
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

from metapeft_dist.algorithms.outer import make_optimizer, meta_holder, outer_update
from metapeft_dist.config import from_dict
from metapeft_dist.runtime.checkpoint import load_checkpoint, save_checkpoint
from metapeft_dist.wire import WireError, declared_spec, decode, encode


class ParameterServer:
    def __init__(self, spec: dict[str, Any], meta_frame: bytes, frozen_frame: bytes,
                 total_updates: int, resume_from: str | None = None,
                 files: dict[str, bytes] | None = None):
        """``meta_frame`` / ``frozen_frame``: the initial meta-parameters and the frozen
        base as wire frames from the driver, which also fix the tree every worker's
        gradient must match. ``files``: the job's task files (``Job.files``), which
        workers fetch with the frozen base (:meth:`job_assets`)."""
        self.spec = from_dict(spec)
        self._assets = (frozen_frame, files)
        self.tree_spec = declared_spec(meta_frame)
        self.meta = decode(meta_frame, self.tree_spec).tree
        self.frozen = decode(frozen_frame, declared_spec(frozen_frame)).tree.get("frozen", {})
        self.optimizer = make_optimizer(self.spec.outer, total_updates)
        self.optimizer.init(self.meta)
        self.version = 0
        if resume_from is not None:
            ck = load_checkpoint(resume_from)
            self.meta, self.version = ck.meta, ck.info.get("version", ck.iteration)
            self.optimizer.state = ck.optimizer_state
        self._apply_update = self._make_update()
        runtime = self.spec.runtime
        self.mode = runtime.mode
        self.staleness_bound = runtime.staleness
        self.meta_batch = self.spec.algorithm.meta_batch
        self.chunk_starts = tuple(range(0, self.meta_batch, runtime.chunk))
        self.pending: dict[int, tuple[int, Any, float]] = {}  # sync: start -> (n, grad, loss)
        self.seen: set[tuple[int, int]] = set()  # async: (iteration, start) applied/dropped
        self.stats: dict[str, Any] = {"accepted": 0, "duplicates": 0, "late": 0,
                                      "applied": 0, "dropped": 0, "produced": 0,
                                      "rejected": 0, "update_seconds": [],
                                      "applied_staleness": []}
        self._frame: tuple[int, bytes] | None = None

    # --- reading ------------------------------------------------------------------------

    def meta_frame(self) -> bytes:
        """The current meta-parameters as a wire frame (cached per version)."""
        if self._frame is None or self._frame[0] != self.version:
            self._frame = (self.version, encode(self.meta, self.version))
        return self._frame[1]

    def job_assets(self) -> tuple[bytes, dict[str, bytes] | None]:
        """What a worker builds the job on besides its spec: the frozen base as a wire
        frame, and the task files (None unless the family reads files)."""
        return self._assets

    def get_version(self) -> int:
        return self.version

    def get_stats(self) -> dict[str, Any]:
        return {**self.stats, "version": self.version}

    # --- sync ---------------------------------------------------------------------------

    def submit(self, iteration: int, start: int, frame: bytes) -> str:
        """Store one chunk's result for the current iteration.

        Returns "accepted", "duplicate" (this chunk is already here), "late" (for an
        iteration already applied) or "rejected: <why>" (a malformed frame).
        """
        if iteration < self.version:
            self.stats["late"] += 1
            return "late"
        if start in self.pending:
            self.stats["duplicates"] += 1
            return "duplicate"
        try:
            received = self._decode(frame, iteration, start)
            if received.version != self.version or iteration != self.version:
                raise WireError(f"result for iteration {iteration} computed from version "
                                f"{received.version}; this is version {self.version}")
        except WireError as err:
            self.stats["rejected"] += 1
            return f"rejected: {err}"
        self.pending[start] = (received.header["count"], received.tree, received.header["loss"])
        self.stats["accepted"] += 1
        self.stats["produced"] += 1
        return "accepted"

    def apply(self, iteration: int) -> dict[str, Any]:
        """Sum the iteration's chunks in task order, apply one outer update."""
        missing = [s for s in self.chunk_starts if s not in self.pending]
        if iteration != self.version or missing:
            raise RuntimeError(f"cannot apply iteration {iteration} at version "
                               f"{self.version}; chunks missing: {missing}")
        t0 = time.perf_counter()
        total = loss = None
        for start in self.chunk_starts:  # fixed order: the same bits for any worker count
            n, grad, chunk_loss = self.pending[start]
            weighted = tree_map(lambda g, n=n: g * n, grad)
            total = weighted if total is None else tree_map(lambda a, b: a + b, total, weighted)
            loss = chunk_loss * n if loss is None else loss + chunk_loss * n
        mean = tree_map(lambda g: g / self.meta_batch, total)
        norm = self._update(mean)
        self.pending.clear()
        seconds = time.perf_counter() - t0
        self.stats["update_seconds"].append(seconds)
        self.stats["applied"] += 1
        return {"version": self.version, "loss": loss / self.meta_batch, "grad_norm": norm,
                "update_seconds": seconds}

    def apply_and_frame(self, iteration: int) -> tuple[dict[str, Any], bytes]:
        """:meth:`apply`, and the new meta-parameters' frame for the next iteration (one
        round trip for the driver instead of two)."""
        return self.apply(iteration), self.meta_frame()

    # --- async --------------------------------------------------------------------------

    def submit_async(self, iteration: int, start: int, frame: bytes) -> dict[str, Any]:
        """Apply one chunk's gradient now if it is fresh enough, else drop it."""
        key = (iteration, start)
        if key in self.seen:
            self.stats["duplicates"] += 1
            return {"status": "duplicate", "version": self.version}
        try:
            received = self._decode(frame, iteration, start)
            if received.version > self.version:
                raise WireError(f"result claims version {received.version}, newer than "
                                f"{self.version}")
        except WireError as err:
            self.stats["rejected"] += 1
            return {"status": f"rejected: {err}", "version": self.version}
        self.seen.add(key)
        self.stats["produced"] += 1
        staleness = self.version - received.version
        if staleness > self.staleness_bound:
            self.stats["dropped"] += 1
            return {"status": "dropped", "staleness": staleness, "version": self.version}
        t0 = time.perf_counter()
        norm = self._update(received.tree)
        seconds = time.perf_counter() - t0
        self.stats["update_seconds"].append(seconds)
        self.stats["applied"] += 1
        self.stats["applied_staleness"].append(staleness)
        return {"status": "applied", "staleness": staleness, "version": self.version,
                "loss": received.header["loss"], "grad_norm": norm, "update_seconds": seconds}

    # --- checkpoints --------------------------------------------------------------------

    def checkpoint(self, path: str, iteration: int, info: dict[str, Any],
                   best_frame: bytes | None = None) -> str:
        """Write (atomically) the state after meta-iteration ``iteration``; the version
        (outer updates applied, fewer than iterations in async mode) goes in the info."""
        best = decode(best_frame, self.tree_spec).tree if best_frame is not None else None
        save_checkpoint(path, iteration, self.meta, self.optimizer.state, self.frozen,
                        {**info, "version": self.version}, best)
        return path

    # --- internals ----------------------------------------------------------------------

    def _decode(self, frame: bytes, iteration: int, start: int):
        received = decode(frame, self.tree_spec)
        h = received.header
        if h.get("iteration") != iteration or h.get("start") != start:
            raise WireError(f"frame is for task ({h.get('iteration')}, {h.get('start')}), "
                            f"submitted as ({iteration}, {start})")
        count = h.get("count")
        if not isinstance(count, int) or not 1 <= count <= self.meta_batch:
            raise WireError(f"frame task count {count!r} is not in 1..{self.meta_batch}")
        if not isinstance(h.get("loss"), float):
            raise WireError("frame header lacks the chunk's float loss")
        return received

    def _make_update(self):
        """outer_step as one compiled graph (run.compile) over the captured state."""
        holder = meta_holder(self.meta)
        return holder, outer_update(self.optimizer, holder, self.spec.outer.clip_norm,
                                    self.spec.run.compile)

    def _update(self, grad) -> float:
        holder, update = self._apply_update
        norm = update(grad)
        mx.eval(norm, holder, self.optimizer.state)
        # New containers: the next compiled call overwrites the holder's leaves in place.
        self.meta = tree_map(lambda a: a, holder["meta"])
        self.version += 1
        return norm.item()
