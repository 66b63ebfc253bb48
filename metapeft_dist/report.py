"""Plots of a finished run, from its results.json: training.png (meta-training loss and
meta-validation), shots.png (evaluation metric vs shots per init), cost.png (amortized
cost per task vs tasks served) and throughput.png (tasks per second per node).

A plot whose data the run does not hold (results.json written before cost or throughput
were recorded, a run with no evaluation) is skipped with its reason, never an error.
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

PLOTS = ("training", "shots", "cost", "throughput")
DPI = 120
COLORS = {"meta": "tab:blue", "random": "tab:gray", "pretrained": "tab:orange",
          "in_context": "tab:green", "in_context_chat": "tab:olive"}
INIT_LABELS = {"meta": "meta-learned", "random": "random", "pretrained": "pretrained",
               "in_context": "in-context prompting",
               "in_context_chat": "in-context prompting (chat template)"}


class ReportError(ValueError):
    """RUN_DIR cannot be reported on: it is missing or holds no readable results.json."""


class Skip(Exception):
    """A plot's data is absent from results.json; the message says what is missing."""


def load_results(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(f"{run_dir} has no results.json (not a run directory, or its run "
                          "has not finished)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} cannot be read: {err}") from None
    if not isinstance(results, dict):
        raise ReportError(f"{path} does not hold a JSON object")
    return results


# --- pure helpers: what each plot shows -------------------------------------------------

def metric_scale(metric: str) -> tuple[float, str]:
    """(factor, axis label) for an evaluation metric: accuracy in percent."""
    if metric == "accuracy":
        return 100.0, "query accuracy (%, higher is better)"
    if metric == "mse":
        return 1.0, "query MSE (lower is better)"
    return 1.0, f"query {metric}"


def loss_label(metric: str) -> str:
    return {"accuracy": "cross-entropy (nats)", "mse": "MSE"}.get(metric, "loss")


def shot_series(evaluation: dict[str, Any], step: int) -> dict[str, list[tuple[int, float, float]]]:
    """Per init, (shots, mean, 95% CI half-width) of the metric after ``step`` adaptation
    steps, in increasing shots."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for shots in sorted(evaluation["shots"], key=int):
        for name, entry in evaluation["shots"][shots]["inits"].items():
            ci = entry["ci95"][step]
            series.setdefault(name, []).append(
                (int(shots), float(entry["mean"][step]), float("nan") if ci is None else ci))
    return series


def break_even_point(cost: dict[str, Any]) -> tuple[float, float] | None:
    """(tasks served, usd per task) where the meta-learned init's amortized cost meets
    the standard init's per-task cost; None when meta-training never pays for itself.

    amortized(n) = spend / n + meta, so at n = spend / (standard - meta) it equals
    standard: the point lies on the standard line.
    """
    tasks = cost.get("break_even_tasks")
    standard = cost["per_task"]["standard"]["usd"]
    if tasks is None or standard is None or not math.isfinite(tasks):
        return None
    return float(tasks), float(standard)


def node_rates(throughput: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """Per node, (bin edges in seconds since the start, tasks per second in each bin).
    With the record's ``end`` (the latest completion), the run's last bin is cut there,
    so its rate is not diluted by the part of the bin after the run."""
    width = float(throughput["bin_seconds"])
    last = max((len(c) for c in throughput["nodes"].values()), default=0) - 1
    end = throughput.get("end")
    out = {}
    for node, counts in throughput["nodes"].items():
        edges = [i * width for i in range(len(counts) + 1)]
        if end is not None and len(counts) - 1 == last >= 0:
            edges[-1] = min(edges[-1], max(edges[-2] + 1e-3 * width,
                                           float(end) - float(throughput["start"])))
        out[node] = (edges, [c / (b - a) for c, a, b in zip(counts, edges, edges[1:],
                                                            strict=False)])
    return out


def _tasks_text(tasks: float) -> str:
    return f"{tasks:,.0f}" if tasks >= 10 else f"{tasks:.2g}"


# --- the plots --------------------------------------------------------------------------

def _figure(width: float, height: float, ncols: int = 1, sharey: bool = False):
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no
    # figure registry in a notebook or service that calls this.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False, sharey=sharey)[0]
    return fig, axes


def _heading(results: dict[str, Any]) -> str:
    spec = results.get("spec", {})
    family = spec.get("family", {}).get("name", "?")
    if spec.get("family", {}).get("ways"):
        family = f"{spec['family']['ways']}-way {family}"
    algorithm = spec.get("algorithm", {}).get("name", "?")
    return f"{results.get('job', '?')}: {algorithm} on {family}"


def plot_training(results: dict[str, Any], path: Path) -> None:
    training = results.get("meta_training") or {}
    curve = training.get("curve") or []
    if not curve:
        raise Skip("results.json has no meta-training curve")
    metric = (results.get("evaluation") or {}).get("metric")
    validation = training.get("validation") or []
    if metric is None and validation:
        metric = next(k for k in validation[0] if k != "iteration")
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = _figure(8, 4.8)
    iterations = [p["iteration"] for p in curve]
    losses = [p["loss"] for p in curve]
    ax.plot(iterations, losses, color="tab:blue", lw=1.2, label="meta-training loss")
    if min(losses) > 0 and max(losses) / min(losses) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"meta-training query loss, {loss_label(metric or '')}", color="tab:blue")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    ax.grid(alpha=0.3)
    handles = list(ax.get_lines())
    if validation and metric is not None:
        factor, label = metric_scale(metric)
        k = results.get("spec", {}).get("inner", {}).get("steps")
        twin = ax.twinx()
        twin.plot([v["iteration"] for v in validation], [factor * v[metric] for v in validation],
                  color="tab:red", marker="o", ms=4, lw=1.2,
                  label=f"meta-validation {metric}"
                        + (f" after {k} inner step{'s' if k != 1 else ''}" if k else ""))
        twin.set_ylabel(f"meta-validation {label}", color="tab:red")
        twin.tick_params(axis="y", labelcolor="tab:red")
        handles += twin.get_lines()
        selected = training.get("selected_iteration")
        if selected is not None and selected != training.get("iterations"):
            handles.append(ax.axvline(selected, color="tab:red", ls=":", lw=1,
                                      label=f"selected init (iteration {selected})"))
    # below the axes: inside, it would hide part of one curve or the other
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
               fontsize="small")
    seconds = training.get("seconds")
    timing = results.get("timing") or {}
    shares = "".join(f"; {label} {timing[key]:.1f} s" for key, label in (
        ("validation", "waiting for meta-validation"), ("evaluation", "final evaluation"))
        if timing.get(key) is not None)
    ax.set_title(f"Meta-training: {_heading(results)}"
                 + (f" ({training.get('iterations')} iterations, {seconds:.1f} s{shares})"
                    if seconds is not None else ""))
    fig.savefig(path)


def plot_shots(results: dict[str, Any], path: Path) -> None:
    evaluation = results.get("evaluation")
    if not evaluation or not evaluation.get("shots"):
        raise Skip("results.json has no evaluation")
    steps, inner = evaluation["steps"], evaluation["inner_steps"]
    points = [s for s in (inner, steps) if s <= steps]
    points = sorted(set(points))
    factor, label = metric_scale(evaluation["metric"])
    fig, axes = _figure(5.5 * len(points), 4.5, ncols=len(points), sharey=True)
    ways = results.get("spec", {}).get("family", {}).get("ways")
    shots_label = ("shots (support examples per class)" if ways
                   else "shots (support examples per task)")
    all_shots = sorted(int(s) for s in evaluation["shots"])
    spread = (all_shots[-1] - all_shots[0]) or 1
    for ax, step in zip(axes, points, strict=True):
        series = shot_series(evaluation, step)
        offsets = _dodge(len(series), 0.015 * spread)
        for (name, rows), dx in zip(series.items(), offsets, strict=True):
            ax.errorbar([s + dx for s, _, _ in rows], [factor * m for _, m, _ in rows],
                        yerr=[factor * c for _, _, c in rows], marker="o", ms=5, capsize=4,
                        lw=1.4, color=COLORS.get(name), label=INIT_LABELS.get(name, name))
        which = ("= inner-loop steps" if step == inner else "evaluation's full count")
        ax.set_title(f"after {step} adaptation step{'s' if step != 1 else ''} ({which})")
        ax.set_xticks(all_shots)
        ax.set_xlabel(shots_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", title="init", title_fontsize="small")
    fig.suptitle(f"Few-shot evaluation: {_heading(results)} "
                 f"({evaluation.get('tasks', '?')} meta-test tasks, mean ± 95% CI)")
    fig.savefig(path)


def _dodge(n: int, width: float) -> list[float]:
    """Small horizontal offsets so error bars of several inits do not hide each other."""
    return [(i - (n - 1) / 2) * width for i in range(n)]


def usd(value: float) -> str:
    """A cost as text; plain "USD" because matplotlib reads "$...$" as math."""
    return f"{value:.3g} USD"


def ratio_text(rq3: dict[str, Any]) -> str:
    """The RQ3 verdict: how the amortized cost at ``rq3["tasks"]`` tasks compares with
    the standard init's per-task cost (ratio = standard / amortized), against the goal."""
    ratio, tasks, goal = rq3.get("ratio"), rq3.get("tasks", 50), rq3.get("goal_ratio", 5.0)
    if ratio is None:
        return f"at {tasks} tasks: no ratio (the standard init never reaches the target)"
    if ratio <= 0:
        return f"at {tasks} tasks: no ratio (the standard init costs nothing: 0 steps)"
    bound = "at least " if rq3.get("lower_bound") else ""
    if ratio >= 1:
        compared = f"{bound}{ratio:.3g}x cheaper than the standard init"
    else:
        compared = f"{1 / ratio:.3g}x the standard init's cost"
    verdict = "met" if rq3.get("met") else "not met"
    return f"at {tasks} tasks: {compared}\nRQ3 goal ({goal:g}x cheaper): {verdict}"


def _steps(n: int | None) -> str:
    return "never" if n is None else f"{n} step{'s' if n != 1 else ''}"


def plot_cost(results: dict[str, Any], path: Path) -> None:
    cost = results.get("cost")
    if not cost:
        raise Skip("results.json has no cost section (run recorded before cost tracking)")
    amortized = [p for p in cost["amortized"] if p["amortized_usd_per_task"] > 0]
    if not amortized:
        raise Skip("no amortized cost curve: the meta-learned init never reached the target "
                   "(or every cost is zero)")
    standard = cost["per_task"]["standard"]
    meta = cost["per_task"]["meta"]
    fig, (ax,) = _figure(8.5, 5.2)
    ax.plot([p["tasks"] for p in amortized], [p["amortized_usd_per_task"] for p in amortized],
            color=COLORS["meta"], marker=".", lw=1.6,
            label=f"meta-learned init, amortized: {usd(cost['spend_usd'])} meta-training "
                  f"/ tasks\n+ {usd(meta['usd'])} per task ({_steps(meta['steps_to_target'])} "
                  "to target)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    rq3 = cost.get("rq3") or {}
    goal = rq3.get("goal_ratio", 5.0)
    if standard["usd"] is not None and standard["usd"] > 0:
        steps_text = (f"{_steps(standard['steps_to_target'])} to target"
                      if standard.get("reached", True) else
                      f"not reached in {_steps(standard['steps_charged'])}: at least")
        ax.axhline(standard["usd"], color=COLORS["random"], lw=1.6,
                   label=f"standard init, per task: {usd(standard['usd'])} ({steps_text})")
        ax.axhline(standard["usd"] / goal, color="tab:green", ls="--", lw=1,
                   label=f"RQ3 goal: {goal:g}x below the standard init")
    point = break_even_point(cost)
    if point is not None and point[1] > 0:
        ax.plot(*point, marker="*", ms=14, color="tab:red", ls="none",
                label=f"break-even after {_tasks_text(point[0])} tasks")
    else:
        why = ("the standard init never reaches the target" if standard["usd"] is None
               else "the meta-learned init saves nothing per task")
        ax.text(0.02, 0.04, f"never breaks even: {why}", transform=ax.transAxes,
                fontsize="small", color="tab:red",
                bbox={"facecolor": "white", "edgecolor": "tab:red", "alpha": 0.9})
    rq3_tasks = rq3.get("tasks", 50)
    at = next((p for p in amortized if p["tasks"] == rq3_tasks), None)
    if at is not None:
        ax.axvline(rq3_tasks, color="tab:green", ls=":", lw=1)
        ax.annotate(ratio_text(rq3), (rq3_tasks, at["amortized_usd_per_task"]),
                    # lower left stays clear: the amortized curve falls from upper left
                    xytext=(0.03, 0.2), textcoords="axes fraction", fontsize="small",
                    arrowprops={"arrowstyle": "->", "color": "black"},
                    bbox={"facecolor": "white", "edgecolor": "tab:green", "alpha": 0.9})
    ax.set_xlabel("tasks served from the meta-learned init")
    ax.set_ylabel("cost per task (USD)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="upper right")
    target = cost.get("target")
    target_text = ""
    if isinstance(target, int | float):
        metric = (results.get("evaluation") or {}).get("metric", "")
        factor = metric_scale(metric)[0]
        target_text = f", target {metric} {factor * target:.3g}{'%' if factor == 100 else ''}"
    ax.set_title(f"Amortized cost per task: {_heading(results)}\n"
                 f"({cost.get('shots', '?')}-shot{target_text}; adaptation "
                 f"{cost.get('step_seconds', float('nan')) * 1e3:.3g} ms per step "
                 f"at {usd(cost.get('rate_usd_per_hour', float('nan')))} per hour)")
    fig.savefig(path)


def plot_throughput(results: dict[str, Any], path: Path) -> None:
    throughput = (results.get("runtime") or {}).get("throughput")
    if not throughput or not throughput.get("nodes"):
        raise Skip("results.json has no runtime.throughput (local run, or recorded before "
                   "throughput tracking)")
    rates = node_rates(throughput)
    end = max(edges[-1] for edges, _ in rates.values())
    scale, unit = (60.0, "min") if end > 600 else (1.0, "s")
    fig, (ax,) = _figure(8.5, 4.5)
    for node, (edges, values) in rates.items():
        ax.stairs(values, [e / scale for e in edges], lw=1.4, label=node, baseline=None)
    if len(rates) > 1:
        bins = max(len(v) for _, v in rates.values())
        total = [sum(v[i] for _, v in rates.values() if i < len(v)) for i in range(bins)]
        longest = max((edges for edges, _ in rates.values()), key=len)  # cut like the rates
        ax.stairs(total, [e / scale for e in longest], color="black",
                  ls="--", lw=1.2, label="all nodes", baseline=None)
    ax.set_xlabel(f"time since meta-training started ({unit})" + (
        "" if "end" in throughput else "; the last bin may be partial"))
    ax.set_ylabel("tasks completed per second")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="node", title_fontsize="small",
              ncols=1 if len(rates) <= 8 else 2)
    ax.set_title(f"Throughput per node: {_heading(results)} "
                 f"({float(throughput['bin_seconds']):g} s bins)")
    fig.savefig(path)


DRAW: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "training": plot_training, "shots": plot_shots, "cost": plot_cost,
    "throughput": plot_throughput,
}


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Draw every plot the run's results.json has data for into ``out_dir`` (default
    RUN_DIR/report). Returns {"written": [paths], "skipped": {file name: reason}}."""
    results = load_results(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create {out}: {err.strerror or err}") from None
    written: list[str] = []
    skipped: dict[str, str] = {}
    for name in PLOTS:
        path = out / f"{name}.png"
        try:
            DRAW[name](results, path)
        except Skip as reason:
            skipped[path.name] = str(reason)
            continue
        except (KeyError, TypeError, IndexError, ValueError) as err:
            # A section in an unexpected shape (an older or newer schema) costs its plot,
            # not the report.
            skipped[path.name] = f"results.json section in an unexpected shape ({err!r})"
            continue
        except OSError as err:
            raise ReportError(f"cannot write {path}: {err.strerror or err}") from None
        written.append(str(path))
    return {"written": written, "skipped": skipped}
