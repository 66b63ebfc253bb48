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

The parts, each in its module: joining the cluster (connection.py), the workers and
their nodes (pool.py), the dispatch loop (dispatch.py), the sync and async protocols
(steppers.py), the evaluation on the workers (evaluation.py), the parameter server
(param_server.py) and the worker (worker.py).

:class:`RayExecutor` offers the same ``step`` / ``snapshot`` / ``checkpoint`` interface
as the in-process :class:`metapeft_dist.trainer.MetaTrainer`; ``runner.py`` drives both.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from metapeft_dist.cost import SpendMeter
from metapeft_dist.evaluate import Progress, evaluate_job, no_progress
from metapeft_dist.job import Job
from metapeft_dist.metrics import JobMetrics, NoMetrics
from metapeft_dist.runtime.connection import Connecting, connect
from metapeft_dist.runtime.dispatch import Dispatcher
from metapeft_dist.runtime.evaluation import RayScorer
from metapeft_dist.runtime.param_server import ParameterServer
from metapeft_dist.runtime.pool import WorkerPool
from metapeft_dist.runtime.steppers import AsyncStepper, SyncStepper
from metapeft_dist.tree import Meta
from metapeft_dist.wire import TreeSpec, decode, encode


class RayExecutor:
    def __init__(self, job: Job, address: str | None = None, resume_path: str | None = None,
                 start_iteration: int = 0, log: Callable[[str], None] = lambda m: None,
                 metrics: JobMetrics | None = None, spend: SpendMeter | None = None,
                 connecting: Connecting | None = None):
        """``connecting``: the cluster being joined already (runner.run_job starts that
        before it builds the job), else this joins it."""
        self.job = job
        self.spec = job.spec
        self.runtime = job.spec.runtime
        self.metrics = metrics if metrics is not None else NoMetrics()
        self.spend = spend if spend is not None else SpendMeter({})
        self.connecting = connecting
        if connecting is None:
            self.embedded = connect(address, self.runtime.workers)
            self.started = {"ray": time.time()}  # startup milestones (results.json timing)
        else:
            self.embedded = connecting.result()
            self.started = {"ray": connecting.finished}
        self.tree_spec = TreeSpec.of(job.initial_meta)
        a, chunk = self.spec.algorithm, self.runtime.chunk
        chunks = [(s, min(chunk, a.meta_batch - s)) for s in range(0, a.meta_batch, chunk)]
        self.ps, ps_name = self._start_parameter_server(
            job, resume_path, a.iterations * (1 if self.runtime.mode == "sync" else len(chunks)))
        self.pool = WorkerPool(self.spec, ps_name, self.metrics, self.spend, log)
        # The workers start (a process each, importing MLX) while the parameter server
        # does; they wait for it to hand them the job's frozen base and files.
        self.pool.launch()
        version = ray.get(self.ps.get_version.remote())
        self.pool.wait_started()
        self.started["workers"] = time.time()
        self.dispatcher = Dispatcher(self.spec, self.pool, self.ps, version, self.metrics,
                                     self.spend, log)
        self.stepper = (SyncStepper(self.dispatcher, chunks, self.metrics)
                        if self.runtime.mode == "sync" else
                        AsyncStepper(self.dispatcher, chunks, self.metrics, start_iteration,
                                     a.iterations))

    def _start_parameter_server(self, job: Job, resume_path: str | None,
                                total_updates: int) -> tuple[Any, str]:
        """The parameter server actor, on this node, named, so a worker finds it by a
        string (pool.RayWorker). Every worker builds its job on the frozen base and task
        files it hands out, and needs no files of its machine."""
        name = f"metapeft-parameter-server-{uuid.uuid4().hex[:12]}"
        here = ray.get_runtime_context().get_node_id()
        actor = ray.remote(ParameterServer).options(
            name=name, num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
        ps = actor.remote(self.spec.to_dict(), encode(job.initial_meta, 0),
                          encode({"frozen": job.stored_frozen()}, 0), total_updates,
                          resume_path, job.files)
        return ps, name

    # --- the executor interface (see training.Executor) -----------------------------------

    @property
    def workers(self) -> int:
        return len(self.pool.workers)

    def step(self, iteration: int) -> tuple[float, float]:
        """One meta-iteration: (mean query loss after adaptation, gradient norm)."""
        self.pool.scale_out()
        return self.stepper.step(iteration)

    def scorer(self) -> RayScorer:
        """The evaluation, on these workers (runtime/evaluation.py)."""
        return RayScorer(self.job, self.dispatcher)

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
        chunks = self.dispatcher.ledger.summary()
        return {
            "mode": self.runtime.mode,
            "workers": len(self.pool.workers),
            "workers_failed_to_start": sorted(self.pool.failed_setup.values()),
            "outer_updates": ps["version"],
            "chunk": self.runtime.chunk,
            **self.dispatcher.ledger.counters,
            "parameter_server": ps,
            "update_seconds_median": latencies[len(latencies) // 2] if latencies else None,
            "update_seconds_max": latencies[-1] if latencies else None,
            "chunk_seconds_median": chunks["chunk_seconds_median"],
            "bytes_out_per_task": chunks["bytes_out_per_task"],
            "bytes_in_per_chunk": chunks["bytes_in_per_chunk"],
            "max_applied_staleness": max(staleness) if staleness else None,
            "per_worker": chunks["per_worker"],
            "kinds": dict(sorted(self.pool.kinds.items())),  # machine kind -> chunks computed
            "nodes": sorted(self.pool.live_on),
            "throughput": chunks["throughput"],
            "started": {**self.started, **self._first_worker()},
        }

    def _first_worker(self) -> dict[str, float]:
        """When the first worker to answer had its imports done and its job built (its
        machine's clock; one clock with the embedded Ray)."""
        first = self.pool.first_answer
        if first is None or "built_at" not in first:
            return {}
        return {"worker_imported": first["imported_at"], "worker_built": first["built_at"]}

    def release(self) -> None:
        """Meta-training is over: the job holds no node any longer (for the cost)."""
        self.spend.release_all()

    def close(self) -> None:
        self.release()
        self.pool.kill()
        ray.kill(self.ps, no_restart=True)
        if self.embedded:
            ray.shutdown()
        if self.connecting is not None:
            self.connecting.release()


@contextmanager
def ray_scorer(job: Job, address: str | None = None,
               log: Callable[[str], None] = lambda m: None) -> Iterator[RayScorer]:
    """A RayScorer on ``job``'s workers on the cluster at ``address`` (default: an
    embedded local Ray, as ``metapeft run`` starts, or the Ray this process already
    joined), for evaluations without meta-training; the workers stop at the end."""
    executor = RayExecutor(job, address, log=log)
    try:
        executor.release()  # nothing is meta-trained: no node is held for the cost
        yield executor.scorer()
    finally:
        executor.close()


def evaluate_on_ray(job: Job, meta: Meta, on_progress: Progress = no_progress,
                    address: str | None = None, log: Callable[[str], None] = lambda m: None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """evaluate.evaluate_job of ``meta`` on the workers of the cluster at ``address``
    (default: an embedded local Ray, as ``metapeft run`` starts): (the evaluation, what
    the workers did)."""
    with ray_scorer(job, address, log) as scorer:
        return evaluate_job(job, meta, on_progress, scorer), scorer.stats()
