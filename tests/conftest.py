"""Shared test set-up. Importing metapeft_dist first loads OpenBLAS before mlx (blas.py)."""

from __future__ import annotations

from pathlib import Path

import metapeft_dist  # noqa: F401  (must precede mlx)
import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"



@pytest.fixture
def tiny_spec_text() -> str:
    """A job that runs in a few seconds: sinusoid, second-order MAML."""
    return """
family: {name: sinusoid, shots: 5, query: 5}
model: {hidden: [16, 16]}
algorithm: {name: maml, meta_batch: 4, iterations: 30}
inner: {steps: 1, lr: 0.01}
outer: {lr: 0.001}
eval: {tasks: 8, shots: [5], steps: 3, every: 10, val_tasks: 4, chunk: 4,
       baselines: [random]}
checkpoint: {every: 10, keep: 2}
"""


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 `mlx` workers) for a test module; jobs run in it join it
    instead of starting their own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, resources={"mlx": 2}, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
