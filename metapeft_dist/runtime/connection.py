"""Joining a Ray cluster, or starting the embedded local Ray a job runs on by default."""

from __future__ import annotations

import os
import socket
import sys

import ray

# Results up to this size travel inline with the task reply instead of through the
# shared-memory object store; a chunk's LoRA gradient (~120 KB) is just over Ray's 100 KB
# default, and inlining it halves the idle gap between a worker's chunks here. Set for
# the embedded Ray; a cluster sets it with `ray start --system-config` (cluster/).
INLINE_RESULT_BYTES = 1 << 20


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this job (unreachable, no `mlx` workers, or none of
    them could build the job)."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one clear line, when nothing listens at ``host:port``."""
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
    # "local": a Ray of its own even when another runs on this machine (a `ray start`
    # head, a test cluster) or RAY_ADDRESS names one; without it ray.init would join
    # that one and refuse the resources asked for here.
    ray.init(address="local", num_cpus=max(1, os.cpu_count() or 1),
             resources={"mlx": workers or default_local_workers()},
             include_dashboard=False, logging_level="WARNING", log_to_driver=True,
             _system_config={"max_direct_call_object_size": INLINE_RESULT_BYTES})
    return True
