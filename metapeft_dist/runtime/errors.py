"""The runtime's errors a caller catches, in a module that does not import ray: the CLI
names them without paying for ray's import in a run that never uses it."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this job (unreachable, no `mlx` workers, or none of
    them could build the job)."""


class StallError(RuntimeError):
    """No task result arrived for ``runtime.stall_timeout`` seconds."""
