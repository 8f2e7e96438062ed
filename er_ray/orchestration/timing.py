"""Where an invocation's wall time went: the intervals in which training or attacking ran, against the wall
clock, kept per invocation in the run folder's timing.json (a resumed run never mixes invocations)."""

from __future__ import annotations

import json
import time

from er_ray import tracking as T
from er_ray.layout import RunFolder


class Busy:
    """The wall intervals of training and attacking in this invocation."""

    def __init__(self) -> None:
        self.began = time.time()
        self.intervals: list[list[float]] = []

    def add(self, start: float, end: float) -> None:
        self.intervals.append([start, end])

    def summary(self) -> dict[str, float]:
        """Wall time, the union of busy intervals, and the stages' summed time (> wall when they overlap)."""
        end = time.time()
        wall = end - self.began
        busy = union_seconds(self.intervals, self.began, end)
        stages = sum(e - s for s, e in self.intervals)
        return {
            T.WALL_SECONDS: wall,
            T.BUSY_SECONDS: busy,
            T.OVERHEAD_SHARE: 1 - busy / wall,
            T.STAGE_SECONDS: stages,
            T.CONCURRENCY: stages / wall,
        }


def union_seconds(intervals: list[list[float]], lo: float, hi: float) -> float:
    """Length of the union of [start, end] intervals, clipped to [lo, hi]."""
    total, reach = 0.0, lo
    for s, e in sorted((max(s, lo), min(e, hi)) for s, e in intervals):
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total


def record(folder: RunFolder, timing: dict[str, float], status: str) -> list[dict]:
    """Append this invocation's timing and how it ended to the folder's timing.json; returns every entry (an
    invocation killed with -9 wrote none)."""
    file = folder.timing_file
    history = json.loads(file.read_text()) if file.exists() else []
    history.append({**timing, "status": status})
    file.write_text(json.dumps(history, indent=1))
    return history


def spent_line(history: list[dict]) -> str:
    """`412 s` for a run made in one invocation, else this one's and the sum over the recorded ones."""
    this = f"{history[-1][T.WALL_SECONDS]:.0f} s"
    if len(history) == 1:
        return this
    total = sum(h[T.WALL_SECONDS] for h in history)
    return f"{this} (this invocation; {total:.0f} s over the {len(history)} recorded in timing.json)"
