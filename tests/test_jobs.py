"""Every spec in jobs/ runs end to end (shortened with overrides), so a shipped job
cannot rot. Full-length runs are `make bench`."""

from __future__ import annotations

import pytest

from metapeft_dist.config import load_spec
from metapeft_dist.runner import run_job

from conftest import JOBS

# Two iterations, each validated and checkpointed (so `eval.select: best` chooses between
# two), two inner steps, tasks of two support and two query examples per class, three
# meta-test tasks: every part of a job runs, at the smallest size that still exercises it.
SHORT = ["algorithm.iterations=2", "eval.tasks=3", "eval.val_tasks=2", "eval.chunk=3",
         "eval.every=1", "eval.steps=2", "checkpoint.every=1", "model.pretrain.steps=3",
         "family.shots=2", "family.query=2", "inner.steps=2", "eval.finetune.steps=3",
         "eval.finetune.tasks=2"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.stem)
def test_job_runs(path, tmp_path, local_ray, tiny_llama):
    overrides = SHORT
    if load_spec(path).model.kind == "causal_lm":
        # The job as shipped on the tiny llama: the real model's conversion, cached layers
        # and logits are tested in tests/models, and its cache of a whole corpus's lower
        # layers takes minutes to build (~80 s per 1000 texts on 2 cores).
        overrides = [*SHORT, f"model.path={tiny_llama}"]
    spec = load_spec(path, overrides)
    results = run_job(spec, tmp_path / "run")
    ev = results["evaluation"]
    assert set(ev["shots"]) == {str(s) for s in spec.eval.shots}
    for summary in ev["shots"].values():
        assert set(summary["inits"]) == {"meta", *spec.eval.baselines}
        for entry in summary["inits"].values():
            assert len(entry["mean"]) == 3
            if ev["higher_is_better"]:
                assert all(0.0 <= m <= 1.0 for m in entry["mean"])
    assert results["meta_training"]["selected_iteration"] in (1, 2)
    runtime = results["runtime"]
    assert runtime["mode"] == spec.runtime.mode
    if spec.runtime.mode == "sync":  # every chunk of every iteration applied exactly once
        ps = runtime["parameter_server"]
        chunks = -(-spec.algorithm.meta_batch // spec.runtime.chunk)
        assert ps["accepted"] == 2 * chunks and ps["applied"] == 2
