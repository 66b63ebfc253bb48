"""Joining a Ray cluster, or starting the embedded local Ray a job runs on by default."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from metapeft_dist.runtime.errors import ClusterError

# Results up to this size travel inline with the task reply instead of through the
# shared-memory object store; a chunk's LoRA gradient (~120 KB) is just over Ray's 100 KB
# default, and inlining it halves the idle gap between a worker's chunks here. Set for
# the embedded Ray; a cluster sets it with `ray start --system-config` (cluster/).
INLINE_RESULT_BYTES = 1 << 20


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
    import ray  # here, not above: Connecting imports it on its thread

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


class _StartNotes(logging.Filter):
    """Drops two of ray.init's warnings that ask nothing of a user: that it set no
    SIGTERM handler off the main thread (:meth:`Connecting.result` sets the same
    handler there), and, for the embedded Ray, that it turned on token authentication,
    Ray's default for a new local cluster (it stays on)."""

    LOGGERS = ("ray._private.worker",
               "ray._private.authentication.authentication_token_setup")

    def __init__(self, embedded: bool):
        super().__init__()
        self.notes = ["SIGTERM handler is not set"]
        if embedded:
            self.notes.append("Token authentication is enabled for this Ray cluster")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in self.notes)


class Connecting:
    """:func:`connect` on a thread, so the driver builds its job meanwhile instead of
    after (the embedded Ray takes seconds to start). :meth:`result` waits for it and
    sets, on the calling (main) thread, the SIGTERM handler ray.init sets only there:
    exit with the signal's number, which `metapeft stop` relies on (runner.ended_by).

    The thread that joined stays (parked) until :meth:`release`: the processes of an
    embedded Ray are started with Linux's parent-death signal, which fires when the
    *thread* that started them ends, so they would die with it."""

    def __init__(self, address: str | None, workers: int | None):
        self.finished: float | None = None  # when the cluster was joined (time.time())
        self._embedded: bool | None = None
        self._initialized = False  # whether this call ran ray.init
        self._error: BaseException | None = None
        self._joined = threading.Event()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, workers),
                                        name="ray-connect", daemon=True)
        self._thread.start()

    def _run(self, address: str | None, workers: int | None) -> None:
        notes = _StartNotes(embedded=not address)
        for name in notes.LOGGERS:
            logging.getLogger(name).addFilter(notes)
        try:
            import ray

            self._initialized = not ray.is_initialized()
            self._embedded = connect(address, workers)
        except BaseException as err:  # raised on the main thread by result()
            self._error = err
        finally:
            for name in notes.LOGGERS:
                logging.getLogger(name).removeFilter(notes)
            self.finished = time.time()
            self._joined.set()
        if self._error is None:
            self._released.wait()

    def result(self) -> bool:
        """True when this started Ray (and must stop it), as :func:`connect`."""
        self._joined.wait()
        if self._error is not None:
            raise self._error
        if self._initialized and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        return bool(self._embedded)

    def release(self) -> None:
        """The job is done with Ray (the Ray this started is shut down): the thread may
        end."""
        self._released.set()

    def abandon(self) -> None:
        """The job will not run (building it failed): stop the Ray this started."""
        try:
            embedded = self.result()
        except BaseException:
            return
        if embedded:
            import ray

            ray.shutdown()
        self.release()
