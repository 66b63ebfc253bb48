"""An MLX worker: builds the job once (task family, model, and the frozen base the
driver sends), then turns (meta-parameters, a chunk of task keys) into the chunk's mean
outer gradient.

A plain class; the driver runs one per machine as a Ray actor pinned by the ``mlx``
custom resource. The frozen base and a JSONL family's task files arrive once, at the
start; then only task keys arrive (the worker samples the tasks itself) and only the
trainable meta-parameters travel, as wire frames, in both directions.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Hashable

import mlx.core as mx

import metapeft_dist  # noqa: F401  (OpenBLAS before mlx)
from metapeft_dist.blas import machine_kind
from metapeft_dist.config import from_dict
from metapeft_dist.cost import read_energy_joules
from metapeft_dist.evaluate import LocalScorer
from metapeft_dist.finetune import Finetune
from metapeft_dist.job import Init, build_job, read_init_frame
from metapeft_dist.sweeps import Sweep
from metapeft_dist.wire import TreeSpec, declared_spec, decode, encode


KEEP_INITS = 8  # evaluation inits a worker holds: a final evaluation's, the latest others


class Worker:
    def __init__(self, spec: dict[str, Any], frozen_frame: bytes | None = None,
                 files: dict[str, bytes] | None = None, imported_at: float | None = None):
        """``frozen_frame``: the driver's frozen base (``Job.stored_frozen`` as a wire
        frame), so the worker does not pretrain it again nor read the run directory of
        ``algorithm.hyper.init``; without it the worker builds everything from the spec.
        ``files``: the task files the driver's job was built from (``Job.files``), parsed
        from memory, so they need not exist on this machine and nothing is written to
        its disk (a worker killed by Ray leaves no copy of a user's texts behind).
        ``imported_at``: when its process had imported what it runs (by default, now)."""
        t0 = time.perf_counter()
        self.imported_at = time.time() if imported_at is None else imported_at
        self.spec = from_dict(spec)
        self.job = build_job(self.spec, frozen_frame, files)
        self.tree_spec = TreeSpec.of(self.job.initial_meta)
        self.loss_fn = self.job.loss_fn()
        self._meta: tuple[int, Any] | None = None
        self._inits: dict[str, Init] = {}  # evaluation inits by the driver's id
        self._scorer: LocalScorer | None = None  # built at the first piece
        self._finetune: Finetune | None = None  # likewise, at the first fine-tune piece
        self._steps: dict[Hashable, Callable] = {}
        self.node_id = self.node_identity()["id"]  # fixed for the life of the process
        self.kind = machine_kind()  # what decides the bits of its results
        self.setup_seconds = time.perf_counter() - t0
        self.built_at = time.time()

    def node_identity(self) -> dict[str, str]:
        """Which machine this worker runs on: ``id`` tells nodes apart (the Ray worker
        uses Ray's node id), ``host`` and ``ip`` name it."""
        host = platform.node()
        return {"id": host, "host": host, "ip": ""}

    def ping(self) -> dict[str, Any]:
        """Who answers, and when (``time``); when its process had imported what it runs
        (``imported_at``) and when its job was built (``built_at``), by its own clock."""
        return {**self.node_identity(), "pid": os.getpid(), "kind": self.kind,
                "setup_seconds": self.setup_seconds, "energy_joules": read_energy_joules(),
                "time": time.time(), "imported_at": self.imported_at,
                "built_at": self.built_at}

    def _grad_fn(self, phase: Hashable) -> Callable:
        if phase not in self._steps:
            algorithm, loss_fn = self.job.algorithm, self.loss_fn
            vmap = self.spec.run.batching == "vmap"

            def chunk_grad(meta, batch, inputs):
                return algorithm.batch_grad(meta, loss_fn, batch, inputs, phase, vmap)

            self._steps[phase] = mx.compile(chunk_grad) if self.spec.run.compile else chunk_grad
        return self._steps[phase]

    def has_version(self, version: int) -> bool:
        """Whether the meta-parameters of ``version`` are already here."""
        return self._meta is not None and self._meta[0] == version

    def run(self, version: int, meta_frame: bytes | None, iteration: int, start: int,
            count: int) -> tuple[dict[str, Any], bytes]:
        """Tasks (iteration, start .. start + count - 1) adapted from ``version``.

        ``meta_frame`` carries the meta-parameters of ``version``; it may be None when
        :meth:`has_version`. Returns (timings, a frame with the chunk's mean outer
        gradient whose header carries iteration, start, count and the mean query loss).
        """
        started = time.time()
        t0 = time.perf_counter()
        if not self.has_version(version):
            if meta_frame is None:
                raise ValueError(f"meta-parameters of version {version} were not sent")
            received = decode(meta_frame, self.tree_spec)
            if received.version != version:
                raise ValueError(f"frame carries version {received.version}, not {version}")
            self._meta = (received.version, received.tree)
        t1 = time.perf_counter()
        batch = self.job.batch(iteration, range(start, start + count))
        t2 = time.perf_counter()
        algorithm = self.job.algorithm
        grad, loss = self._grad_fn(algorithm.phase(iteration))(
            self._meta[1], batch, algorithm.step_inputs(iteration))
        mx.eval(grad, loss)
        t3 = time.perf_counter()
        frame = encode(grad, version, {"iteration": iteration, "start": start, "count": count,
                                       "loss": float(loss.item())})
        t4 = time.perf_counter()
        timings = {"decode_seconds": t1 - t0, "sample_seconds": t2 - t1,
                   "compute_seconds": t3 - t2, "encode_seconds": t4 - t3,
                   "seconds": t4 - t0, "started": started, "ended": started + (t4 - t0),
                   "bytes_in": len(meta_frame) if meta_frame is not None else 0,
                   "bytes_out": len(frame),
                   "host": platform.node(), "pid": os.getpid(),
                   "node_id": self.node_id, "kind": self.kind,
                   "energy_joules": read_energy_joules()}
        return timings, frame

    def has_init(self, init_id: str) -> bool:
        return init_id in self._inits

    def evaluate(self, init_id: str, init_frame: bytes | None, shots: int, start: int,
                 count: int, sweep: str | Sweep = "test") -> tuple[dict[str, Any], Any]:
        """Curves of the tasks ``start .. start+count-1`` at ``shots`` of ``sweep``
        (sweeps.Piece) from the init the driver calls ``init_id``
        (evaluate.LocalScorer.piece: the same bits as the driver's own evaluation).
        ``init_frame`` (job.init_frame) may be None when :meth:`has_init`; the
        KEEP_INITS latest inits are kept."""
        started = time.time()
        t0 = time.perf_counter()
        init = self._init(init_id, init_frame)
        if self._scorer is None:
            self._scorer = LocalScorer(self.job)
        curves = self._scorer.piece(init, shots, start, count, sweep)
        return self._timings(started, t0, init_frame), curves

    def finetune(self, init_id: str, init_frame: bytes | None, shots: int, start: int,
                 count: int, state_frame: bytes, steps: int) -> tuple[dict[str, Any], Any]:
        """A piece of the standard init's fine-tune (finetune.Finetune.advance): the
        tasks ``start .. start+count-1`` at ``shots``, ``steps`` more Adam steps from
        the state in ``state_frame``; returns (timings, (the new state's frame, each
        task's query metric)). The driver holds the state between steps, so any worker
        can take a piece's next segment, and a lost one is sent again as it was."""
        started = time.time()
        t0 = time.perf_counter()
        init = self._init(init_id, init_frame)
        if self._finetune is None:
            self._finetune = Finetune(self.job)
        state = decode(state_frame, declared_spec(state_frame)).tree
        state, metric = self._finetune.advance(init, shots, start, count, state, steps)
        return self._timings(started, t0, init_frame), (encode(state, 0), metric)

    def _init(self, init_id: str, init_frame: bytes | None) -> Init:
        """The evaluation init the driver calls ``init_id`` (read from ``init_frame``
        when it is new here; the KEEP_INITS latest are kept)."""
        if init_id not in self._inits:
            if init_frame is None:
                raise ValueError(f"evaluation init {init_id} was not sent")
            self._inits[init_id] = read_init_frame(init_frame, self.job.frozen)
            while len(self._inits) > KEEP_INITS:  # a meta-validation's inits, one by one
                del self._inits[next(iter(self._inits))]
        return self._inits[init_id]

    def _timings(self, started: float, t0: float, init_frame: bytes | None) -> dict[str, Any]:
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "compute_seconds": seconds, "started": started,
                "ended": started + seconds, "host": platform.node(), "pid": os.getpid(),
                "node_id": self.node_id, "kind": self.kind,
                "bytes_in": len(init_frame) if init_frame is not None else 0}

