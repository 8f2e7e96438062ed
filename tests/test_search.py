"""The search stage on a tiny backbone and real SST-2 rows: trajectory, grid stop points, resume."""

from __future__ import annotations

import torch
from conftest import tiny_experiment

from er_ray.convergence import Combo
from er_ray.methods import prepare, search_stage
from er_ray.model import load_backbone
from er_ray.search import TRAJECTORY_FILE, SearchStage, Trajectory, load_search_state, save_search_state


def test_search_records_every_mini_epoch_and_l1_shrinks_coefficients(tiny_model_dir, tmp_path):
    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"search.gamma": 0.01, "search.mini_epoch_steps": 2})
    prep = prepare(cfg)
    traj = search_stage(prep)
    # 48 rows / batch 8 = 6 steps an epoch, cap 2 epochs, a mini-epoch every 2 steps; gamma 0.01 never converges
    assert [m.step for m in traj.mini_epochs] == [2, 4, 6, 8, 10, 12]
    (stop,) = traj.stops.values()
    assert stop.mini_epoch == 5 and not stop.converged
    assert traj.mini_epochs[0].head_distance is None and traj.mini_epochs[1].head_distance is not None
    last = traj.mini_epochs[-1]
    assert last.head.abs().mean() < 1.0 and last.ffn.abs().mean() < 1.0  # the L1 term pulls them down
    secs = [m.seconds for m in traj.mini_epochs]
    assert secs == sorted(secs) and secs[0] > 0
    traj.save(tmp_path / TRAJECTORY_FILE)
    again = Trajectory.load(tmp_path / TRAJECTORY_FILE)
    assert again.stops == traj.stops and torch.equal(again.mini_epochs[3].ffn, traj.mini_epochs[3].ffn)
    # the sweep-cost benchmark reads stop points for other gammas off the same file
    from er_ray.bench import sweep_cost

    cost = sweep_cost(str(tmp_path / TRAJECTORY_FILE), [0.5, 0.9])
    assert 0 < cost["sweep_over_single"] <= 1  # looser gammas stop no later than the capped 0.01
    assert 1 <= cost["separate_over_sweep"] <= 2


def test_gamma_read_off_one_trajectory_equals_its_own_search(tiny_model_dir, tmp_path):
    sweep = tiny_experiment(tiny_model_dir, tmp_path, **{"sweep.gammas": "[0.3, 0.02]"})
    single = tiny_experiment(tiny_model_dir, tmp_path, **{"search.gamma": 0.3})
    swept = search_stage(prepare(sweep))
    alone = search_stage(prepare(single))
    combo = Combo(0.3, 0.25, 0.3)
    assert swept.stops[combo] == alone.stops[combo]
    assert len(swept.mini_epochs) >= len(alone.mini_epochs)  # it ran on for the tighter gamma
    assert torch.equal(swept.at(combo).head, alone.at(combo).head)
    assert torch.equal(swept.at(combo).ffn, alone.at(combo).ffn)


def test_resume_from_a_saved_checkpoint_continues_the_same_search(tiny_model_dir, tmp_path):
    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"search.gamma": 0.01})
    prep = prepare(cfg)

    def stage():
        model = load_backbone(cfg.model.name_or_path, 2, cfg.seed)
        return SearchStage(prep.cfg, model, prep.batches(cfg.search.batch_size), prep.device)

    whole = stage().run()
    first = stage()
    first.run(on_mini_epoch=lambda p: (save_search_state(first, tmp_path), True)[1] if p.index == 4 else None)
    resumed = stage()
    assert load_search_state(resumed, tmp_path) and not load_search_state(stage(), tmp_path / "empty")
    rest = resumed.run()
    assert [m.step for m in rest.mini_epochs] == [m.step for m in whole.mini_epochs]
    torch.testing.assert_close(rest.mini_epochs[-1].ffn, whole.mini_epochs[-1].ffn)


def test_sweep_grid_cross_and_method_scoping(tiny_model_dir, tmp_path):
    from er_ray.search import search_grid

    over = {"sweep.gammas": "[0.1, 0.2]", "sweep.ffn_ratios": "[0.3, 0.4]", "search.gamma": 0.1}
    full = search_grid(tiny_experiment(tiny_model_dir, tmp_path, **over))
    assert len(full) == 4 and full[0] == Combo(0.1, 0.25, 0.3)  # the config's own combo leads
    cross = search_grid(tiny_experiment(tiny_model_dir, tmp_path, **over, **{"sweep.mode": "cross"}))
    assert set(cross) == {Combo(0.1, 0.25, 0.3), Combo(0.2, 0.25, 0.3), Combo(0.1, 0.25, 0.4)}
    scoped = tiny_experiment(tiny_model_dir, tmp_path, **over, method="earlybert", **{"sweep.methods": "[earlyrobust]"})
    assert search_grid(scoped) == [Combo(0.1, 0.25, 0.3)]
