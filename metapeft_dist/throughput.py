"""Tasks completed over time, per node: the record behind ``metapeft report``'s
throughput plot (results.json's ``runtime.throughput``), kept by both executors."""

from __future__ import annotations

import time
from typing import Any


class Throughput:
    """Tasks completed per node in fixed time bins (for the report's throughput plot);
    the bin width doubles whenever the bins would pass MAX_BINS, so a long run stays
    small."""

    MAX_BINS = 400

    def __init__(self, bin_seconds: float = 1.0, start: float | None = None):
        self.bin_seconds = bin_seconds
        self.start = time.time() if start is None else start
        self.nodes: dict[str, list[int]] = {}
        self.end = self.start  # the latest completion: where the last bin really ends
        self.first: float | None = None  # the first completion (the job's first task)

    def add(self, node: str, at: float, tasks: int) -> None:
        self.end = max(self.end, at)
        self.first = at if self.first is None else min(self.first, at)
        index = max(0, int((at - self.start) // self.bin_seconds))
        while index >= self.MAX_BINS:
            self._coarsen()
            index = max(0, int((at - self.start) // self.bin_seconds))
        bins = self.nodes.setdefault(node, [])
        bins.extend([0] * (index + 1 - len(bins)))
        bins[index] += tasks

    def _coarsen(self) -> None:
        self.bin_seconds *= 2
        for node, bins in self.nodes.items():
            self.nodes[node] = [sum(bins[i:i + 2]) for i in range(0, len(bins), 2)]

    def summary(self) -> dict[str, Any]:
        return {"bin_seconds": self.bin_seconds, "start": self.start, "end": self.end,
                "first": self.first,
                "nodes": {node: list(bins) for node, bins in self.nodes.items()}}
