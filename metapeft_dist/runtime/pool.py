"""The MLX worker actors of a run and what is known of each.

One worker per `mlx` resource (or ``runtime.workers``), and one more for each `mlx`
resource that joins later (a machine added). A worker counts once it answers a ping; it
then offers SLOTS_PER_WORKER slots to the dispatch loop. A worker (or its node) that
dies is restarted by Ray (``max_restarts=-1``) and pinged every PING_RETRY_SECONDS until
it answers again; one whose constructor failed (its node lacks a file or a package the
job needs) is not restarted by Ray, is reported and left out.

Nodes: each answering worker's node gets a label (its host name, numbered when several
nodes share one, as on a test cluster) and is held on the cost meter while a worker
there answers.
"""

from __future__ import annotations

import platform
import time
from collections import deque
from typing import Any, Callable

import ray
from ray.exceptions import (
    ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError, RayActorError,
    WorkerCrashedError)

from metapeft_dist.config import JobSpec
from metapeft_dist.cost import SpendMeter
from metapeft_dist.metrics import JobMetrics
from metapeft_dist.runtime.connection import ClusterError
from metapeft_dist.runtime.worker import Worker
from metapeft_dist.sweeps import Sweep

# A worker or its node is gone (maybe for good, maybe restarting), or the result object
# went with it: the chunk is redone elsewhere.
LOST = (RayActorError, ActorUnavailableError, WorkerCrashedError, ObjectLostError,
        OwnerDiedError)
START_SECONDS = 60.0  # how long a run waits for its first workers before it begins
# Chunks queued per worker: with two, a worker starts its next chunk the moment it
# finishes one instead of idling while the driver round-trips.
SLOTS_PER_WORKER = 2
PING_RETRY_SECONDS = 1.0
SCALE_CHECK_SECONDS = 5.0


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
        imported_at = time.time()  # before waiting for the parameter server
        ps = ray.get_actor(ps_name)
        frozen_frame, files = ray.get(ps.job_assets.remote())
        super().__init__(spec, frozen_frame, files, imported_at)

    def node_identity(self) -> dict[str, str]:
        return {"id": ray.get_runtime_context().get_node_id(), "host": platform.node(),
                "ip": ray.util.get_node_ip_address()}

    def run_ref(self, version: int, meta_box: list, iteration: int, start: int,
                count: int) -> tuple[dict[str, Any], bytes]:
        frame = None if self.has_version(version) else ray.get(meta_box[0])
        return self.run(version, frame, iteration, start, count)

    def evaluate_ref(self, init_id: str, init_box: list, shots: int, start: int,
                     count: int, sweep: str | Sweep) -> tuple[dict[str, Any], Any]:
        """:meth:`Worker.evaluate`, its init frame fetched once per init."""
        frame = None if self.has_init(init_id) else ray.get(init_box[0])
        return self.evaluate(init_id, frame, shots, start, count, sweep)

    def finetune_ref(self, init_id: str, init_box: list, shots: int, start: int, count: int,
                     state_frame: bytes, steps: int) -> tuple[dict[str, Any], Any]:
        """:meth:`Worker.finetune`, its init frame fetched once per init."""
        frame = None if self.has_init(init_id) else ray.get(init_box[0])
        return self.finetune(init_id, frame, shots, start, count, state_frame, steps)


class WorkerPool:
    """The workers, their free slots, the pings in flight, and their nodes."""

    def __init__(self, spec: JobSpec, ps_name: str, metrics: JobMetrics, spend: SpendMeter,
                 log: Callable[[str], None]):
        self.spec_dict = spec.to_dict()
        self.runtime = spec.runtime
        self.ps_name = ps_name
        self.metrics, self.spend, self.log = metrics, spend, log
        self._actor = ray.remote(RayWorker).options(
            num_cpus=0, resources={"mlx": 1}, max_restarts=-1, max_task_retries=0)
        self.workers: list[Any] = []
        self.slots: deque = deque()  # a handle per chunk it can take now
        self.pings: dict[Any, Any] = {}  # ping ref -> worker handle (starting or recovering)
        self.retry_at: dict[Any, float] = {}  # recovering handle -> when to ping again
        self.failed_setup: dict[Any, str] = {}  # handle -> why its constructor failed
        self.node_labels: dict[str, str] = {}  # Ray node id -> label
        self.node_of: dict[Any, str] = {}  # worker handle -> node label, once it answered
        self.live_on: dict[str, set] = {}  # node label -> the workers answering there
        self.created_at: dict[Any, float] = {}  # worker handle -> when it was started
        self.kinds: dict[str, int] = {}  # machine kind (blas.machine_kind) -> chunks done
        self.first_answer: dict[str, Any] | None = None  # the first worker's first ping
        self._next_scale_check = time.monotonic() + SCALE_CHECK_SECONDS

    def launch(self) -> None:
        """Start the workers (one per `mlx` resource, or ``runtime.workers``)."""
        wanted = self.runtime.workers or self._mlx_capacity()
        if wanted < 1:
            raise ClusterError("the Ray cluster declares no `mlx` resource: start each node "
                               "with ray start --resources='{\"mlx\": 1}'")
        for _ in range(wanted):
            self._add()

    def wait_started(self) -> None:
        """Wait (at most START_SECONDS) for the workers launched to answer, so the work
        is spread from the first iteration rather than all going to whichever imported
        MLX first on a loaded machine; a slower worker still joins later."""
        ray.wait(list(self.pings), num_returns=len(self.pings),
                 timeout=min(START_SECONDS, self.runtime.stall_timeout))

    def _mlx_capacity(self) -> int:
        return int(ray.cluster_resources().get("mlx", 0))

    def _add(self) -> None:
        handle = self._actor.remote(self.spec_dict, self.ps_name)
        self.workers.append(handle)
        self.created_at[handle] = time.time()
        self.pings[handle.ping.remote()] = handle

    def scale_out(self) -> None:
        """A worker for each `mlx` resource that joined the cluster since the start
        (checked every SCALE_CHECK_SECONDS)."""
        now = time.monotonic()
        if now < self._next_scale_check:
            return
        self._next_scale_check = now + SCALE_CHECK_SECONDS
        if self.runtime.workers is None:
            for _ in range(self._mlx_capacity() - len(self.workers)):
                self.log("a new `mlx` resource joined the cluster: starting a worker")
                self._add()

    def answering(self) -> int:
        """Workers answering: neither starting, recovering, nor unable to start."""
        return (len(self.workers) - len(self.retry_at) - len(self.pings)
                - len(self.failed_setup))

    def report(self) -> None:
        self.metrics.workers(self.answering(), len(self.failed_setup))

    # --- pings --------------------------------------------------------------------------

    def ping_refs(self) -> list:
        """The pings in flight, after re-pinging the recovering workers that are due."""
        now = time.monotonic()
        for handle, when in list(self.retry_at.items()):
            if when <= now:
                del self.retry_at[handle]
                self.pings[handle.ping.remote()] = handle
        return list(self.pings)

    def answered(self, ref: Any) -> bool:
        """Take the ping ``ref`` if it is one (returns False otherwise): its worker is up
        and offers its slots, or is pinged again later, or could not start."""
        handle = self.pings.pop(ref, None)
        if handle is None:
            return False
        try:
            answer = ray.get(ref)
            if self.first_answer is None:
                self.first_answer = answer
            self._up(handle, answer)
            self.slots.extend([handle] * SLOTS_PER_WORKER)
        except LOST as err:
            if (failure := setup_failure(err)) is None:
                self.retry_at[handle] = time.monotonic() + PING_RETRY_SECONDS
            else:
                self._setup_failed(handle, failure)
        return True

    def _setup_failed(self, handle: Any, failure: str) -> None:
        """A worker could not build the job: it is not pinged again; the job goes on
        with the others, or ends with the reason when none is left."""
        self.failed_setup[handle] = failure
        self.log(f"a worker could not start: {failure}")
        self.report()
        if len(self.failed_setup) == len(self.workers):
            raise ClusterError(f"no MLX worker could start the job: {failure}")

    # --- nodes --------------------------------------------------------------------------

    def node_label(self, identity: dict[str, Any]) -> str:
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

    def _up(self, handle: Any, identity: dict[str, Any]) -> None:
        """A worker answered: its node is held by the job (reserved) from when the
        worker was started (its setup is part of the cost) or, after a loss, from now."""
        node = self.node_label(identity)
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

    def counted_on(self, kind: str) -> None:
        """A chunk was computed on a machine of ``kind``."""
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def lost(self, handle: Any) -> None:
        """A worker stopped answering (a chunk was lost with it): its node is released
        when it was the last one there, and it is pinged until it answers again."""
        node = self.node_of.get(handle)
        if node is not None and handle in self.live_on.get(node, ()):
            self.live_on[node].discard(handle)
            if not self.live_on[node]:
                self.spend.release(node)
        self.retry_at[handle] = time.monotonic()

    def kill(self) -> None:
        for handle in self.workers:
            ray.kill(handle, no_restart=True)
