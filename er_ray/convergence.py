"""Ticket convergence: normalized mask distance and the two stop rules.

* `paper` (Sec. 3.3.2): the distance between *consecutive* mini-epochs is < gamma for heads and neurons
  `patience` times in a row; the ticket is drawn at the end of that window, where the rule also decides.
* `authors` (their code's `choose_slimming_step`): the masks at mini-epoch g are compared with *each* of
  g+1 ... g+patience; the rule fires when all those distances are < gamma for heads and neurons. The ticket
  is drawn at g, but the rule can only decide at g+patience, so a search runs (and is timed) up to there.

The masks at a mini-epoch depend on the pruning ratios and scope, so the search keeps coefficients and the
stop point of any (gamma, head ratio, ffn ratio) under either rule is computed from them: one trajectory
serves a whole grid, and both rules are read off the same trajectory.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from er_ray.config import STOP_RULES as RULES
from er_ray.config import StopRuleName
from er_ray.ticket import Masks, draw_masks


def other_rule(rule: str) -> str:
    return "authors" if rule == "paper" else "paper"


def mask_distance(a: Masks, b: Masks) -> tuple[float, float]:
    """Fraction of differing entries, for heads and for neurons separately: an exact count over the size, in
    Python floats (a float32 mean put 4 of 200 below gamma = 0.02, where "< gamma" must be false)."""
    return (
        (a.head != b.head).sum().item() / a.head.numel(),
        (a.ffn != b.ffn).sum().item() / a.ffn.numel(),
    )


def _below(d: tuple[float, float], gamma: float) -> bool:
    return d[0] < gamma and d[1] < gamma


def stop_index(curve: Sequence[tuple[float, float]], gamma: float, patience: int) -> int | None:
    """Index into `curve` (consecutive distances) where both have been < gamma `patience` times in a row."""
    run = 0
    for i, d in enumerate(curve):
        run = run + 1 if _below(d, gamma) else 0
        if run >= patience:
            return i
    return None


def window_converged(masks: Sequence[Masks], g: int, gamma: float, patience: int) -> bool:
    """The authors' test at mini-epoch g: masks[g] is within gamma of each of masks[g+1 .. g+patience]."""
    if g < 0 or g + patience >= len(masks):
        return False
    return all(_below(mask_distance(masks[g], masks[g + k]), gamma) for k in range(1, patience + 1))


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
    # where the rule decided (authors: mini_epoch + patience); None = at mini_epoch (old trajectories)
    decided_at: int | None = None

    @property
    def decision(self) -> int:
        """The mini-epoch up to which the search had to run to know this point (its search time)."""
        return self.mini_epoch if self.decided_at is None else self.decided_at


def grid(gammas: Sequence[float], head_ratios: Sequence[float], ffn_ratios: Sequence[float]) -> list[Combo]:
    return [Combo(g, h, f) for g, h, f in itertools.product(gammas, head_ratios, ffn_ratios)]


class StopRule:
    """The live stop rules over a grid, fed one coefficient snapshot per mini-epoch.

    Both rules are tracked; `rule` is the configured one: it decides `done`, `stops` and `stop_points()`.
    """

    def __init__(
        self,
        combos: Sequence[Combo],
        patience: int,
        scope: Literal["global", "layerwise"],
        rule: StopRuleName = "paper",
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown stop rule {rule!r}; expected one of {RULES}")
        self.combos, self.patience, self.scope, self.rule = list(combos), patience, scope, rule
        self.masks: dict[tuple[float, float], list[Masks]] = {c.ratios: [] for c in self.combos}
        self.curves: dict[tuple[float, float], list[tuple[float, float]]] = {c.ratios: [] for c in combos}
        self.fired: dict[str, dict[Combo, StopPoint]] = {r: {} for r in RULES}

    def update(self, head_coef: torch.Tensor, ffn_coef: torch.Tensor) -> dict[tuple[float, float], tuple]:
        """Add a mini-epoch; returns the latest (head, ffn) distance per ratio pair (None at the first)."""
        latest = {}
        for ratios, history in self.masks.items():
            history.append(draw_masks(head_coef, ffn_coef, *ratios, scope=self.scope))
            latest[ratios] = mask_distance(history[-2], history[-1]) if len(history) > 1 else None
            if latest[ratios] is not None:
                self.curves[ratios].append(latest[ratios])
        for combo in self.combos:
            history, now = self.masks[combo.ratios], len(self.masks[combo.ratios]) - 1
            paper, authors = self.fired["paper"], self.fired["authors"]
            if combo not in paper:
                at = stop_index(self.curves[combo.ratios], combo.gamma, self.patience)
                if at is not None:
                    paper[combo] = StopPoint(at + 1, True, at + 1)  # curve index i compares i and i + 1
            # each g is tested once, when its window is complete: the first g that passes is the earliest
            g = now - self.patience
            if combo not in authors and window_converged(history, g, combo.gamma, self.patience):
                authors[combo] = StopPoint(g, True, now)
        return latest

    @property
    def stops(self) -> dict[Combo, int]:
        """Combo -> mini-epoch to draw at, for the combos where the configured rule has decided."""
        return {c: p.mini_epoch for c, p in self.fired[self.rule].items()}

    @property
    def done(self) -> bool:
        return len(self.fired[self.rule]) == len(self.combos)

    def reached(self, rule: str | None = None) -> dict[Combo, StopPoint]:
        """The combos where `rule` (default: the configured one) has fired so far, and where."""
        return dict(self.fired[rule or self.rule])

    def stop_points(self) -> dict[Combo, StopPoint]:
        """Every combo under the configured rule; one that has not converged falls back to the last point."""
        last = len(next(iter(self.masks.values()))) - 1
        fired = self.fired[self.rule]
        return {c: fired.get(c, StopPoint(last, False, last)) for c in self.combos}


def stop_points(
    coefficients: Sequence[dict[str, torch.Tensor]],
    combos: Sequence[Combo],
    patience: int,
    scope: Literal["global", "layerwise"] = "global",
    rule: StopRuleName = "paper",
) -> dict[Combo, StopPoint]:
    """Stop point of every combo under `rule`, read off a recorded trajectory of coefficient snapshots."""
    return replay(coefficients, combos, patience, scope, rule).stop_points()


def replay(
    coefficients: Sequence[dict[str, torch.Tensor]],
    combos: Sequence[Combo],
    patience: int,
    scope: Literal["global", "layerwise"] = "global",
    rule: StopRuleName = "paper",
) -> StopRule:
    """A `StopRule` fed a recorded trajectory: both rules' stop points are then on it."""
    live = StopRule(combos, patience, scope, rule)
    for snap in coefficients:
        live.update(snap["head"], snap["ffn"])
    return live
