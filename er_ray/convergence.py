"""Ticket convergence: normalized mask distance and the stop rule (Sec. 3.3.2).

The masks at a mini-epoch depend on the pruning ratios and scope, so the search keeps coefficients and the
stop point of any (gamma, head ratio, ffn ratio) is computed from them: one trajectory serves a whole grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from er_ray.ticket import Masks, draw_masks


def mask_distance(a: Masks, b: Masks) -> tuple[float, float]:
    """Fraction of differing entries, for heads and for neurons separately."""
    return (a.head != b.head).float().mean().item(), (a.ffn != b.ffn).float().mean().item()


def stop_index(curve: Sequence[tuple[float, float]], gamma: float, patience: int) -> int | None:
    """Index into `curve` where both distances have been < gamma `patience` times in a row, else None."""
    run = 0
    for i, (dh, df) in enumerate(curve):
        run = run + 1 if (dh < gamma and df < gamma) else 0
        if run >= patience:
            return i
    return None


@dataclass(frozen=True)
class Combo:
    """One point of a sweep grid: each has its own masks and hence its own stop point."""

    gamma: float
    head_ratio: float
    ffn_ratio: float

    @property
    def ratios(self) -> tuple[float, float]:
        return (self.head_ratio, self.ffn_ratio)


@dataclass(frozen=True)
class StopPoint:
    mini_epoch: int  # index into the trajectory's mini-epochs: draw the ticket from these coefficients
    converged: bool  # False: the search cap was reached first and the last mini-epoch is used


def grid(gammas: Sequence[float], head_ratios: Sequence[float], ffn_ratios: Sequence[float]) -> list[Combo]:
    return [Combo(g, h, f) for g, h, f in itertools.product(gammas, head_ratios, ffn_ratios)]


class StopRule:
    """The live stop rule over a grid: fed one coefficient snapshot per mini-epoch."""

    def __init__(self, combos: Sequence[Combo], patience: int, scope: Literal["global", "layerwise"]) -> None:
        self.combos, self.patience, self.scope = list(combos), patience, scope
        self.masks: dict[tuple[float, float], list[Masks]] = {c.ratios: [] for c in self.combos}
        self.curves: dict[tuple[float, float], list[tuple[float, float]]] = {c.ratios: [] for c in self.combos}
        self.stops: dict[Combo, int] = {}

    def update(self, head_coef: torch.Tensor, ffn_coef: torch.Tensor) -> dict[tuple[float, float], tuple]:
        """Add a mini-epoch; returns the latest (head, ffn) distance per ratio pair (None at the first)."""
        latest = {}
        for ratios, history in self.masks.items():
            history.append(draw_masks(head_coef, ffn_coef, *ratios, scope=self.scope))
            latest[ratios] = mask_distance(history[-2], history[-1]) if len(history) > 1 else None
            if latest[ratios] is not None:
                self.curves[ratios].append(latest[ratios])
        for combo in self.combos:
            if combo not in self.stops:
                at = stop_index(self.curves[combo.ratios], combo.gamma, self.patience)
                if at is not None:
                    self.stops[combo] = at + 1  # curve index i compares mini-epochs i and i + 1
        return latest

    @property
    def done(self) -> bool:
        return len(self.stops) == len(self.combos)

    def stop_points(self) -> dict[Combo, StopPoint]:
        last = len(next(iter(self.masks.values()))) - 1
        return {c: StopPoint(self.stops[c], True) if c in self.stops else StopPoint(last, False) for c in self.combos}


def stop_points(
    coefficients: Sequence[dict[str, torch.Tensor]],
    combos: Sequence[Combo],
    patience: int,
    scope: Literal["global", "layerwise"] = "global",
) -> dict[Combo, StopPoint]:
    """Stop point of every combo, read off a recorded trajectory of coefficient snapshots."""
    rule = StopRule(combos, patience, scope)
    for snap in coefficients:
        rule.update(snap["head"], snap["ffn"])
    return rule.stop_points()
