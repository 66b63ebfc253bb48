"""The commands that run on this machine: ``run``, ``validate``, ``report``."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import click

from metapeft_dist.cli.common import (EXIT_FAILED, fail_usage, overrides_option)
from metapeft_dist.config import ConfigError
from metapeft_dist.files import failure_reason


def _raise_stopped(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def _val_text(done: int, info: dict[str, Any]) -> str:
    """A meta-validation that ended at this iteration, with the iteration it measured
    when that was an earlier one (it ran beside the steps since)."""
    if "val" not in info:
        return ""
    at = info.get("val_iteration", done)
    return f"  val {info['val']:.4f}" + (f" (of iteration {at})" if at != done else "")


class _ProgressPrinter:
    """Renders runner progress on stderr: a bar for meta-training, lines otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.run_dir: str | None = None  # once the run has one
        self.bar = None
        self.shown = 0
        # In a submitted job stderr is a log file: a bar would print once, so print a
        # line every tenth of the way instead.
        self.lines = not sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int, info: dict[str, Any]) -> None:
        if stage == "setup":
            self.run_dir = info["run_dir"]
        if self.quiet:
            return
        if stage == "setup":
            click.echo(f"run directory: {info['run_dir']}", err=True)
        elif stage == "meta-train" and self.lines:
            if done == total or done * 10 // total > self.shown * 10 // total:
                text = f"meta-training {done}/{total}: loss {info['loss']:.4f}"
                text += _val_text(done, info)
                click.echo(text, err=True)
            self.shown = done
        elif stage == "meta-train":
            if self.bar is None:
                self.bar = click.progressbar(length=total, label="meta-training",
                                             file=sys.stderr, show_pos=True, show_eta=True,
                                             item_show_func=lambda x: x)
                self.bar.__enter__()
            self.bar.current_item = f"loss {info['loss']:.4f}{_val_text(done, info)}"
            self.bar.update(done - self.shown)
            self.shown = done
            if done == total:
                self.bar.__exit__(None, None, None)
        elif stage == "evaluate":
            detail = f": {info['detail']}" if "detail" in info else ""
            click.echo(f"evaluating {done}/{total}: {info['init']} init, "
                       f"{info['shots']}-shot{detail}", err=True)


@click.command()
@click.argument("spec", type=click.Path(), required=False)
@click.option("--run-dir", type=click.Path(),
              help="Write the run here (default: run.out_dir/NAME-TIMESTAMP).")
@click.option("--resume", "resume_dir", type=click.Path(),
              help="Continue the killed run in this directory from its newest good "
                   "checkpoint (no SPEC: the run's own spec is used).")
@click.option("--address", metavar="ADDRESS",
              help="Join the Ray cluster at ADDRESS (e.g. 10.0.0.2:6379); default: start "
                   "an embedded local Ray for the job.")
@overrides_option
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of a table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def run(spec: str | None, run_dir: str | None, resume_dir: str | None, address: str | None,
        overrides: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Meta-train and evaluate the job in SPEC (on Ray unless runtime.mode is local)."""
    import metapeft_dist
    from metapeft_dist import api

    if (spec is None) == (resume_dir is None):
        fail_usage("give either SPEC or --resume RUN_DIR")
    if resume_dir is not None and (overrides or run_dir):
        fail_usage("--resume continues a run as it was; --set and --run-dir do not apply")
    job_spec = None
    if spec is not None:
        try:
            job_spec = api.load(spec, overrides)
        except ConfigError as err:
            fail_usage(str(err))
    from metapeft_dist.results import format_table
    from metapeft_dist.runner import RunDirError
    from metapeft_dist.runtime.checkpoint import CheckpointError, list_checkpoints
    from metapeft_dist.runtime.errors import ClusterError, StallError

    progress = _ProgressPrinter(quiet or as_json)

    def log(message: str) -> None:
        click.echo(f"metapeft: {message}", err=True)

    # `metapeft stop` (Ray's job server) sends SIGTERM: end like Ctrl-C, so the run
    # directory records the job as stopped and its checkpoints stay resumable.
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        if resume_dir is not None:
            results = api.resume(resume_dir, address, on_progress=progress, log=log,
                                 invoked=metapeft_dist.IMPORTED_AT)
        else:
            results = api.run(job_spec, run_dir, address=address, on_progress=progress,
                              log=log, invoked=metapeft_dist.IMPORTED_AT)
    except (RunDirError, ClusterError, ConfigError) as err:
        fail_usage(str(err))
    except StallError as err:
        click.echo(f"error: the job failed: {err}", err=True)
        sys.exit(EXIT_FAILED)
    except (CheckpointError, OSError) as err:  # a full disk, a run directory not writable
        reason = failure_reason(err)
        if isinstance(err, OSError) and err.strerror and err.filename:
            reason += f": {err.filename}"
        where = progress.run_dir or resume_dir or run_dir
        hint = ""
        if where is not None and list_checkpoints(f"{where}/checkpoints"):
            hint = f"; its checkpoints are kept: continue with metapeft run --resume {where}"
        click.echo(f"error: the job failed: {reason}{hint}", err=True)
        sys.exit(EXIT_FAILED)
    except (KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and err.code != signal.SIGTERM:
            raise
        where = progress.run_dir or resume_dir or run_dir or "its run directory"
        click.echo(f"metapeft: stopped; continue with metapeft run --resume {where}",
                   err=True)
        sys.exit(EXIT_FAILED)
    click.echo(json.dumps(results, indent=1) if as_json else format_table(results))


@click.command()
@click.argument("spec", type=click.Path())
@overrides_option
@click.option("--json", "as_json", is_flag=True, help="Print {spec, valid, errors} as JSON.")
def validate(spec: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check SPEC and list every error with its field path (exit 2 if any)."""
    from metapeft_dist import api

    errors = api.validate(spec, overrides)
    if as_json:
        click.echo(json.dumps({"spec": spec, "valid": not errors, "errors": errors}))
    else:
        for line in errors:
            click.echo(f"error: {line}", err=True)
        if not errors:
            click.echo(f"{spec}: valid")
    sys.exit(2 if errors else 0)


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(),
              help="Write the plots here (default: RUN_DIR/report).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {written, skipped} as JSON instead of one path per line.")
def report(run_dir: str, out_dir: str | None, as_json: bool) -> None:
    """Plot the finished run in RUN_DIR as PNGs: training, shots, cost, throughput.

    A plot whose data results.json lacks (a run recorded before cost or throughput
    tracking) is skipped with its reason on stderr.
    """
    from metapeft_dist import api
    from metapeft_dist.report import ReportError

    try:
        outcome = api.report(run_dir, out_dir)
    except ReportError as err:
        fail_usage(str(err))
    if as_json:
        click.echo(json.dumps(outcome))
        return
    for path in outcome["written"]:
        click.echo(path)
    for name, reason in outcome["skipped"].items():
        click.echo(f"skipped {name}: {reason}", err=True)


def _default_outcomes() -> str:
    import os

    return os.environ.get("METAPEFT_OUTCOMES", "~/.metapeft/outcomes.jsonl")


@click.command()
@click.option("--init", "run_dir", required=True, metavar="RUN_DIR|auto|hyper",
              help="A finished text run (model.kind encoder or causal_lm) whose "
                   "meta-learned init to start from; auto: choose among the --candidate "
                   "runs' inits, their standard LoRA init and head-only tuning from the "
                   "task's embedding; hyper: generate the adapters with the hypernetwork "
                   "run among the --candidate runs.")
@click.option("--candidate", "candidates", multiple=True, type=click.Path(),
              metavar="RUN_DIR", help="With --init auto or hyper: an encoder run to choose "
                                      "from (repeat for several).")
@click.option("--data", required=True, type=click.Path(), metavar="TASK.jsonl",
              help='The new task\'s few labelled examples, lines {"text": ..., "label": ...}.')
@click.option("--holdout", type=click.Path(), metavar="HELDOUT.jsonl",
              help="Held-out examples of the same task: report accuracy on them before "
                   "and after (with --init auto, also recorded in --outcomes).")
@click.option("--steps", type=int, help="Adaptation steps (default: the run's eval.steps).")
@click.option("--out", "out_dir", type=click.Path(), help="Write the adapter here "
              "(default: RUN_DIR/adapted/<task file name>).")
@click.option("--outcomes", type=click.Path(), default=_default_outcomes,
              show_default="$METAPEFT_OUTCOMES or ~/.metapeft/outcomes.jsonl",
              help="With --init auto: recorded adaptation outcomes to predict from, and "
                   "where this one is recorded.")
@click.option("--embedding", "kind", type=click.Choice(["task2vec", "handcrafted"]),
              default="task2vec", show_default=True,
              help="With --init auto: the task embedding to compare tasks by.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def adapt(run_dir: str, candidates: tuple[str, ...], data: str, holdout: str | None,
          steps: int | None, out_dir: str | None, outcomes: str, kind: str,
          as_json: bool) -> None:
    """Fine-tune a new task from a few examples, starting from a run's meta-learned init
    (or the configuration --init auto chooses), and write its adapter (mlx-lm's format
    for a causal LM)."""
    from metapeft_dist import api
    from metapeft_dist.rundir import AdaptError
    from metapeft_dist.embed import ProbeError

    if run_dir not in ("auto", "hyper") and candidates:
        fail_usage("--candidate goes with --init auto or --init hyper")
    try:
        if run_dir == "hyper":
            report = api.adapt_hyper(candidates, data, out_dir, steps, holdout)
        elif run_dir == "auto":
            report = api.adapt_auto(candidates, data, out_dir, steps, holdout, outcomes, kind)
        else:
            report = api.adapt(run_dir, data, out_dir, steps, holdout)
    except (AdaptError, ConfigError, ProbeError) as err:
        fail_usage(str(err).splitlines()[0])
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    if "selection" in report:
        chosen = report["selection"]
        click.echo(f"chose {chosen['chosen']} by {chosen['method']}: {chosen['why']}")
    before, after = report["support_accuracy"]
    click.echo(f"{report['task']}: {len(report['labels'])} labels, {report['examples']} "
               f"examples, {report['steps']} steps in {report['seconds']:.2f} s")
    click.echo(f"  support accuracy {100 * before:.1f}% -> {100 * after:.1f}%")
    if "holdout_accuracy" in report:
        before, after = report["holdout_accuracy"]
        click.echo(f"  held-out accuracy {100 * before:.1f}% -> {100 * after:.1f}%")
    click.echo(f"  adapter: {report['adapter']}")


@click.command()
@click.option("--data", type=click.Path(), metavar="TASK.jsonl",
              help='The task\'s labelled examples, lines {"text": ..., "label": ...}.')
@click.option("--fit", type=click.Path(), metavar="FILE",
              help="Instead: train the learned embedding's network on the meta-train "
                   "categories of --family (default wordnet and fortunes) and save it here.")
@click.option("--family", "families", multiple=True,
              type=click.Choice(["wordnet", "fortunes"]),
              help="With --fit: a shipped text family to train on (repeat).")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True,
              help="With --fit: training steps (32 tasks each).")
@click.option("--init", "run_dir", type=click.Path(), metavar="RUN_DIR",
              help="Read the task through this encoder run's model (default: "
                   "all-MiniLM-L6-v2, top layer, 32 tokens).")
@click.option("--kind", type=click.Choice(["task2vec", "handcrafted", "learned"]),
              default="task2vec", show_default=True, help="Which task embedding.")
@click.option("--learned", type=click.Path(), metavar="FILE",
              help="The trained embedding network the learned kind reads with.")
@click.option("--out", type=click.Path(), metavar="FILE",
              help="Store the embedding here as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the embedding as JSON.")
def embed(data: str | None, fit: str | None, families: tuple[str, ...], steps: int,
          run_dir: str | None, kind: str, learned: str | None, out: str | None,
          as_json: bool) -> None:
    """Embed a task (a JSONL file of labelled examples) as a vector: Task2Vec, handcrafted
    features or the learned embedding; or, with --fit, train the learned embedding."""
    from pathlib import Path

    from metapeft_dist import api
    from metapeft_dist.rundir import AdaptError
    from metapeft_dist.embed import ProbeError

    if (data is None) == (fit is None):
        fail_usage("give --data TASK.jsonl to embed a task, or --fit FILE to train the "
                   "learned embedding")
    if out and Path(out).is_dir():
        fail_usage(f"--out {out} is a directory; give a file to write the embedding to")
    try:
        if fit is not None:
            result = api.fit_embedding(fit, families or ("wordnet", "fortunes"), run_dir,
                                       steps)
        else:
            result = api.embed(data, run_dir, kind, learned)
    except (AdaptError, ConfigError, ProbeError, ValueError) as err:
        fail_usage(str(err).splitlines()[0])
    if fit is not None:
        click.echo(json.dumps(result) if as_json else
                   f"learned task embedding ({result['dim']} numbers) trained on "
                   f"{', '.join(result['families'])} for {result['steps']} steps, InfoNCE "
                   f"{result['loss'][0]:.2f} -> {result['loss'][1]:.2f}: {result['file']}")
        return
    if out:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result) + "\n")
        except OSError as err:  # a full disk, a folder not writable
            fail_usage(f"cannot write {out}: {failure_reason(err)}")
    if as_json:
        click.echo(json.dumps(result))
        return
    head = ", ".join(f"{v:.4g}" for v in result["embedding"][:6])
    click.echo(f"{result['task']}: {result['kind']} embedding of {result['examples']} "
               f"examples, {len(result['labels'])} labels: {result['dim']} numbers "
               f"[{head}, ...]" + (f"; written to {out}" if out else ""))


@click.command(name="eval")
@click.option("--init", "run_dir", required=True, type=click.Path(), metavar="RUN_DIR",
              help="A finished text run whose meta-learned init to evaluate.")
@click.option("--family", type=click.Choice(["wordnet", "fortunes"]),
              help="Evaluate on this family's meta-test tasks (cross-domain); default: "
                   "the run's own family.")
@click.option("--data", type=click.Path(), metavar="DIR",
              help="Evaluate on the meta-test files of a directory of JSONL tasks.")
@click.option("--address", metavar="ADDRESS",
              help="Evaluate on the workers of the Ray cluster at ADDRESS; default: an "
                   "embedded local Ray's (in this process with --set runtime.mode=local).")
@overrides_option
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def evaluate(run_dir: str, family: str | None, data: str | None, address: str | None,
             overrides: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Compare a run's meta-learned init with the standard init (and head-only tuning)
    on held-out tasks: accuracy after every adaptation step, with 95% CIs."""
    from metapeft_dist import api
    from metapeft_dist.rundir import AdaptError
    from metapeft_dist.results import format_table
    from metapeft_dist.runtime.errors import ClusterError, StallError

    try:
        results = api.evaluate(run_dir, family, data, overrides,
                               _ProgressPrinter(quiet or as_json), address)
    except (AdaptError, ConfigError, ClusterError) as err:
        fail_usage(str(err).splitlines()[0])
    except StallError as err:
        click.echo(f"error: the evaluation failed: {err}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(json.dumps(results, indent=1) if as_json else format_table(results))

