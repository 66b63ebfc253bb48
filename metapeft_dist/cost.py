"""The amortized-cost model: what meta-training costs, and when it has paid for itself.

A node's rate (usd per hour) is its hardware amortized over its service life plus the
energy it draws:

    rate = price / (service_life_years x 8760 h) + watts / 1000 x energy price per kWh

with ``watts`` measured where the platform reports it to an unprivileged process (Linux
RAPL package counters), else the figure declared in the spec (``cost.nodes``).

Meta-training spend is every node's reserved seconds (held by the job: from its first
worker up until meta-training ends or the node is lost) times its rate. Adapting one
held-out task costs steps-to-target x seconds per step x rate, with the meta-learned init
and with a standard one. Serving ``n`` tasks from the meta-learned init then costs, per
task,

    amortized(n) = spend / n + meta task cost

against the standard init's task cost, and meta-training breaks even after
``spend / (standard - meta)`` tasks. The seed's RQ3 asks whether amortized(50) is at
least 5x below the standard task cost; :func:`cost_summary` computes it from the
measurements, never assumes it.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import threading
import time
from typing import Any, Iterable

HOURS_PER_YEAR = 8760.0
# RQ3 (docs/research-questions.md): amortized cost 5x lower than a standard init's at 50 tasks
RQ3_TASKS = 50
RQ3_RATIO = 5.0


def hourly_rate(price_usd: float, service_life_years: float, watts: float,
                energy_usd_per_kwh: float) -> float:
    """usd per hour: hardware amortization plus energy."""
    return price_usd / (service_life_years * HOURS_PER_YEAR) + watts / 1000.0 * energy_usd_per_kwh


# --- measured power ---------------------------------------------------------------------

RAPL_ROOT = "/sys/class/powercap"


@functools.lru_cache(maxsize=8)
def _rapl_packages(root: str) -> tuple[str, ...]:
    """The package domains' energy files (looked up once: workers read them per chunk)."""
    return tuple(os.path.join(path, "energy_uj")
                 for path in sorted(glob.glob(os.path.join(root, "intel-rapl:*")))
                 # sub-domains (core, dram) are inside their package's figure
                 if os.path.basename(path).count(":") == 1)


def read_energy_joules(root: str = RAPL_ROOT) -> float | None:
    """Cumulative CPU-package energy from Linux RAPL (the sum over packages), or None
    where the platform does not report it to this process (macOS without root, VMs,
    most containers)."""
    files = _rapl_packages(root)
    if not files:
        return None
    total = 0.0
    for path in files:
        try:
            with open(path) as f:
                total += int(f.read()) / 1e6
        except (OSError, ValueError):
            return None
    return total


class PowerTracker:
    """Average watts of one node from its cumulative energy readings (with counter
    wrap-around, which RAPL does every few hours at full load, ignored: a reading that
    goes down starts a new span)."""

    def __init__(self):
        self.joules = 0.0
        self.seconds = 0.0
        self._last: tuple[float, float] | None = None

    def add(self, joules: float, at: float) -> None:
        if self._last is not None:
            last_j, last_t = self._last
            if joules >= last_j and at > last_t:
                self.joules += joules - last_j
                self.seconds += at - last_t
        self._last = (joules, at)

    def watts(self, min_seconds: float = 1.0) -> float | None:
        return self.joules / self.seconds if self.seconds >= min_seconds else None


# --- meta-training spend ----------------------------------------------------------------

class SpendMeter:
    """Reserved seconds and spend per node, thread-safe (the /metrics server reads it
    while the driver writes).

    ``nodes``: node name -> dict(price_usd, service_life_years, watts) as in the spec's
    ``cost.nodes``, with a ``default`` entry for nodes not named; ``energy_usd_per_kwh``
    the energy price. A node is found by its name (host name) or by any alias given
    when it is reserved (its IP address).
    """

    def __init__(self, nodes: dict[str, dict[str, float]], energy_usd_per_kwh: float = 0.0):
        self.nodes = nodes
        self.energy_usd_per_kwh = energy_usd_per_kwh
        self._lock = threading.Lock()
        self._open: dict[str, float] = {}  # node -> reserved since
        self._closed: dict[str, float] = {}  # node -> seconds of ended reservations
        self._declared: dict[str, dict[str, float]] = {}
        self._power: dict[str, PowerTracker] = {}

    def declared(self, node: str) -> dict[str, float]:
        return self._declared.get(node) or self.nodes.get(node) or self.nodes.get(
            "default", {"price_usd": 0.0, "service_life_years": 1.0, "watts": 0.0})

    def add_node(self, node: str, aliases: Iterable[str] = ()) -> None:
        """Fix which declared figures ``node`` uses: its own name's, else the first
        alias (e.g. its IP address) named in ``cost.nodes``, else the default."""
        with self._lock:
            if node in self._declared:
                return
            for name in (node, *aliases):
                if name in self.nodes:
                    self._declared[node] = self.nodes[name]
                    return
            self._declared[node] = self.declared(node)

    def restore(self, reserved_seconds: dict[str, float]) -> None:
        """Carry the reserved seconds of an earlier session of the job (a resumed run)."""
        with self._lock:
            for node, seconds in reserved_seconds.items():
                self._closed[node] = self._closed.get(node, 0.0) + float(seconds)

    def reserve(self, node: str, at: float | None = None) -> None:
        with self._lock:
            self._open.setdefault(node, time.time() if at is None else at)
            self._closed.setdefault(node, 0.0)

    def release(self, node: str, at: float | None = None) -> None:
        with self._lock:
            since = self._open.pop(node, None)
            if since is not None:
                self._closed[node] += max(0.0, (time.time() if at is None else at) - since)

    def release_all(self, at: float | None = None) -> None:
        at = time.time() if at is None else at
        for node in list(self._open):
            self.release(node, at)

    def power_reading(self, node: str, joules: float | None, at: float) -> None:
        if joules is None:
            return
        with self._lock:
            self._power.setdefault(node, PowerTracker()).add(joules, at)

    def watts(self, node: str) -> tuple[float, str]:
        """(watts, "measured" or "declared")."""
        tracker = self._power.get(node)
        measured = tracker.watts() if tracker is not None else None
        if measured is not None:
            return measured, "measured"
        return float(self.declared(node)["watts"]), "declared"

    def rate_usd_per_hour(self, node: str) -> float:
        d = self.declared(node)
        return hourly_rate(d["price_usd"], d["service_life_years"], self.watts(node)[0],
                           self.energy_usd_per_kwh)

    def rate_usd_per_second(self, node: str) -> float:
        return self.rate_usd_per_hour(node) / 3600.0

    def reserved_seconds(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        with self._lock:
            out = dict(self._closed)
            for node, since in self._open.items():
                out[node] = out.get(node, 0.0) + max(0.0, now - since)
            return out

    def spend_usd(self, now: float | None = None) -> float:
        return sum(seconds * self.rate_usd_per_second(node)
                   for node, seconds in self.reserved_seconds(now).items())

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Per node: reserved seconds, rate and its parts, spend; and the total."""
        reserved = self.reserved_seconds(now)
        nodes = {}
        for node, seconds in reserved.items():
            d = self.declared(node)
            watts, source = self.watts(node)
            rate = self.rate_usd_per_hour(node)
            nodes[node] = {"reserved_seconds": seconds, "rate_usd_per_hour": rate,
                           "price_usd": d["price_usd"],
                           "service_life_years": d["service_life_years"],
                           "watts": watts, "watts_source": source,
                           "spend_usd": seconds * rate / 3600.0}
        return {"nodes": nodes, "energy_usd_per_kwh": self.energy_usd_per_kwh,
                "spend_usd": sum(n["spend_usd"] for n in nodes.values())}


# --- adaptation cost, amortization, break-even ------------------------------------------

def task_cost_usd(steps: int | None, step_seconds: float, rate_usd_per_hour: float) -> float | None:
    """One task adapted to the target: steps x seconds per step x rate (None: the init
    never reached the target)."""
    if steps is None:
        return None
    return steps * step_seconds * rate_usd_per_hour / 3600.0


def amortized_usd_per_task(spend_usd: float, meta_task_usd: float, tasks: int) -> float:
    """Meta-training spread over ``tasks`` served, plus each task's own adaptation."""
    return spend_usd / tasks + meta_task_usd


def break_even_tasks(spend_usd: float, meta_task_usd: float | None,
                     standard_task_usd: float | None) -> float | None:
    """Tasks after which meta-training has paid for itself; None: never (the
    meta-learned init saves nothing per task, or never reaches the target)."""
    if meta_task_usd is None or standard_task_usd is None:
        return None
    saving = standard_task_usd - meta_task_usd
    if saving <= 0:
        return None
    return spend_usd / saving


def served_grid(top: int = 1_000_000) -> list[int]:
    """Tasks-served values for curves: 1, 2, 5, 10, 20, 50, ... up to ``top``."""
    out, decade = [], 1
    while decade <= top:
        out.extend(v for v in (decade, 2 * decade, 5 * decade) if v <= top)
        decade *= 10
    if RQ3_TASKS not in out:
        out = sorted({*out, RQ3_TASKS})
    return out


def cost_summary(spend_usd: float, step_seconds: float, rate_usd_per_hour: float,
                 steps_meta: int | None, steps_standard: int | None, target: float,
                 shots: int, standard_step_seconds: float | None = None,
                 standard_budget: int | None = None,
                 standard_how: str | None = None) -> dict[str, Any]:
    """The cost figures of a finished job, from measurements only.

    ``steps_*``: steps-to-target of the meta-learned and the standard init on held-out
    tasks (``shots`` per class), ``step_seconds`` the measured seconds per adaptation
    step of the meta-learned init (``standard_step_seconds`` the standard init's, when
    it is fine-tuned otherwise), ``rate_usd_per_hour`` the rate of the node that adapts.
    ``standard_budget``: the steps the standard init was fine-tuned for when it did not
    reach the target (``steps_standard`` None): those steps are charged, so its cost, the
    saving, the break-even and the RQ3 ratio are bounds (``standard.reached`` False)
    rather than "never"; ``standard_how`` says how it was fine-tuned.
    """
    meta = task_cost_usd(steps_meta, step_seconds, rate_usd_per_hour)
    standard_seconds = step_seconds if standard_step_seconds is None else standard_step_seconds
    reached = steps_standard is not None
    charged = steps_standard if reached else standard_budget
    standard = task_cost_usd(charged, standard_seconds, rate_usd_per_hour)
    break_even = break_even_tasks(spend_usd, meta, standard)
    curve = []
    if meta is not None:
        for n in served_grid():
            amortized = amortized_usd_per_task(spend_usd, meta, n)
            curve.append({"tasks": n, "amortized_usd_per_task": amortized,
                          "ratio": (standard / amortized if standard is not None
                                    and amortized > 0 else None)})
    at = next((p for p in curve if p["tasks"] == RQ3_TASKS), None)
    ratio = at["ratio"] if at else None
    return {
        "spend_usd": spend_usd,
        "step_seconds": step_seconds,
        "rate_usd_per_hour": rate_usd_per_hour,
        "target": target,
        "shots": shots,
        "per_task": {
            "meta": {"steps_to_target": steps_meta, "usd": meta},
            "standard": {"steps_to_target": steps_standard, "usd": standard,
                         "reached": reached, "steps_charged": charged,
                         "step_seconds": standard_seconds, "how": standard_how},
        },
        # not reached: the standard init's true cost is at least what was charged, so
        # the break-even is at most, and the ratio at least, these values
        "bounds": not reached and charged is not None,
        "break_even_tasks": break_even,
        "amortized": curve,
        "rq3": {"tasks": RQ3_TASKS, "goal_ratio": RQ3_RATIO, "ratio": ratio,
                "lower_bound": not reached and charged is not None,
                "met": bool(ratio is not None and math.isfinite(ratio) and ratio >= RQ3_RATIO)},
    }
