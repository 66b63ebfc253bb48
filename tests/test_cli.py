"""cli.py: one line and exit 2 for every bad input, no traceback; the CLI does not
import mlx or ray to show help; a run prints its table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import JOBS

METAPEFT = [sys.executable, "-m", "metapeft_dist.cli"]


def _cli(*args, cwd=None, timeout=300):
    return subprocess.run([*METAPEFT, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_help_does_not_import_mlx_or_ray():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom metapeft_dist.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "bad = [m for m in ('mlx.core', 'ray', 'numpy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


GOOD = "family: {name: sinusoid}\nalgorithm: {name: maml}\n"
BAD_SPECS = {
    "unknown_algorithm.yaml": ("family: {name: sinusoid}\nalgorithm: {name: sgd}\n",
                               "algorithm.name"),
    "unknown_family.yaml": ("family: {name: omniglot}\nalgorithm: {name: maml}\n", "family.name"),
    "negative_lr.yaml": (GOOD + "inner: {lr: -0.1}\n", "inner.lr: must be > 0, got -0.1"),
    "text_lr.yaml": (GOOD + "outer: {lr: fast}\n", "outer.lr: must be a number"),
    "too_many_shots.yaml": ("family: {name: digits, shots: 100, query: 100}\n"
                            "algorithm: {name: maml}\n", "family.shots"),
    "unknown_key.yaml": (GOOD + "inner: {learning_rate: 0.1}\n", "inner.learning_rate"),
    "wrong_type.yaml": (GOOD + "algorithm: {name: maml, meta_batch: [1]}\n", None),
    "empty.yaml": ("", "is empty"),
    "broken.yaml": ("family: [\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_spec_one_line_exit_2(tmp_path, name):
    text, phrase = BAD_SPECS[name]
    path = tmp_path / name
    path.write_text(text)
    out = _cli("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    if phrase:
        assert phrase in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written for a bad spec


def test_missing_spec_and_bad_override(tmp_path):
    out = _cli("run", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "not found" in out.stderr
    out = _cli("run", str(JOBS / "quickstart.yaml"), "--set", "inner.lr=oops")
    assert out.returncode == 2 and "inner.lr: must be a number" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_validate_lists_every_error_and_json(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(GOOD + "inner: {lr: -1, steps: 0}\n")
    out = _cli("validate", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: inner.steps: must be >= 1, got 0", "error: inner.lr: must be > 0, got -1.0"]
    out = _cli("validate", "--json", str(path))
    assert json.loads(out.stdout)["errors"] == ["inner.steps: must be >= 1, got 0",
                                                "inner.lr: must be > 0, got -1.0"]
    out = _cli("validate", str(JOBS / "quickstart.yaml"))
    assert out.returncode == 0 and "valid" in out.stdout


def test_run_prints_the_results_table(tmp_path, tiny_spec_text):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec_text)
    out = _cli("run", str(spec), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert "steps to target" in out.stdout and "random" in out.stdout
    assert (tmp_path / "run" / "results.json").is_file()
    # --json prints the same results.json whatever the runtime: in process, no second Ray
    out = _cli("run", str(spec), "--run-dir", str(tmp_path / "run2"), "--json",
               "--set", "runtime.mode=local")
    results = json.loads(out.stdout)
    assert results["evaluation"]["metric"] == "mse" and results["runtime"]["mode"] == "local"


@pytest.mark.parametrize("args,phrase", [
    (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--address", "nonsense"], "must look like HOST:PORT"),
])
def test_unusable_cluster_address_one_line_exit_2(tmp_path, args, phrase):
    out = _cli("run", str(JOBS / "quickstart.yaml"), "--run-dir", str(tmp_path / "run"), *args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert phrase in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,phrase", [
    ([], "give either SPEC or --resume RUN_DIR"),
    (["--resume", "/nonexistent/run"], "is not a run directory"),
    (["SPEC", "--resume", "/x"], "give either SPEC or --resume RUN_DIR"),
])
def test_bad_resume_usage_one_line_exit_2(args, phrase):
    args = [str(JOBS / "quickstart.yaml") if a == "SPEC" else a for a in args]
    out = _cli("run", *args)
    assert out.returncode == 2 and phrase in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_run_directory_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-00000010.safetensors").write_bytes(b"precious")
    out = _cli("run", str(JOBS / "quickstart.yaml"), "--run-dir", str(run))
    assert out.returncode == 2 and "already holds a run" in out.stderr
    assert (run / "checkpoints" / "ckpt-00000010.safetensors").read_bytes() == b"precious"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_run_resumable(
        tmp_path, tiny_spec_text):
    """A checkpoint that cannot be written (here its temporary file is /dev/full, which
    answers every write with ENOSPC, as a full disk does) ends the run with one line
    naming it and how to continue; no temporary is left and the checkpoints before it
    are intact."""
    import shutil

    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec_text)
    whole = tmp_path / "whole"
    out = _cli("run", str(spec), "--run-dir", str(whole), "--set", "runtime.mode=local",
               "--set", "checkpoint.keep=3", "-q", "--json")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    for name in ("ckpt-00000020.safetensors", "ckpt-00000030.safetensors"):
        (run / "checkpoints" / name).unlink()
    (run / "results.json").unlink()
    os.symlink("/dev/full", run / "checkpoints" / ".ckpt-00000020.tmp.safetensors")
    kept = (run / "checkpoints" / "ckpt-00000010.safetensors").read_bytes()
    out = _cli("run", "--resume", str(run), "-q")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    target = run / "checkpoints" / "ckpt-00000020.safetensors"
    assert re.fullmatch(
        rf"error: the job failed: cannot write checkpoint {re.escape(str(target))}: .+ "
        rf"\(\d+\.\d MiB free on its disk\); its checkpoints are kept: continue with "
        rf"metapeft run --resume {re.escape(str(run))}", out.stderr.strip().splitlines()[-1]
    ), out.stderr
    assert out.stderr.count("error") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.safetensors", "ckpt-00000010.safetensors"]
    assert (run / "checkpoints" / "ckpt-00000010.safetensors").read_bytes() == kept
    outcome = json.loads((run / "outcome.json").read_text())
    assert outcome["status"] == "failed" and "cannot write checkpoint" in outcome["error"]


def _walk(command, path=()):
    import click

    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _walk(sub, (*path, name))


def test_every_command_and_option_has_help_and_every_read_command_takes_json():
    import click

    from metapeft_dist.cli import main

    seen, missing, without_json = [], [], []
    for path, command in _walk(main):
        name = " ".join(("metapeft", *path))
        seen.append(name)
        if not (command.help or "").strip():
            missing.append(name)
        for param in command.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"{name} {param.opts[0]}")
        is_group = isinstance(command, click.Group)
        if not is_group and path not in (("cluster", "up"), ("cluster", "down")) and not any(
                "--json" in getattr(param, "opts", ()) for param in command.params):
            without_json.append(name)
    expected = {"metapeft", *(f"metapeft {c}" for c in (
        "run", "validate", "report", "adapt", "eval", "embed", "submit", "status", "logs", "stop",
        "list", "cluster",
        "cluster up", "cluster down", "cluster status"))}
    assert set(seen) == expected
    assert not missing, missing
    assert not without_json, without_json  # up and down only act; they read nothing
