"""adapt.py and `metapeft adapt`: a finished text run's init exported as an adapter
(mlx-lm's format for a causal LM: it loads in mlx-lm and generates), a new task adapted
from a few examples (the support loss falls, the adapter is written), and bad input as
one line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from tiny_llama import save_tiny_llama

from metapeft_dist.config import parse_spec
from metapeft_dist.models.export import ADAPTERS_FILE
from metapeft_dist.runner import run_job

from conftest import TOPICS


def _write_task(path, labels, rows=slice(None)):
    lines = [json.dumps({"text": text, "label": label}) for label in labels
             for text in TOPICS[label][rows]]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(tmp_path, model: str,
         algorithm: str = "{name: fomaml, meta_batch: 2, iterations: 4}", name: str = "run"):
    """A finished run on three two-topic JSONL tasks. Its standard init's Adam fine-tune
    is three steps on two tasks, not the default 200 on 20: where the standard init never
    reaches the meta-learned init's target, that budget took 100 s here. The fine-tune
    itself is tested in test_evaluate and test_runner."""
    data = tmp_path / "tasks"
    data.mkdir()
    for i, pair in enumerate([("weather", "food"), ("food", "sport"), ("sport", "weather")]):
        _write_task(data / f"task{i}.jsonl", pair)
    spec = parse_spec(f"""
name: text
family: {{name: jsonl, path: {data}, ways: 2, shots: 2, query: 2}}
model: {model}
algorithm: {algorithm}
runtime: {{mode: local}}
inner: {{steps: 2, lr: 0.5}}
eval: {{tasks: 2, shots: [2], steps: 2, every: 2, val_tasks: 2, chunk: 2,
       finetune: {{steps: 3, tasks: 2}}}}
metrics: {{enabled: false}}
""")
    run_dir = tmp_path / name
    run_job(spec, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, llama):
    model = (f"{{kind: causal_lm, path: {llama}, train: lora, max_len: 24, "
             "lora: {rank: 2, layers: 1}}")
    return _run(tmp_path_factory.mktemp("llama_run"), model)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "metapeft_dist.cli", *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_a_causal_lm_run_exports_its_init_for_mlx_lm(llama, llama_run):
    from mlx_lm import generate, load

    adapter = llama_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 1
    model, tokenizer = load(str(llama), adapter_path=str(adapter))
    text = generate(model, tokenizer, prompt="Text: rain falls today\nLabel:", max_tokens=5)
    assert isinstance(text, str) and text
    saved = mx.load(str(adapter / "adapters.safetensors"))
    assert saved and all(k.endswith(("lora_a", "lora_b")) for k in saved)
    # `mlx_lm.generate --adapter-path`, the command line a user would run.
    out = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(llama),
                          "--adapter-path", str(adapter), "--prompt", "Text: hi\nLabel:",
                          "--max-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_adapt_a_new_task_from_a_few_examples(tmp_path, llama, llama_run):
    task = _write_task(tmp_path / "new.jsonl", ("weather", "sport"), slice(0, 3))
    held = _write_task(tmp_path / "held.jsonl", ("weather", "sport"), slice(3, 6))
    out = _cli("adapt", "--init", str(llama_run), "--data", str(task), "--holdout", str(held),
               "--steps", "8", "--out", str(tmp_path / "adapter"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["labels"] == ["weather", "sport"] and report["examples"] == 6
    before, after = report["support_loss"]
    assert after < before - 0.05
    assert len(report["holdout_accuracy"]) == 2
    assert json.loads((tmp_path / "adapter" / "labels.json").read_text()) == {
        "0": "weather", "1": "sport"}
    from mlx_lm import load

    load(str(llama), adapter_path=str(tmp_path / "adapter"))  # mlx-lm reads it


def test_adapt_an_encoder_run(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPEFT_CACHE", str(tmp_path / "cache"))
    run_dir = _run(tmp_path, "{kind: encoder, train: lora, max_len: 16, "
                             "lora: {rank: 2, layers: 1}}")
    assert (run_dir / "adapter" / "adapters.safetensors").is_file()
    task = _write_task(tmp_path / "new.jsonl", ("food", "weather"), slice(0, 2))
    out = _cli("adapt", "--init", str(run_dir), "--data", str(task), "--steps", "5", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["support_loss"][1] < report["support_loss"][0]
    written = mx.load(str(run_dir / "adapted" / "new" / "adapters.safetensors"))
    assert written["head.w"].shape == (2, 384)
    config = json.loads((run_dir / "adapted" / "new" / "adapter_config.json").read_text())
    assert config["model_type"] == "metapeft-encoder" and config["layers"] == [5]


def test_bad_adapt_input_is_one_line(tmp_path, llama_run):
    three = _write_task(tmp_path / "three.jsonl", ("weather", "food", "sport"))
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    digits = tmp_path / "digits_run"
    digits.mkdir()
    (digits / "spec.yaml").write_text("family: {name: digits}\nalgorithm: {name: maml}\n")
    good = _write_task(tmp_path / "good.jsonl", ("weather", "food"))
    cases = [
        (["--init", str(tmp_path / "nope"), "--data", str(good)], "not a run directory"),
        (["--init", str(digits), "--data", str(good)], "is a mlp run"),
        (["--init", str(llama_run), "--data", str(tmp_path / "none.jsonl")],
         "task file not found"),
        (["--init", str(llama_run), "--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:1"),
        (["--init", str(llama_run), "--data", str(good), "--holdout", str(three)],
         "labels the task file"),
        (["--init", str(llama_run), "--data", str(good), "--steps", "-1"],
         "steps must be >= 0"),
        (["--init", str(llama_run), "--data", str(good), "--out", str(three)],
         f"cannot write the adapter to {three}: it is a file"),
    ]
    if os.path.exists("/dev/full"):  # Linux: every write to it fails as on a full disk
        full = tmp_path / "full"
        full.mkdir()
        os.symlink("/dev/full", full / ADAPTERS_FILE)
        cases.append((["--init", str(llama_run), "--data", str(good), "--out", str(full)],
                      f"cannot write the adapter to {full}: "))
    for args, phrase in cases:
        out = _cli("adapt", *args)
        # progress notes ("metapeft: ...") may come before the error, nothing else
        lines = [line for line in out.stderr.strip().splitlines()
                 if not line.startswith("metapeft: ")]
        assert out.returncode == 2 and len(lines) == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert lines[0].startswith("error: ") and phrase in lines[0], (args, lines)


def test_eval_compares_the_init_on_other_tasks(tmp_path, llama_run):
    data = tmp_path / "other"
    data.mkdir()
    for i, pair in enumerate([("food", "weather"), ("sport", "food"), ("weather", "sport")]):
        _write_task(data / f"t{i}.jsonl", pair)
    out = _cli("eval", "--init", str(llama_run), "--data", str(data), "--set", "eval.tasks=3",
               "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results["spec"]["family"]["path"] == str(data)
    inits = results["evaluation"]["shots"]["2"]["inits"]
    assert set(inits) == {"meta", "random"}
    assert all(len(v["mean"]) == 3 and 0 <= min(v["mean"]) <= max(v["mean"]) <= 1
               for v in inits.values())
    table = _cli("eval", "--init", str(llama_run), "--data", str(data), "--set",
                 "eval.tasks=3", "-q")
    assert table.returncode == 0 and "steps to target" in table.stdout
    for args, phrase in [(["--family", "wordnet", "--data", str(data)], "not both"),
                         (["--data", str(data), "--set", "family.ways=3"],
                          "family.ways must stay 2"),
                         (["--set", "eval.tasks=0"], "eval.tasks: must be >= 1"),
                         (["--address", "127.0.0.1:1", "--set", "runtime.mode=sync"],
                          "cannot reach the Ray cluster at 127.0.0.1:1")]:
        bad = _cli("eval", "--init", str(llama_run), *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and phrase in lines[0], bad.stderr
