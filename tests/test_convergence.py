"""Mask distance and the two stop rules (gamma, patience), on hand-made masks, over one ratio pair and a grid."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch

from er_ray.convergence import (
    Combo,
    StopPoint,
    StopRule,
    grid,
    mask_distance,
    stop_index,
    stop_points,
    window_converged,
)
from er_ray.ticket import Masks


def stop_point(masks: Sequence[Masks], gamma: float, patience: int, rule: str = "paper") -> StopPoint | None:
    """Where `rule` fires on a sequence of masks (one per mini-epoch), else None (not reached)."""
    if rule == "paper":
        curve = [mask_distance(a, b) for a, b in itertools.pairwise(masks)]
        at = stop_index(curve, gamma, patience)
        return None if at is None else StopPoint(at + 1, True, at + 1)  # curve index i compares i and i + 1
    for g in range(len(masks) - patience):
        if window_converged(masks, g, gamma, patience):
            return StopPoint(g, True, g + patience)
    return None


def test_mask_distance_is_normalized_per_kind():
    a = Masks.full(2, 4, 10)
    b = Masks(a.head.clone(), a.ffn.clone())
    b.head[0, 0] = False
    b.ffn[1, :5] = False
    assert mask_distance(a, b) == (1 / 8, 5 / 20)
    assert mask_distance(a, a) == (0.0, 0.0)


def test_stop_needs_both_kinds_below_gamma_patience_times_in_a_row():
    g = 0.1
    assert stop_index([(0.05, 0.05)] * 4, g, 5) is None
    assert stop_index([(0.05, 0.05)] * 5, g, 5) == 4
    # a heads-only convergence does not count
    assert stop_index([(0.05, 0.2)] * 10, g, 5) is None
    # a break resets the count
    curve = [(0.0, 0.0)] * 4 + [(0.0, 0.3)] + [(0.0, 0.0)] * 5
    assert stop_index(curve, g, 5) == 9
    # strictly below gamma
    assert stop_index([(0.1, 0.0)] * 6, g, 5) is None


def _snapshots(n_moving: int, n_still: int, seed: int = 0):
    """Coefficients that reshuffle for `n_moving` mini-epochs and then stay put."""
    gen = torch.Generator().manual_seed(seed)
    snaps = [
        {"head": torch.rand(3, 4, generator=gen), "ffn": torch.rand(3, 20, generator=gen)}
        for _ in range(n_moving)
    ]
    return snaps + [snaps[-1]] * n_still


def test_stop_points_read_off_a_trajectory_for_each_gamma():
    snaps = _snapshots(6, 6)
    combos = grid([0.1, 0.9], [0.25], [0.3])
    stops = stop_points(snaps, combos, patience=3)
    # with gamma 0.1 the masks must stop moving: distances are 0 from mini-epoch 6 on
    assert stops[Combo(0.1, 0.25, 0.3)].mini_epoch == 8 and stops[Combo(0.1, 0.25, 0.3)].converged
    # a loose gamma stops earlier (random masks differ in well under 90% of the entries)
    assert stops[Combo(0.9, 0.25, 0.3)].mini_epoch == 3


def test_unconverged_combo_falls_back_to_the_last_point():
    stops = stop_points(_snapshots(5, 0), [Combo(0.01, 0.25, 0.3)], patience=2)
    (point,) = stops.values()
    assert point.mini_epoch == 4 and not point.converged


def test_live_rule_is_done_only_when_every_combo_converged():
    snaps = _snapshots(4, 10)
    rule = StopRule(grid([0.1], [0.25, 0.5], [0.3]), patience=2, scope="global")
    done_at = None
    for i, s in enumerate(snaps):
        latest = rule.update(s["head"], s["ffn"])
        assert (latest[(0.25, 0.3)] is None) == (i == 0)
        if rule.done and done_at is None:
            done_at = i
    assert done_at == 5


# ---------------------------------------------------------------- the authors' rule on hand-made masks


def _m(pruned_heads=(), pruned_neurons=()) -> Masks:
    """1 layer x 10 heads and 10 neurons; each listed unit pruned (one unit = distance 0.1)."""
    m = Masks.full(1, 10, 10)
    m.head[0, list(pruned_heads)] = False
    m.ffn[0, list(pruned_neurons)] = False
    return m


FAR, NEAR = _m(range(5), range(5)), _m([9], [9])


def test_authors_rule_draws_at_the_start_of_the_window_and_decides_at_its_end():
    seq = [FAR, NEAR, NEAR, NEAR, NEAR]
    # mini-epoch 1 equals each of 2 and 3: fires at g = 1, known only at g + patience = 3
    assert stop_point(seq, 0.15, 2, "authors") == StopPoint(1, True, 3)
    # the paper's rule needs 2 consecutive small distances (1-2 and 2-3) and draws where they end
    assert stop_point(seq, 0.15, 2, "paper") == StopPoint(3, True, 3)
    assert stop_point(seq[:3], 0.15, 2, "authors") is None  # the window of g = 1 is not complete yet


def test_authors_rule_refuses_a_slow_drift_the_paper_rule_accepts():
    drift = [_m(range(k), range(k)) for k in range(8)]  # one more unit pruned each mini-epoch
    # consecutive distances are 0.1 < gamma, but g and g + 2 are already 0.2 apart
    assert stop_point(drift, 0.15, 3, "paper") == StopPoint(3, True, 3)
    assert stop_point(drift, 0.15, 3, "authors") is None


def test_authors_rule_accepts_masks_that_jump_around_a_stable_one():
    a, b = _m([8], [8]), _m([9], [9])  # each 0.1 from the empty mask, 0.2 from each other
    seq = [_m(), a, b, a, b, a]
    assert stop_point(seq, 0.15, 3, "authors") == StopPoint(0, True, 3)
    assert stop_point(seq, 0.15, 3, "paper") is None  # consecutive distances are 0.2 from the second on


def test_authors_rule_needs_heads_and_neurons_both_below_gamma():
    heads_only = [_m(), _m([], range(3)), _m([], range(3, 6)), _m([], range(6, 9))]
    assert stop_point(heads_only, 0.15, 2, "authors") is None
    assert stop_point([_m()] * 3, 0.15, 2, "authors") == StopPoint(0, True, 2)
    assert stop_point([_m(), _m([1]), _m()], 0.1, 2, "authors") is None  # strictly below gamma


@pytest.mark.parametrize("rule", ["paper", "authors"])
def test_live_rule_agrees_with_the_rule_on_the_drawn_masks(rule):
    from er_ray.ticket import draw_masks

    snaps = _snapshots(5, 2, seed=3) + _snapshots(3, 6, seed=4)
    combos = grid([0.1, 0.3], [0.25], [0.3, 0.5])
    live = stop_points(snaps, combos, patience=3, rule=rule)
    for c in combos:
        masks = [draw_masks(s["head"], s["ffn"], *c.ratios) for s in snaps]
        assert live[c] == stop_point(masks, c.gamma, 3, rule), c


def test_live_authors_rule_is_done_at_the_decision_and_keeps_the_paper_point():
    snaps = _snapshots(4, 10)  # masks move until mini-epoch 3, then stay
    rule = StopRule(grid([0.1], [0.25], [0.3]), patience=2, scope="global", rule="authors")
    done_at = None
    for i, s in enumerate(snaps):
        rule.update(s["head"], s["ffn"])
        if rule.done and done_at is None:
            done_at = i
    (combo,) = rule.combos
    assert done_at == 5  # mini-epoch 3 equals 4 and 5: decided at 3 + patience
    assert rule.stop_points()[combo] == StopPoint(3, True, 5) and rule.stops == {combo: 3}
    assert rule.reached("paper")[combo] == StopPoint(5, True, 5)  # distances 3-4 and 4-5 are zero


def test_unconverged_combo_under_the_authors_rule_uses_the_last_point():
    (point,) = stop_points(_snapshots(5, 1), [Combo(0.01, 0.25, 0.3)], patience=2, rule="authors").values()
    assert point == StopPoint(5, False, 5)
