"""Execution of meta-training jobs: checkpoints now; the Ray driver, worker and
parameter-server actors build on the same pieces."""
