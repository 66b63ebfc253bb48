"""The Ray driver: connects to (or starts) a Ray cluster, runs the parameter server and
one MLX worker per `mlx` resource, and executes meta-iterations on them.

Per meta-iteration it cuts the meta-batch into chunks at fixed task boundaries, keeps
each worker's queue two chunks deep, refilling it as chunks finish (``ray.wait``, so
faster machines take more), and passes each result on to the parameter server. Only
task keys go out, and only trainable meta-parameters travel, as wire frames.

Faults: a worker (or its node) that dies mid-chunk loses only that chunk, which goes to
another worker; the parameter server counts each (iteration, chunk) once. Workers are
restarted by Ray (``max_restarts=-1``) and rejoin when a ping answers, e.g. when their
node comes back. New `mlx` capacity (a machine added) gets a new worker.

:class:`RayExecutor` offers the same ``step`` / ``snapshot`` / ``checkpoint`` interface
as the in-process :class:`metapeft_dist.trainer.MetaTrainer`; ``runner.py`` drives both.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
import uuid
from collections import deque
from typing import Any, Callable

import ray
from ray.exceptions import (
    ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError, RayActorError,
    WorkerCrashedError)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from metapeft_dist.cost import SpendMeter
from metapeft_dist.job import Job
from metapeft_dist.metrics import JobMetrics, NoMetrics, Throughput
from metapeft_dist.runtime.param_server import ParameterServer
from metapeft_dist.runtime.worker import Worker
from metapeft_dist.tree import Meta
from metapeft_dist.wire import TreeSpec, decode, encode

# A worker or its node is gone (maybe for good, maybe restarting), or the result object
# went with it: the chunk is redone elsewhere.
LOST = (RayActorError, ActorUnavailableError, WorkerCrashedError, ObjectLostError,
        OwnerDiedError)
# Results up to this size travel inline with the task reply instead of through the
# shared-memory object store; a chunk's LoRA gradient (~120 KB) is just over Ray's 100 KB
# default, and inlining it halves the idle gap between a worker's chunks here. Set for
# the embedded Ray; a cluster sets it with `ray start --system-config` (cluster/).
INLINE_RESULT_BYTES = 1 << 20
WAIT_SECONDS = 0.5
START_SECONDS = 60.0  # how long a run waits for its first workers before it begins
# Chunks queued per worker: with two, a worker starts its next chunk the moment it
# finishes one instead of idling while the driver round-trips.
SLOTS_PER_WORKER = 2
PING_RETRY_SECONDS = 1.0
SCALE_CHECK_SECONDS = 5.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this job (unreachable, no `mlx` workers, or none of
    them could build the job)."""


def setup_failure(err: BaseException) -> str | None:
    """What a worker's constructor raised, as ``Name: message`` (the last line of the
    traceback Ray carries), when that is why the worker died; None for any other loss.
    Ray does not restart such a worker: the node lacks something the job needs (a
    ``family.path`` directory, a ``model.path``, a package)."""
    if not (isinstance(err, ActorDiedError) and err.actor_init_failed):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    name, colon, message = last.partition(": ")
    return f"{name.rsplit('.', 1)[-1]}{colon}{message}"


class StallError(RuntimeError):
    """No task result arrived for ``runtime.stall_timeout`` seconds."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one clear line, when nothing listens at ``host:port``."""
    import socket

    if address == "auto" or "://" in address:
        return  # ray resolves these itself
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} must look like HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: "
                           f"{err.strerror or err}") from None


def default_local_workers() -> int:
    """Workers on the embedded local Ray: one per core on Linux (MLX on the CPU, one
    BLAS thread each); one on macOS, where MLX runs on the machine's single GPU."""
    return 1 if sys.platform == "darwin" else max(1, os.cpu_count() or 1)


def connect(address: str | None, workers: int | None) -> bool:
    """Join the cluster at ``address``, or start an embedded local Ray with ``workers``
    `mlx` resources. Returns True when this call started Ray (and must stop it).

    An already initialized Ray (a test's cluster, a notebook) is used as it is.
    """
    if ray.is_initialized():
        return False
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except Exception as err:  # ray raises ConnectionError, RuntimeError, ValueError ...
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {err}") from None
        return False
    ray.init(num_cpus=max(1, os.cpu_count() or 1),
             resources={"mlx": workers or default_local_workers()},
             include_dashboard=False, logging_level="WARNING", log_to_driver=True,
             _system_config={"max_direct_call_object_size": INLINE_RESULT_BYTES})
    return True


class RayWorker(Worker):
    """The worker as a Ray actor. The meta-parameter frame comes as an object ref in a
    list, which Ray leaves unresolved: it is fetched only when its version is new here,
    not for every chunk of an iteration."""

    def __init__(self, spec: dict[str, Any], ps_name: str):
        """The frozen base and the task files come from the parameter server (the actor
        named ``ps_name``), asked each time Ray (re)starts the actor, not as constructor
        arguments: Ray does not protect constructor arguments in the object store, an
        actor handle among them, for an actor's restarts (and logs an error for every
        such actor, ray#53727)."""
        ps = ray.get_actor(ps_name)
        frozen_frame, files = ray.get(ps.job_assets.remote())
        super().__init__(spec, frozen_frame, files)

    def node_identity(self) -> dict[str, str]:
        return {"id": ray.get_runtime_context().get_node_id(), "host": platform.node(),
                "ip": ray.util.get_node_ip_address()}

    def run_ref(self, version: int, meta_box: list, iteration: int, start: int,
                count: int) -> tuple[dict[str, Any], bytes]:
        frame = None if self.has_version(version) else ray.get(meta_box[0])
        return self.run(version, frame, iteration, start, count)


class RayExecutor:
    def __init__(self, job: Job, address: str | None = None, resume_path: str | None = None,
                 start_iteration: int = 0, log: Callable[[str], None] = lambda m: None,
                 metrics: JobMetrics | None = None, spend: SpendMeter | None = None):
        self.job = job
        self.metrics = metrics if metrics is not None else NoMetrics()
        self.spend = spend if spend is not None else SpendMeter({})
        self.spec = job.spec
        self.runtime = job.spec.runtime
        self.log = log
        self.embedded = connect(address, self.runtime.workers)
        self.tree_spec = TreeSpec.of(job.initial_meta)
        a = self.spec.algorithm
        chunk = self.runtime.chunk
        self.chunks = [(s, min(chunk, a.meta_batch - s)) for s in range(0, a.meta_batch, chunk)]
        total = a.iterations * (1 if self.runtime.mode == "sync" else len(self.chunks))
        here = ray.get_runtime_context().get_node_id()
        # named, so a worker finds it by a string (see RayWorker)
        self.ps_name = f"metapeft-parameter-server-{uuid.uuid4().hex[:12]}"
        ServerActor = ray.remote(ParameterServer).options(
            name=self.ps_name, num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
        # every worker builds its job on the frozen base and task files the parameter
        # server hands out (and needs no files of this machine)
        self.ps = ServerActor.remote(self.spec.to_dict(), encode(job.initial_meta, 0),
                                     encode({"frozen": job.stored_frozen()}, 0), total,
                                     resume_path, job.files)
        self.version = ray.get(self.ps.get_version.remote())
        self._worker_class = ray.remote(RayWorker).options(
            num_cpus=0, resources={"mlx": 1}, max_restarts=-1, max_task_retries=0)
        self.workers: list[Any] = []
        self.slots: deque = deque()  # a handle per chunk it can take now
        self.pings: dict[Any, Any] = {}  # ping ref -> worker handle (starting or recovering)
        self.retry_at: dict[Any, float] = {}  # recovering handle -> when to ping again
        self.failed_setup: dict[Any, str] = {}  # handle -> why its constructor failed
        # Nodes: Ray node id -> label (its host name, numbered when several nodes share
        # one, as on a test cluster), and the workers answering on each.
        self.node_labels: dict[str, str] = {}
        self.node_of: dict[Any, str] = {}  # worker handle -> node label, once it answered
        self.live_on: dict[str, set] = {}
        self.created_at: dict[Any, float] = {}  # worker handle -> when it was started
        self.kinds: dict[str, int] = {}  # machine kind (blas.machine_kind) -> chunks done
        wanted = self.runtime.workers or self._mlx_capacity()
        if wanted < 1:
            raise ClusterError("the Ray cluster declares no `mlx` resource: start each node "
                               "with ray start --resources='{\"mlx\": 1}'")
        for _ in range(wanted):
            self._add_worker()
        # Start together: wait (at most START_SECONDS) for the first workers to answer, so
        # the work is spread from the first iteration rather than all going to whichever
        # imported MLX first on a loaded machine; a slower worker still joins later.
        ray.wait(list(self.pings), num_returns=len(self.pings),
                 timeout=min(START_SECONDS, self.runtime.stall_timeout))
        self.counters = {"dispatched": 0, "completed": 0, "lost": 0, "duplicates": 0,
                         "tasks_completed": 0, "tasks_lost": 0}
        self.throughput = Throughput()
        self.task_seconds: list[float] = []
        self.per_host: dict[str, dict[str, Any]] = {}
        self.bytes_out: list[int] = []
        self.bytes_in: list[int] = []
        self.spans: list[tuple[str, float, float]] = []  # (worker, started, ended) per chunk
        # async mode: chunks flow across iteration boundaries
        self._async_queue: deque = deque((it, s, n) for it in range(start_iteration, a.iterations)
                                         for s, n in self.chunks)
        self._async_left = {it: len(self.chunks) for it in range(start_iteration, a.iterations)}
        self._async_losses: dict[int, list[tuple[float, float]]] = {}
        # timings ref -> (worker, chunk key, result frame ref, when dispatched)
        self._inflight: dict[Any, tuple[Any, tuple[int, int, int], Any, float]] = {}
        self._meta_ref: tuple[int, Any] | None = None
        self._next_scale_check = time.monotonic() + SCALE_CHECK_SECONDS

    # --- workers ------------------------------------------------------------------------

    def _mlx_capacity(self) -> int:
        return int(ray.cluster_resources().get("mlx", 0))

    def _add_worker(self) -> None:
        handle = self._worker_class.remote(self.spec.to_dict(), self.ps_name)
        self.workers.append(handle)
        self.created_at[handle] = time.time()
        self.pings[handle.ping.remote()] = handle

    def _scale_out(self) -> None:
        """A worker for each `mlx` resource that joined the cluster since the start
        (checked every SCALE_CHECK_SECONDS)."""
        now = time.monotonic()
        if now < self._next_scale_check:
            return
        self._next_scale_check = now + SCALE_CHECK_SECONDS
        if self.runtime.workers is None:
            for _ in range(self._mlx_capacity() - len(self.workers)):
                self.log("a new `mlx` resource joined the cluster: starting a worker")
                self._add_worker()

    def _node_label(self, identity: dict[str, Any]) -> str:
        node_id = identity["id"]
        if node_id not in self.node_labels:
            taken = set(self.node_labels.values())
            label, n = identity["host"], 1
            while label in taken:
                n += 1
                label = f"{identity['host']}-{n}"
            self.node_labels[node_id] = label
            self.spend.add_node(label, [identity.get("ip", "")])
        return self.node_labels[node_id]

    def _worker_up(self, handle: Any, identity: dict[str, Any]) -> None:
        """A worker answered: its node is held by the job (reserved) from when the
        worker was started (its setup is part of the cost) or, after a loss, from now."""
        node = self._node_label(identity)
        self.node_of[handle] = node
        if not self.live_on.get(node):
            self.spend.reserve(node, self.created_at.pop(handle, None))
        self.live_on.setdefault(node, set()).add(handle)
        kind = identity.get("kind", "unknown")
        if kind not in self.kinds and self.kinds and self.runtime.mode == "sync":
            kinds = "; ".join(sorted({*self.kinds, kind}))
            self.log(f"workers run on {len(self.kinds) + 1} machine kinds ({kinds}): sync "
                     "results are bitwise reproducible on one kind only; across kinds they "
                     "agree to float32 rounding (README, Determinism)")
        self.kinds.setdefault(kind, 0)
        self.spend.power_reading(node, identity.get("energy_joules"),
                                 identity.get("time", time.time()))

    def _worker_down(self, handle: Any) -> None:
        """A worker stopped answering: its node is released when it was the last one."""
        node = self.node_of.get(handle)
        if node is None or handle not in self.live_on.get(node, ()):
            return
        self.live_on[node].discard(handle)
        if not self.live_on[node]:
            self.spend.release(node)

    def _lost(self, handle: Any | None, err: BaseException, key: tuple[int, int, int]) -> None:
        """A chunk was lost with its worker (``handle``, to be pinged until it answers
        again) or, with ``handle`` None, its result object was."""
        self.counters["lost"] += 1
        self.counters["tasks_lost"] += key[2]
        self.metrics.chunk_lost(self.node_of.get(handle), key[2])
        self.log(f"a chunk was lost ({type(err).__name__}); it goes to another worker")
        if handle is not None:
            self._worker_down(handle)
            self.retry_at[handle] = time.monotonic()

    def _setup_failed(self, handle: Any, failure: str) -> None:
        """A worker could not build the job: it is not pinged again; the job goes on
        with the others, or ends with the reason when none is left."""
        self.failed_setup[handle] = failure
        self.log(f"a worker could not start: {failure}")
        self.metrics.workers(self._answering(), len(self.failed_setup))
        if len(self.failed_setup) == len(self.workers):
            raise ClusterError(f"no MLX worker could start the job: {failure}")

    def _ping_recovering(self) -> None:
        now = time.monotonic()
        for handle, when in list(self.retry_at.items()):
            if when <= now:
                del self.retry_at[handle]
                self.pings[handle.ping.remote()] = handle

    # --- dispatch -----------------------------------------------------------------------

    def _meta(self) -> Any:
        """An object ref of the current meta-parameter frame (one fetch per version)."""
        if self._meta_ref is None or self._meta_ref[0] != self.version:
            self._meta_ref = (self.version, self.ps.meta_frame.remote())
        return self._meta_ref[1]

    def _dispatch(self, handle: Any, key: tuple[int, int, int]) -> None:
        iteration, start, count = key
        timings_ref, frame_ref = handle.run_ref.options(num_returns=2).remote(
            self.version, [self._meta()], iteration, start, count)
        self._inflight[timings_ref] = (handle, key, frame_ref, time.monotonic())
        self.counters["dispatched"] += 1

    def _wait(self) -> tuple[list[tuple[Any, tuple[int, int, int], Any, dict]], list]:
        """Wait (at most WAIT_SECONDS) for chunks and pings to finish. Returns the
        finished chunks as (handle, key, frame_ref, timings) and the keys of lost ones."""
        self._ping_recovering()
        refs = list(self._inflight) + list(self.pings)
        if not refs:
            time.sleep(WAIT_SECONDS)
            return [], []
        ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS)
        if ready:  # take everything else that is already done too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done, lost = [], []
        for ref in ready:
            if ref in self.pings:
                handle = self.pings.pop(ref)
                try:
                    self._worker_up(handle, ray.get(ref))
                    self.slots.extend([handle] * SLOTS_PER_WORKER)
                except LOST as err:
                    if (failure := setup_failure(err)) is None:
                        self.retry_at[handle] = time.monotonic() + PING_RETRY_SECONDS
                    else:
                        self._setup_failed(handle, failure)
                continue
            handle, key, frame_ref, dispatched = self._inflight.pop(ref)
            try:
                timings = ray.get(ref)
            except LOST as err:
                self._lost(handle, err, key)
                lost.append(key)
                continue
            self.slots.append(handle)
            self._record(handle, key, timings, time.monotonic() - dispatched)
            done.append((handle, key, frame_ref, timings))
        self.metrics.workers(self._answering(), len(self.failed_setup))
        return done, lost

    def _answering(self) -> int:
        """Workers answering: neither starting, recovering, nor unable to start."""
        return (len(self.workers) - len(self.retry_at) - len(self.pings)
                - len(self.failed_setup))

    def _record(self, handle: Any, key: tuple[int, int, int], timings: dict[str, Any],
                round_trip: float) -> None:
        node = self.node_of.get(handle) or self._node_label(
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
        self.spans.append((worker, timings["started"], timings["ended"]))
        host = self.per_host.setdefault(worker, {"chunks": 0, "compute_seconds": 0.0})
        host["chunks"] += 1
        host["kind"] = timings.get("kind", "unknown")
        self.kinds[host["kind"]] = self.kinds.get(host["kind"], 0) + 1
        host["compute_seconds"] += timings["compute_seconds"]

    def _loop(self, todo: deque, finished: Callable[[], bool], on_result: Callable) -> None:
        last_progress = time.monotonic()
        while not finished():
            while todo and self.slots:
                self._dispatch(self.slots.popleft(), todo.popleft())
            results, lost = self._wait()
            todo.extend(lost)
            for item in results:
                try:
                    on_result(*item)
                except LOST as err:  # the result object went with its node
                    self._lost(None, err, item[1])
                    todo.append(item[1])
            if results:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.runtime.stall_timeout:
                raise StallError(
                    f"no task result for {self.runtime.stall_timeout:.0f} s "
                    f"({self._answering()} of {len(self.workers)} workers answering)")

    # --- the executor interface ---------------------------------------------------------

    def step(self, iteration: int) -> tuple[float, float]:
        """One meta-iteration: (mean query loss after adaptation, gradient norm)."""
        self._scale_out()
        if self.runtime.mode == "sync":
            return self._step_sync(iteration)
        return self._step_async(iteration)

    def _step_sync(self, iteration: int) -> tuple[float, float]:
        if iteration != self.version:
            raise RuntimeError(f"sync step {iteration} at parameter-server version "
                               f"{self.version}")
        todo = deque((iteration, s, n) for s, n in self.chunks)
        accepted: set[int] = set()
        submitted: dict[Any, tuple[int, int, int]] = {}  # ps.submit ref -> chunk

        def on_result(handle, key, frame_ref, timings):
            # Not waited for here: the parameter server takes results in the order they
            # are sent, and all are checked before the update is applied.
            submitted[self.ps.submit.remote(iteration, key[1], frame_ref)] = key

        while len(accepted) < len(self.chunks):
            self._loop(todo, lambda: not todo and not self._inflight, on_result)
            # Queued behind the submits (an actor runs calls in order): applies the update
            # as soon as the last result is in, and returns the next meta-parameters.
            applied, frame_ref = self.ps.apply_and_frame.options(num_returns=2).remote(
                iteration)
            for ref, key in list(submitted.items()):
                del submitted[ref]
                try:
                    status = ray.get(ref)
                except LOST as err:  # the result object went with its node
                    self._lost(None, err, key)
                    todo.append(key)
                    continue
                if status == "accepted":
                    accepted.add(key[1])
                elif status == "duplicate":
                    self.counters["duplicates"] += 1
                else:
                    raise RuntimeError(f"parameter server refused chunk {key}: {status}")
            if len(accepted) < len(self.chunks):  # the update found chunks missing: redo them
                with contextlib.suppress(ray.exceptions.RayTaskError):
                    ray.get(applied)
        out = ray.get(applied)
        self.version = out["version"]
        self._meta_ref = (self.version, frame_ref)
        self.metrics.update_applied(self.version, out["update_seconds"])
        return out["loss"], out["grad_norm"]

    def _step_async(self, iteration: int) -> tuple[float, float]:
        def on_result(handle, key, frame_ref, timings):
            it, start, _ = key
            out = ray.get(self.ps.submit_async.remote(it, start, frame_ref))
            if out["status"] == "duplicate":
                self.counters["duplicates"] += 1
                return
            if out["status"].startswith("rejected"):
                raise RuntimeError(f"parameter server refused chunk {key}: {out['status']}")
            self.version = out["version"]
            self._async_left[it] -= 1
            if out["status"] == "applied":
                self._async_losses.setdefault(it, []).append((out["loss"], out["grad_norm"]))
                self.metrics.update_applied(self.version, out["update_seconds"],
                                            out["staleness"])
            else:
                self.metrics.update_dropped(out["staleness"])

        self._loop(self._async_queue,
                   lambda: all(n == 0 for i, n in self._async_left.items() if i <= iteration),
                   on_result)
        losses = self._async_losses.pop(iteration, [])
        if not losses:
            return float("nan"), float("nan")
        return (sum(loss for loss, _ in losses) / len(losses),
                sum(norm for _, norm in losses) / len(losses))

    def snapshot(self) -> Meta:
        return decode(ray.get(self.ps.meta_frame.remote()), self.tree_spec).tree

    def checkpoint(self, path: str, iteration: int, info: dict[str, Any],
                   best: Meta | None = None) -> None:
        best_frame = encode(best, 0) if best is not None else None
        ray.get(self.ps.checkpoint.remote(str(path), iteration, info, best_frame))

    def stats(self) -> dict[str, Any]:
        ps = ray.get(self.ps.get_stats.remote())
        latencies = sorted(ps.pop("update_seconds"))
        staleness = ps.pop("applied_staleness")
        seconds = sorted(self.task_seconds)
        n = len(self.bytes_out) or 1
        per_task = self.spec.runtime.chunk
        return {
            "mode": self.runtime.mode,
            "workers": len(self.workers),
            "workers_failed_to_start": sorted(self.failed_setup.values()),
            "outer_updates": ps["version"],
            "chunk": per_task,
            **self.counters,
            "parameter_server": ps,
            "update_seconds_median": latencies[len(latencies) // 2] if latencies else None,
            "update_seconds_max": latencies[-1] if latencies else None,
            "chunk_seconds_median": seconds[len(seconds) // 2] if seconds else None,
            "bytes_out_per_task": sum(self.bytes_out) / n / per_task,
            "bytes_in_per_chunk": sum(self.bytes_in) / n,
            "max_applied_staleness": max(staleness) if staleness else None,
            "per_worker": self.per_host,
            "kinds": dict(sorted(self.kinds.items())),  # machine kind -> chunks computed
            "nodes": sorted(self.live_on),
            "throughput": self.throughput.summary(),
        }

    def release(self) -> None:
        """Meta-training is over: the job holds no node any longer (for the cost)."""
        self.spend.release_all()

    def close(self) -> None:
        self.release()
        for handle in self.workers:
            ray.kill(handle, no_restart=True)
        ray.kill(self.ps, no_restart=True)
        if self.embedded:
            ray.shutdown()

