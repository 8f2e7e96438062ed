"""Mask distance and the stop rule (gamma, patience), over one ratio pair and over a grid."""

from __future__ import annotations

import torch

from er_ray.convergence import Combo, StopRule, grid, mask_distance, stop_index, stop_points
from er_ray.ticket import Masks


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
    snaps = [{"head": torch.rand(3, 4, generator=gen), "ffn": torch.rand(3, 20, generator=gen)} for _ in range(n_moving)]
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
