"""The search stage on a tiny backbone and real SST-2 rows: trajectory, grid stop points, resume."""

from __future__ import annotations

import torch
from conftest import tiny_experiment

from er_ray.convergence import Combo
from er_ray.layout import TRAJECTORY_FILE
from er_ray.methods import prepare, search_stage
from er_ray.model import Coefficients, load_backbone
from er_ray.search import SearchStage, Trajectory, load_search_state, save_search_state
from er_ray.train import train


def test_search_records_every_mini_epoch(tiny_model_dir, tmp_path):
    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"search.gamma": 0.01, "search.mini_epoch_steps": 2})
    prep = prepare(cfg)
    traj = search_stage(prep)
    # 48 rows / batch 8 = 6 steps an epoch, cap 2 epochs, a mini-epoch every 2 steps; gamma 0.01 never converges
    assert [m.step for m in traj.mini_epochs] == [2, 4, 6, 8, 10, 12]
    (stop,) = traj.stops.values()
    assert stop.mini_epoch == 5 and not stop.converged
    assert traj.mini_epochs[0].head_distance is None and traj.mini_epochs[1].head_distance is not None
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
        return SearchStage(prep.cfg, model, prep.batches(cfg.search.batch_size), prep.device, prep.amp())

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
    scoped = tiny_experiment(
        tiny_model_dir, tmp_path, **over, method="earlybert", **{"sweep.methods": "[earlyrobust]"}
    )
    assert search_grid(scoped) == [Combo(0.1, 0.25, 0.3)]


def test_l1_gradient_is_lambda_times_sign():
    coefs = Coefficients(2, 3, 4)
    with torch.no_grad():
        coefs.head.copy_(torch.tensor([[0.5, -2.0, 1.0], [-0.1, 3.0, 0.7]]))
        coefs.ffn.copy_(torch.tensor([[1.0, -1.0, 0.2, -0.3], [2.0, 0.5, -4.0, 0.9]]))
    coefs.l1(0.25, 0.125).backward()
    torch.testing.assert_close(coefs.head.grad, 0.25 * coefs.head.detach().sign())
    torch.testing.assert_close(coefs.ffn.grad, 0.125 * coefs.ffn.detach().sign())


def test_search_step_applies_the_l1_gradient_once_per_optimizer_step(tiny_model_dir, tmp_path):
    """Under FreeLB with K = 3 passes, the regularizer adds lambda * sign(c) once to the coefficients'
    gradient (the authors add it on the last ascent step): with SGD at lr 1 and no clipping, a step with L1
    lands exactly lambda * sign(c) below the same step without it."""
    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"search.adversary.steps": 3})
    prep = prepare(cfg)
    start_head = torch.tensor([[0.5, -1.0, 1.5, 2.0], [-0.3, 1.0, 0.8, -2.0]])
    start_ffn = torch.linspace(-1.0, 1.0, 80).view(2, 40)

    def one_step(lambda_head: float, lambda_ffn: float) -> Coefficients:
        model = load_backbone(cfg.model.name_or_path, 2, cfg.seed)
        coefs = Coefficients.for_model(model)
        with torch.no_grad():
            coefs.head.copy_(start_head)
            coefs.ffn.copy_(start_ffn)
        coefs.attach(model)
        opt = torch.optim.SGD([*model.parameters(), *coefs.parameters()], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        torch.manual_seed(0)  # the same dropout and FreeLB start in both runs
        reg = lambda: coefs.l1(lambda_head, lambda_ffn)  # noqa: E731
        train(model, prep.batches(8), 1, opt, sched, cfg.search.adversary, 1e9, prep.device, regularizer=reg)
        return coefs

    plain, l1 = one_step(0.0, 0.0), one_step(0.01, 0.002)
    torch.testing.assert_close(plain.head - l1.head, 0.01 * start_head.sign(), rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.ffn - l1.ffn, 0.002 * start_ffn.sign(), rtol=0, atol=1e-6)


def test_search_with_l1_ends_with_smaller_coefficients_than_without(tiny_model_dir, tmp_path):
    over = {"search.gamma": 0.01, "search.mini_epoch_steps": 3, "search.max_epochs": 1}
    no_l1 = {"search.lambda_head": 0.0, "search.lambda_ffn": 0.0}
    without = search_stage(prepare(tiny_experiment(tiny_model_dir, tmp_path, **over, **no_l1)))
    with_l1 = search_stage(prepare(tiny_experiment(tiny_model_dir, tmp_path, **over)))
    # the same data order and seed: the L1 term alone pulls every coefficient further down
    a, b = with_l1.mini_epochs[-1], without.mini_epochs[-1]
    assert bool((a.head < b.head).all()) and bool((a.ffn < b.ffn).all())


def test_authors_rule_searches_to_its_decision_and_records_both_rules(tiny_model_dir, tmp_path):
    from er_ray.convergence import stop_points
    from er_ray.search import stop_point_rows

    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"search.stop_rule": "authors"})
    traj = search_stage(prepare(cfg))
    combo = Combo(0.2, 0.25, 0.3)
    stop = traj.stops[combo]
    assert traj.stop_rule == "authors" and stop.converged
    # drawn at g, decided at g + patience, and the search ran exactly that far
    assert stop.decision == stop.mini_epoch + 2 == len(traj.mini_epochs) - 1
    paper = stop_points(traj.coefficients(), [combo], 2, rule="paper")[combo]
    assert traj.other_stops.get(combo) == (paper if paper.converged else None)
    rows = stop_point_rows(traj)
    assert [(r["rule"], r["configured"]) for r in rows] == [("authors", True), ("paper", False)]
    assert rows[0]["draw_mini_epoch"] == stop.mini_epoch and rows[0]["decision_mini_epoch"] == stop.decision
    assert rows[0]["search_seconds"] == traj.mini_epochs[stop.decision].seconds
    traj.save(tmp_path / "t.pt")
    again = Trajectory.load(tmp_path / "t.pt")
    assert (again.stop_rule, again.stops, again.other_stops) == (traj.stop_rule, traj.stops, traj.other_stops)
