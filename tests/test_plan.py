"""`er-ray plan`: the schedule's arithmetic by hand, the step arithmetic against what a real (tiny) run did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_experiment

from er_ray.orchestration.plan import (
    SEARCH_START_S,
    Bench,
    Costs,
    Shape,
    Stops,
    study_tasks,
    sweep_tasks,
)
from er_ray.orchestration.schedule import Cluster, Task, critical_path, simulate

QUICKSTART = str(Path(__file__).parents[1] / "experiments" / "quickstart.yaml")


def bench(threads: int = 2, **ms: float) -> Bench:
    base = {"plain": 100.0, "freelb_k3": 400.0, "pgd_k3": 340.0, "ticket": 80.0, "inference": 30.0}
    return Bench({**base, **ms}, 32, 40, threads, 3, "cpu", "test CPU", "test")


# ---------------------------------------------------------------- the schedule


def test_two_tasks_on_two_cores_overlap_and_on_one_core_share_it():
    def two() -> list[Task]:
        return [Task("a", "ticket", 10, 1), Task("b", "ticket", 10, 1)]

    assert simulate(two(), Cluster(cpus=2, cores=2)) == pytest.approx(10)
    # Ray told 2 CPUs on 1 core: both start at once and take twice as long
    tasks = two()
    assert simulate(tasks, Cluster(cpus=2, cores=1)) == pytest.approx(20)
    assert [t.start for t in tasks] == [0, 0]


def test_on_oversubscribed_cores_a_multi_threaded_task_falls_behind_its_fair_share_by_the_gang_term():
    def three() -> list[Task]:
        return [Task("m", "search", 10, 1, threads=2), Task("a", "ticket", 10, 1), Task("b", "ticket", 10, 1)]

    # 4 threads on 2 cores: every thread gets s = 1/2 of a core
    fair = three()
    assert simulate(fair, Cluster(cpus=4, cores=2)) == pytest.approx(20)
    assert [t.end for t in fair] == [pytest.approx(20)] * 3
    # gang 1: the 2-thread task runs at s^2 = 1/4 (5 s done at 20 s), then alone at full speed
    gang = three()
    assert simulate(gang, Cluster(cpus=4, cores=2, gang=1.0)) == pytest.approx(25)
    assert [t.end for t in gang] == [pytest.approx(25), pytest.approx(20), pytest.approx(20)]
    # on cores not oversubscribed the term does nothing
    alone = three()
    assert simulate(alone, Cluster(cpus=4, cores=4, gang=1.0)) == pytest.approx(10)


def _oversubscription_bench():
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "oversubscription_bench.py"
    spec = importlib.util.spec_from_file_location("oversubscription_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gang_term_is_the_fit_to_the_committed_oversubscription_measurement():
    from er_ray.orchestration.plan import GANG

    fit = _oversubscription_bench().fit_gang
    # rows made at a known term come back with it
    rows = [{"fair_share": s, "multi_share": [s ** (1 + 0.5 * 2)]} for s in (1.0, 0.5, 0.25)]
    assert fit(rows, 3) == pytest.approx(0.5)
    measured = json.loads(
        (Path(__file__).parents[1] / "benchmarks/results/oversubscription-cpu.json").read_text()
    )
    assert fit(measured["rows"], measured["meta"]["threads"]) == pytest.approx(GANG, abs=0.005)


def test_a_ticket_starts_at_its_stop_point_mid_search_or_waits_for_a_cpu():
    def sweep() -> list[Task]:
        return [Task("s", "search", 10, 1), Task("t", "ticket", 6, 1, after="s", after_seconds=4)]

    tasks = sweep()
    assert simulate(tasks, Cluster(cpus=2, cores=2)) == pytest.approx(10)
    assert tasks[1].start == pytest.approx(4)
    tasks = sweep()
    assert simulate(tasks, Cluster(cpus=1, cores=1)) == pytest.approx(16)
    assert tasks[1].released == pytest.approx(4) and tasks[1].start == pytest.approx(10)


def test_attack_units_hold_back_while_a_ticket_waits_for_cpus():
    tasks = [
        Task("a", "search", 10, 1),
        Task("t1", "ticket", 2, 1),
        Task("u", "attack", 1, 1, after="t1"),
        Task("big", "ticket", 1, 2, after="a", after_seconds=1),  # waits from 1 s for both CPUs
    ]
    assert simulate(tasks, Cluster(cpus=2, cores=2)) == pytest.approx(12)
    u, big = tasks[2], tasks[3]
    assert (big.start, u.start) == (pytest.approx(10), pytest.approx(11))  # not 2: the ticket waited


def test_the_critical_path_follows_releases_back_from_the_last_task():
    tasks = [
        Task("s", "search", 10, 1),
        Task("t", "ticket", 6, 1, after="s", after_seconds=8),
        Task("u", "attack", 3, 1, after="t"),
    ]
    simulate(tasks, Cluster(cpus=2, cores=2))
    assert [t.name for t in critical_path(tasks)] == ["s", "t", "u"]
    assert tasks[2].end == pytest.approx(17)


def test_a_task_larger_than_the_cluster_is_refused():
    with pytest.raises(ValueError, match="more than the cluster has"):
        simulate([Task("s", "search", 1, 4)], Cluster(cpus=2, cores=2))


# ---------------------------------------------------------------- the cost model


def _trajectory(stop_at: int):
    import torch

    from er_ray.convergence import Combo, StopPoint
    from er_ray.search import MiniEpoch, Trajectory

    z = torch.zeros(1)
    mini = [MiniEpoch(i, 10 * i, 0.1 * i, 1.0 * i, 0.0, z, z, None, None) for i in range(10)]
    return Trajectory(mini, {Combo(0.1, 0.2, 0.3): StopPoint(stop_at, True)}, 100, 10, 5, "global")


def test_a_run_folder_gives_each_search_its_own_stop_and_any_other_the_slowest():
    from er_ray.convergence import Combo

    combo = Combo(0.1, 0.2, 0.3)
    stops = Stops({"earlyrobust/seed1": _trajectory(6), "earlyrobust/seed2": _trajectory(4)})
    assert stops.epoch(combo, "earlyrobust/seed1") == pytest.approx(0.6)
    assert stops.epoch(combo, "earlyrobust/seed2") == pytest.approx(0.4)
    assert stops.epoch(combo, "earlyrobust/seed3") == pytest.approx(0.6)  # not recorded: the slowest
    assert Stops.one(_trajectory(4)).epoch(combo, "earlyrobust/seed1") == pytest.approx(0.4)
    assert Stops(assumed=0.5).epoch(combo, "earlyrobust/seed1") == 0.5


def test_a_step_scales_with_padded_tokens_and_the_adversary_with_k():
    b = bench()
    assert b.seconds("plain", 3, 32 * 40) == pytest.approx(0.1)
    assert b.seconds("plain", 3, 16 * 40) == pytest.approx(0.05)
    # K = 6: plain + twice the measured ascent cost at K = 3
    assert b.seconds("freelb", 6, 32 * 40) == pytest.approx(0.1 + 2 * 0.3)
    assert b.seconds("pgd", 3, 32 * 40) == pytest.approx(0.34)


def test_a_task_at_other_threads_scales_the_nearest_bench_and_says_so():
    costs = Costs([bench(threads=2)])
    assert costs.step("plain", 3, 32 * 40, 1) == pytest.approx(0.2)
    assert costs.notes == ["no bench at 1 threads: the one at 2 scaled linearly"]
    costs = Costs([bench(threads=2), bench(threads=1, plain=150.0)])
    assert costs.step("plain", 3, 32 * 40, 1) == pytest.approx(0.15) and not costs.notes


def test_bench_json_as_written_by_bench_is_read(tmp_path):
    blob = {
        "model": "minilm",
        "device": "cpu",
        "device_name": "x",
        "threads": 1,
        "batch_size": 32,
        "tokens": {"sst2": 35},
        "ascent_steps": 5,
        "median_ms": {"sst2": {"fp32": {"plain": 10.0, "freelb_k5": 50.0}}},
    }
    (tmp_path / "b.json").write_text(json.dumps(blob))
    b = Bench.read(tmp_path / "b.json")
    assert (b.k, b.tokens, b.ms["freelb_k5"]) == (5, 35, 50.0)
    from er_ray.config import UserError

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not an `er-ray bench --json` file"):
        Bench.read(tmp_path / "bad.json")
    with pytest.raises(UserError, match="measured fp32, not the config's precision bf16"):
        Bench.read(tmp_path / "b.json", "bf16")
    # auto: what auto picks on this CPU when the bench has it, else what it has, said so
    from er_ray.precision import resolve

    picks = resolve("auto", "cpu")
    blob["median_ms"]["sst2"]["bf16"] = {"plain": 6.0, "freelb_k5": 30.0}
    (tmp_path / "both.json").write_text(json.dumps(blob))
    assert Bench.read(tmp_path / "both.json").ms["plain"] == (6.0 if picks == "bf16" else 10.0)
    fp32_only = Bench.read(tmp_path / "b.json")
    assert fp32_only.ms["plain"] == 10.0
    assert ("auto picks bf16 here" in fp32_only.source) == (picks == "bf16")


def test_padded_tokens_are_those_of_the_batches_training_draws(tiny_model_dir, tmp_path):
    from er_ray.methods import load_data
    from er_ray.orchestration.plan import data_shape
    from er_ray.train import Batches

    cfg = tiny_experiment(tiny_model_dir, tmp_path)
    shape, d = data_shape(cfg), load_data(cfg)
    batches = list(Batches(d.train_encoded, d.tokenizer, 8, cfg.seed).epoch(0))
    real = sum(b["input_ids"].numel() for b in batches) / len(batches)
    assert shape.rows_tokens(8, cfg.seed) == pytest.approx(real)
    assert shape.steps_per_epoch(8) == len(batches)


# ---------------------------------------------------------------- against a real run


def test_planned_steps_and_seconds_are_what_a_real_tiny_run_did(tiny_model_dir, tmp_path):
    """Search to its recorded stop, then one ticket: the plan's step counts equal the run's, and with the
    run's own seconds per step as the bench, the plan's stage seconds are the run's (no wall clock)."""
    from er_ray.methods import prepare, search_stage, ticket_pipeline
    from er_ray.orchestration.plan import data_shape

    cfg = tiny_experiment(
        tiny_model_dir, tmp_path, **{"ray.attack": "false", "ray.ticket_cpus": 1, "ray.search_cpus": 1}
    )
    prep = prepare(cfg)
    traj = search_stage(prep)
    result = ticket_pipeline(prep, traj, next(iter(traj.stops)), tmp_path / "ticket")

    # the trajectory says what its seconds were measured at (what --calibrate reads)
    assert {k: traj.meta[k] for k in ("adversary", "ascent_steps", "batch_size")} == {
        "adversary": "freelb",
        "ascent_steps": 2,
        "batch_size": 8,
    }
    shape = data_shape(cfg)
    last = traj.mini_epochs[-1]
    rows_tokens = shape.rows_tokens(8, cfg.seed)
    tokens = rows_tokens / 32  # the bench's batch of 32 rows at this many tokens
    run_bench = Bench(
        {
            "plain": 1.0,
            "freelb_k2": 1000 * last.seconds / last.step,
            "pgd_k2": 1.0,
            "ticket": 1000 * result.finetune_seconds / len(result.finetune_losses),
            "inference": 0.0,
        },
        32,
        tokens,
        1,
        2,
        "cpu",
        "this run",
        "the run's own seconds per step",
    )
    planned = sweep_tasks(cfg, shape, Costs([run_bench]), Stops.one(traj))
    search = planned.parts["search/earlyrobust/seed3"]
    assert search.steps == last.step  # the search runs to its slowest combo's decision
    assert search.train_s == pytest.approx(last.seconds, rel=1e-6)
    tickets = {k: p for k, p in planned.parts.items() if k.startswith("ticket/")}
    assert len(tickets) == len(traj.stops)
    for part in tickets.values():
        assert part.steps == len(result.finetune_losses)
        assert part.train_s == pytest.approx(result.finetune_seconds, rel=1e-6)
    # a pilot run's folder calibrates the costs: seconds per padded token-row at its recorded K and threads
    from er_ray.orchestration.planning import calibrate

    pilot = tmp_path / "pilot" / "earlyrobust" / "seed3"
    (pilot / "g").mkdir(parents=True)
    traj.save(pilot / "trajectory.safetensors")
    (pilot / "g" / "result.json").write_text((tmp_path / "ticket" / "result.json").read_text())
    costs = Costs([bench()])
    calibrate(costs, cfg, shape, tmp_path / "pilot")
    from er_ray.orchestration.planning import read_stops

    by_folder = sweep_tasks(cfg, shape, Costs([run_bench]), read_stops(tmp_path / "pilot", None))
    assert [(t.name, t.seconds, t.after_seconds) for t in by_folder.tasks] == [
        (t.name, t.seconds, t.after_seconds) for t in planned.tasks
    ]
    threads = traj.meta["threads"]
    assert costs.step("freelb", 2, 80.0, threads) == pytest.approx(
        last.seconds / last.step / rows_tokens * 80
    )
    per_ft = result.finetune_seconds / len(result.finetune_losses) / rows_tokens
    assert costs.step("ticket", 0, 80.0, result.threads) == pytest.approx(per_ft * 80)
    # read back as a study's trial folder would be: the same seconds the plan was compared with
    from er_ray.orchestration.planning import recorded

    rec = recorded(tmp_path)
    assert rec["ticket"] == {"ticket": result.finetune_seconds} and rec["wall_s"] is None
    # each ticket is released where its combo decided
    for t in planned.tasks:
        if t.kind == "ticket":
            combo = next(c for c in traj.stops if t.name.endswith(_name(c)))
            decided = traj.mini_epochs[traj.stops[combo].decision]
            at = SEARCH_START_S + decided.step / last.step * last.seconds
            assert t.after_seconds == pytest.approx(at, rel=1e-6)


def _name(combo) -> str:
    from er_ray.layout import ticket_name

    return ticket_name(combo)


def test_a_study_plans_its_trials_at_the_sampled_k_mean(tiny_model_dir, tmp_path):
    cfg = tiny_experiment(
        tiny_model_dir,
        tmp_path,
        **{
            "tune.num_samples": 3,
            "tune.space": '{"search.adversary.steps": {"kind": "int", "low": 1, "high": 5}}',
            "tune.objective": "clean_acc",
        },
    )
    shape = Shape(48, 24, [10] * 48, [10] * 24)
    costs = Costs([bench(threads=2)])
    planned = study_tasks(cfg, shape, costs, Stops(assumed=1.0))
    assert [t.name for t in planned.tasks] == ["trial/0", "trial/1", "trial/2"]
    assert any("K = 3" in n for n in costs.notes)
    search = planned.parts["search/trial0"]
    assert search.steps == 6  # one epoch of 48 rows at batch 8, mini-epochs of 1 step
    per_step = bench().seconds("freelb", 3, 8 * 10)
    assert search.train_s == pytest.approx(6 * per_step)
    ticket = planned.parts["ticket/trial0"]  # one epoch of 6 steps at the trial's 2 threads
    assert ticket.steps == 6 and ticket.train_s == pytest.approx(6 * bench().seconds("ticket", 0, 8 * 10))


# ---------------------------------------------------------------- the command


def test_plan_prints_stages_makespan_and_memory_and_writes_its_json(tmp_path, capsys):
    from er_ray.cli import main

    (tmp_path / "b.json").write_text(json.dumps(_bench_blob()))
    argv = ["plan", QUICKSTART, "--bench", str(tmp_path / "b.json"), "--workers", "2"]
    assert main([*argv, "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "assumed at epoch 0.5" in out and "critical path: search/earlyrobust/seed42" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    kinds = {r["stage"]: r["tasks"] for r in plan["stages"]}
    # one search serves the 2 x 2 sweep; 20 examples in shards of 3 per recipe for each of 4 tickets
    assert kinds == {
        "search": 1,
        "ticket": 4,
        **{f"attack {r}": 28 for r in ("textfooler", "textbugger", "bertattack")},
    }
    assert plan["makespan_s"] >= max(t["end"] for t in plan["tasks"]) - 1e-6
    assert plan["memory_gb"]["parameters_full"] == 22_713_986  # MiniLM with a 2-class head


def test_plan_refuses_a_missing_bench_file_in_one_line(capsys):
    from er_ray.cli import main

    assert main(["plan", QUICKSTART, "--bench", "/nonexistent.json"]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder: /nonexistent.json" in err and err.count("\n") == 1


def test_plan_refuses_a_trajectory_folder_without_trajectories_in_one_line(tmp_path, capsys):
    from er_ray.cli import main

    (tmp_path / "b.json").write_text(json.dumps(_bench_blob()))
    argv = ["plan", QUICKSTART, "--bench", str(tmp_path / "b.json"), "--trajectory", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--trajectory {tmp_path}: no */seed*/trajectory.safetensors" in err and err.count("\n") == 1


def test_plan_against_a_folder_that_is_no_run_says_so_in_one_line(tmp_path, capsys):
    from er_ray.cli import main

    bench_file = tmp_path / "b.json"
    bench_file.write_text(json.dumps(_bench_blob()))
    argv = ["plan", QUICKSTART, "--bench", str(bench_file), "--against", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a finished er-ray run or study folder" in err and err.count("\n") == 1


def _bench_blob() -> dict:
    """What `er-ray bench --json` writes, with `bench()`'s figures."""
    return {
        "model": "minilm",
        "device": "cpu",
        "device_name": "x",
        "threads": 2,
        "batch_size": 32,
        "tokens": {"sst2": 40},
        "ascent_steps": 3,
        "median_ms": {"sst2": {"fp32": bench().ms}},
    }


def test_plan_refuses_a_cluster_smaller_than_one_task_in_one_line(tmp_path, capsys):
    from er_ray.cli import main

    bench_file = tmp_path / "b.json"
    bench_file.write_text(json.dumps(_bench_blob()))
    assert main(["plan", QUICKSTART, "--bench", str(bench_file), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "search/earlyrobust/seed42 asks for more than the cluster has" in err and err.count("\n") == 1
