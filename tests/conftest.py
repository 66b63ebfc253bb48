"""Shared test set-up. Importing metapeft_dist first loads OpenBLAS before mlx (blas.py)."""

from __future__ import annotations

from pathlib import Path

import metapeft_dist  # noqa: F401  (must precede mlx)
import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"



# A job that runs in a few seconds: sinusoid, second-order MAML.
TINY_SPEC = """
family: {name: sinusoid, shots: 5, query: 5}
model: {hidden: [16, 16]}
algorithm: {name: maml, meta_batch: 4, iterations: 30}
inner: {steps: 1, lr: 0.01}
outer: {lr: 0.001}
eval: {tasks: 8, shots: [5], steps: 3, every: 10, val_tasks: 4, chunk: 4,
       baselines: [random]}
checkpoint: {every: 10, keep: 2}
"""

# Short texts of three topics, for JSONL task files of two topics each.
TOPICS = {
    "weather": ["rain falls today", "a storm comes", "the sun is warm", "snow at night",
                "wind in the trees", "fog at dawn"],
    "food": ["pasta with sauce", "fresh bread", "pizza for dinner", "apples and cheese",
             "salty soup", "chocolate cake"],
    "sport": ["the team won", "she runs fast", "a late goal", "an ace in tennis",
              "laps in the pool", "a long climb by bike"],
}


@pytest.fixture
def tiny_spec_text() -> str:
    """:data:`TINY_SPEC`."""
    return TINY_SPEC


@pytest.fixture
def tiny_digits_text() -> str:
    """A digits job on a pretrained, frozen MLP base (LoRA and head meta-learned) that
    runs in a few seconds in this process."""
    return """
family: {name: digits, ways: 5, shots: 1, query: 5}
model: {kind: mlp, hidden: [32], lora: {rank: 2, alpha: 2}, train: lora, base: pretrained,
        pretrain: {steps: 30, batch: 32}}
algorithm: {name: fomaml, meta_batch: 4, iterations: 2}
inner: {steps: 2, lr: 0.4}
eval: {tasks: 4, shots: [1], steps: 1, every: 2, val_tasks: 4, chunk: 4, baselines: [random]}
runtime: {mode: local}
metrics: {enabled: false}
"""


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 `mlx` workers) for a test module; jobs run in it join it
    instead of starting their own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # "local": a Ray of its own, even while another test process's cluster runs beside
    # it (pytest -n 2), which ray.init would otherwise join and refuse num_cpus
    ray.init(address="local", num_cpus=2, resources={"mlx": 2}, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
