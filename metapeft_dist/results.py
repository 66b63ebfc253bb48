"""Human-readable views of a run's results.json."""

from __future__ import annotations

from collections import Counter
from typing import Any


def _fmt(value: float, ci: float, percent: bool) -> str:
    if percent:
        return f"{100 * value:5.1f} ± {100 * ci:4.1f}"
    return f"{value:6.3f} ± {ci:5.3f}"


def format_table(results: dict[str, Any]) -> str:
    """The evaluation as a fixed-width table: metric after 0, the inner-loop count and
    the evaluation's full number of steps, with steps-to-target, per shots and init."""
    ev = results["evaluation"]
    percent = ev["metric"] == "accuracy"
    unit = "accuracy %" if percent else ev["metric"]
    points = sorted(p for p in {0, ev["inner_steps"], ev["steps"]} if p <= ev["steps"])
    spec = results["spec"]
    fam = spec["family"]
    ways = f"{fam['ways']}-way " if fam.get("ways") else ""
    lines = [
        f"{results['job']}: {spec['algorithm']['name']} on {fam['name']} ({ways}"
        f"{ev['tasks']} meta-test tasks per row), {unit}, mean ± 95% CI",
    ]
    header = f"{'shots':>5}  {'init':<10}" + "".join(
        f"  {f'{p} step' + ('s' if p != 1 else ''):>14}" for p in points) + "  steps to target"
    lines.append(header)
    lines.append("-" * len(header))
    for shots, summary in ev["shots"].items():
        for name, entry in summary["inits"].items():
            cells = "".join(f"  {_fmt(entry['mean'][p], entry['ci95'][p], percent):>14}"
                            for p in points)
            stt = entry.get("steps_to_target")
            stt_text = "-" if "steps_to_target" not in entry else (
                f"{stt}" if stt is not None else f">{ev['steps']}")
            lines.append(f"{shots:>5}  {name:<10}{cells}  {stt_text:>15}")
        target = summary.get("target")
        if target is not None:
            shown = f"{100 * target:.1f}%" if percent else f"{target:.3f}"
            step = ev.get("target_step")
            whose = ("eval.target" if step is None and "target_step" in ev else
                     f"the meta-learned init after {step} steps" if step is not None else
                     f"random init after {ev['steps']} steps unless eval.target is set")
            lines.append(f"{'':>5}  target: {shown} ({whose})")
    finetune = ev.get("finetune")
    if finetune:
        lines.append(finetune_line(finetune, percent))
    mt = results["meta_training"]
    if mt.get("iterations_per_second"):
        lines.append(f"meta-training: {mt['iterations']} iterations in {mt['seconds']:.1f} s "
                     f"({mt['iterations_per_second']:.1f} it/s); results in "
                     f"{results['run_dir']}")
    if results.get("timing"):
        lines.append(timing_line(results["timing"]))
    failed = results.get("runtime", {}).get("workers_failed_to_start")
    if failed:
        reasons = "; ".join(reason if n == 1 else f"{reason} ({n}x)"
                            for reason, n in sorted(Counter(failed).items()))
        lines.append(f"workers: {len(failed)} of {results['runtime']['workers']} could not "
                     f"start and were left out: {reasons}")
    cost = results.get("cost")
    if cost:
        lines.append(cost_line(cost))
    return "\n".join(lines)


def timing_line(timing: dict[str, Any]) -> str:
    """Where the job's time went, in one line."""
    job = timing["job"] or float("nan")
    parts = [f"{label} {timing[key]:.1f} s ({100 * timing[key] / job:.0f}%)"
             for key, label in (("meta_training", "meta-training"),
                                ("validation", "waiting for meta-validation"),
                                ("evaluation", "final evaluation"))
             if timing.get(key) is not None]
    line = f"time: {', '.join(parts)} of {job:.1f} s"
    startup = timing.get("startup") or {}
    if startup.get("first_task") is not None:
        steps = ", ".join(f"{label} at {startup[key]:.1f} s"
                          for key, label in (("run_started", "run started"),
                                             ("job_built", "job built"), ("ray", "Ray up"),
                                             ("worker_imported", "a worker's imports done"),
                                             ("worker_built", "its job built"),
                                             ("workers", "workers answering"))
                          if key in startup)
        since = ("after the command started" if timing.get("startup_from") == "command"
                 else "in")
        line += f"; first task done {startup['first_task']:.1f} s {since} ({steps})"
    return line


def finetune_line(finetune: dict[str, Any], percent: bool) -> str:
    """The standard init fine-tuned to the target, in one line."""
    scale, unit = (100.0, "%") if percent else (1.0, "")
    last = f"{scale * finetune['mean'][-1]:.1f}{unit}" if percent else f"{finetune['mean'][-1]:.3f}"
    reached = finetune["steps_to_target"]
    outcome = (f"reaches it at step {reached}" if reached is not None else
               f"not reached in {finetune['budget']} steps ({last} at the end)")
    return (f"standard init fine-tuned ({finetune['shots']}-shot, Adam lr {finetune['lr']:.3g}, "
            f"{finetune['tasks']} tasks): {outcome}")


def cost_line(cost: dict[str, Any]) -> str:
    """Meta-training spend, per-task costs, break-even and the RQ3 ratio, in one line."""
    meta, standard = cost["per_task"]["meta"], cost["per_task"]["standard"]

    def task(entry: dict[str, Any]) -> str:
        if entry["usd"] is None:
            return "never reaches the target"
        if entry.get("reached") is False:
            return (f"at least {entry['usd']:.3g} USD (not reached in "
                    f"{entry['steps_charged']} steps)")
        return f"{entry['usd']:.3g} USD ({entry['steps_to_target']} steps)"

    # the standard init not reaching the target: its cost is a lower bound, so the
    # break-even is an upper and the ratio a lower one
    bound = bool(cost.get("bounds"))
    even = cost["break_even_tasks"]
    rq3 = cost["rq3"]
    r = rq3["ratio"]
    ratio = ("not computable" if r is None or r <= 0 else
             f"{'at least ' if bound else ''}{r:.3g}x cheaper" if r >= 1 else
             f"{1 / r:.3g}x dearer")
    even_text = (f"{'at most ' if bound else ''}{even:,.0f} tasks" if even is not None
                 else "never")
    return (f"cost: meta-training {cost['spend_usd']:.3g} USD; a {cost['shots']}-shot task "
            f"{task(meta)} from the meta-learned init vs {task(standard)} from a standard "
            f"init; break-even after {even_text}; at "
            f"{rq3['tasks']} tasks {ratio} per task than a standard init (RQ3 goal "
            f"{rq3['goal_ratio']:g}x: {'met' if rq3['met'] else 'not met'})")
