"""`er-ray tune` on the tiny backbone: Optuna study in sqlite, resume, MLflow runs, failures, interrupts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from conftest import tiny_experiment
from mlflow_tree import compare, tree
from optuna.trial import TrialState

from er_ray import tracking as T
from er_ray.config import UserError
from er_ray.orchestration import optuna_tune as ot
from er_ray.orchestration import study as st
from er_ray.storage import redact

SPACE = (
    "{search.lambda_head: {kind: loguniform, low: 1.0e-4, high: 1.0e-2},"
    " finetune.lr: {kind: choice, values: [0.001, 0.002]}}"
)


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once for the session (about 4 s), or the one another test file started."""
    import ray

    from er_ray.orchestration.ray_env import init_ray

    init_ray(num_cpus=2)
    return ray


def write_config(model_dir: Path, tmp_path: Path, **over) -> Path:
    over = {
        "tune.objective": "clean_acc",
        "tune.num_samples": 2,
        "tune.space": SPACE,
        "ray.search_cpus": 1,
        "ray.max_retries": 0,
        **over,
    }
    cfg = tiny_experiment(model_dir, tmp_path / "out", **over)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def cli(*argv: object) -> int:
    from er_ray.cli import build_parser

    args = build_parser().parse_args(["tune", *map(str, argv)])
    return args.func(args)


def study_of(tmp_path: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")


def runs_of(tmp_path: Path, kind: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return [r for r in runs if r.data.tags.get(T.TAG_KIND) == kind]


def test_objective_and_space_are_checked_before_anything_runs(tiny_model_dir, tmp_path):
    assert st.objective_terms("clean_acc + aua_textfooler") == ["clean_acc", "aua_textfooler"]
    assert st.attack_recipes(["clean_acc", "aua_textbugger", "queries_textbugger"]) == ["textbugger"]
    with pytest.raises(UserError, match="unknown metric 'acc'"):
        st.objective_terms("acc")
    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"tune.space": SPACE, "sweep.gammas": "[0.1, 0.2]"})
    assert set(st.search_space(cfg)) == {"search.lambda_head", "finetune.lr"}
    assert st.trial_config(cfg.model_dump(mode="json"), {"finetune.lr": 0.002}).sweep.gammas == []
    bad = {
        "{search.lamda_head: {kind: uniform, low: 0.1, high: 0.2}}": "unknown config key",
        "{search.gamma: {kind: uniform, low: 0.5, high: 2.0}}": "2.0 is not a valid value",
        "{ray.search_cpus: {kind: int, low: 1, high: 2}}": "not tunable",
        "{search.patience: {kind: int, low: 1.5, high: 3}}": "whole-number",
        "{sweep.gammas: {kind: choice, values: [[0.1], [0.2]]}}": "numbers, strings or booleans",
    }
    for space, message in bad.items():
        with pytest.raises(UserError, match=message):
            st.search_space(tiny_experiment(tiny_model_dir, tmp_path, **{"tune.space": space}))
    ft = tiny_experiment(tiny_model_dir, tmp_path, **{"tune.objective": "clean_acc+stop_epoch"})
    assert st.check_objective(ft) == ["clean_acc", "stop_epoch"]
    ft.tune.space = {"method": {"kind": "choice", "values": ["earlyrobust", "finetune"]}}
    with pytest.raises(UserError, match="stop_epoch, which method finetune"):  # no search, no stop point
        st.check_objective(ft)
    with pytest.raises(UserError, match="tune.space is empty"):
        st.search_space(tiny_experiment(tiny_model_dir, tmp_path))
    assert redact("postgresql://me:secret@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"


@pytest.fixture
def one_torch_thread():
    """The tiny model trains in 0.3 s on one thread; two threads on a busy 2-core machine spin for 10-20 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_trial_attacks_only_what_the_objective_names(
    tiny_model_dir, tmp_path, monkeypatch, one_torch_thread
):
    import er_ray.attacks as attacks

    seen = {}

    def evaluate_robustness(model, tokenizer, dataset, cfg, seed, max_length, indices=None):
        seen.update(recipes=cfg.recipes, examples=cfg.num_examples, rows=len(dataset))
        rates = {r: 0.25 for r in cfg.recipes}
        return SimpleNamespace(aua=rates, success_rate=rates, mean_queries={r: 7.0 for r in cfg.recipes})

    monkeypatch.setattr(attacks, "evaluate_robustness", evaluate_robustness, raising=False)
    cfg = tiny_experiment(
        tiny_model_dir, tmp_path, **{"tune.attack_examples": 5, "tune.objective": "clean_acc+aua_textbugger"}
    )
    metrics = ot.evaluate_trial(cfg, tmp_path / "trial")
    assert seen == {"recipes": ["textbugger"], "examples": 5, "rows": 24}
    assert metrics[T.OBJECTIVE] == pytest.approx(metrics[T.CLEAN_ACC] + 0.25)
    assert metrics[T.queries("textbugger")] == 7.0 and (tmp_path / "trial" / "ticket.json").exists()


def test_tune_logs_every_trial_and_resumes_the_study(tiny_model_dir, tmp_path, ray_session):
    path = write_config(tiny_model_dir, tmp_path)
    assert cli(path) == 0
    study = study_of(tmp_path)
    first = {
        t.number: (t.params, t.datetime_complete) for t in study.trials if t.state == TrialState.COMPLETE
    }
    assert len(first) == 2 and all(set(p) == {"search.lambda_head", "finetune.lr"} for p, _ in first.values())
    out = tmp_path / "out"
    compare(
        tree(f"sqlite:///{out / 'mlflow.db'}", {str(out): "<out>", str(tiny_model_dir): "<model>"}),
        "tune_study",
    )
    stale = study.ask().number  # as a driver killed mid-trial leaves it: RUNNING forever

    assert cli(path, "--set", "tune.num_samples=3") == 0  # the same study, one more trial
    study = study_of(tmp_path)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    assert {t.number: (t.params, t.datetime_complete) for t in done if t.number in first} == first
    assert study.trials[stale].state == TrialState.FAIL

    parents, trials = runs_of(tmp_path, "parent"), runs_of(tmp_path, "trial")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert {r.data.tags[T.TAG_PARENT] for r in trials} == {r.info.run_id for r in parents}
    by_lambda = {str(t.params["search.lambda_head"]): t for t in done}
    for run in trials:
        t = by_lambda[run.data.params["search.lambda_head"]]  # the sampled params, as Optuna has them
        assert run.data.params["finetune.lr"] == str(t.params["finetune.lr"])
        assert run.data.params[T.PARAM_METHOD] == "earlyrobust" and run.data.params[T.PARAM_GAMMA] == "0.2"
        assert run.data.metrics[T.OBJECTIVE] == run.data.metrics[T.CLEAN_ACC] == pytest.approx(t.value)
        assert {T.SEARCH_SECONDS, T.PARAM_COUNT, T.STOP_EPOCH} <= set(run.data.metrics)
        # named after its Optuna trial, as optuna-dashboard numbers it
        assert run.data.tags[T.TAG_OPTUNA_TRIAL] == str(t.number) and run.info.run_name == f"trial-{t.number}"

    assert cli(path, "--set", "tune.num_samples=3") == 0  # complete: nothing runs, no run opened
    assert len(runs_of(tmp_path, "parent")) == 2 and len(study_of(tmp_path).trials) == 4
    with pytest.raises(UserError, match="--resume"):
        cli(path, "--set", "tune.num_samples=3", "--set", "search.lr=0.002")
    assert cli(path, "--set", "tune.num_samples=3", "--set", "search.lr=0.002", "--resume") == 0
    with pytest.raises(UserError, match="nothing to resume"):
        cli(path, "--set", "tune.study_name=other", "--resume")


def test_failed_and_interrupted_invocations_leave_no_running_run(
    tiny_model_dir, tmp_path, ray_session, monkeypatch
):
    missing = tmp_path / "no-such-model"  # valid for the schema, fails inside the trial
    space = f"{{model.name_or_path: {{kind: choice, values: [{missing}]}}}}"
    path = write_config(tiny_model_dir, tmp_path, **{"tune.num_samples": 1, "tune.space": space})
    assert cli(path) == 1
    (trial,) = runs_of(tmp_path, "trial")
    assert trial.info.status == "FAILED" and "no-such-model" in trial.data.tags[T.TAG_ERROR]
    assert [r.info.status for r in runs_of(tmp_path, "parent")] == ["FAILED"]
    assert [t.state for t in study_of(tmp_path).trials] == [TrialState.FAIL]

    from mlflow.tracking import MlflowClient
    from ray import tune

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    stale = {T.TAG_KIND: "parent", T.TAG_STUDY: "tiny"}
    client.create_run(trial.info.experiment_id, tags=stale)  # as a SIGKILLed driver leaves it: RUNNING
    monkeypatch.setattr(tune.Tuner, "fit", lambda self: None)  # as Tune returns after a first Ctrl-C
    assert cli(path) == 130

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune.Tuner, "fit", interrupt)
    assert cli(path) == 130
    statuses = sorted(r.info.status for r in runs_of(tmp_path, "parent"))
    assert statuses == ["FAILED", "KILLED", "KILLED", "KILLED"]  # the stale one, and two interrupted


def test_a_multi_objective_study_has_its_pareto_front_in_the_study_and_the_report(
    tiny_model_dir, tmp_path, ray_session, capsys
):
    import pandas as pd

    from er_ray.config import load_config
    from er_ray.report import build_report

    objectives = "[{metric: clean_acc, mode: max}, {metric: train_seconds, mode: min}]"
    path = write_config(tiny_model_dir, tmp_path, **{"tune.num_samples": 4, "tune.objectives": objectives})
    assert [g.name for g in st.goals(load_config(path))] == ["objective_0", "objective_1"]
    assert cli(path) == 0
    study = study_of(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    optuna_front = {t.number for t in study.best_trials}
    printed = capsys.readouterr().out
    assert f"Pareto front: {len(optuna_front)} trial(s)" in printed
    for run in runs_of(tmp_path, "trial"):  # each objective logged as the study saw it
        t = study.trials[int(run.data.tags[T.TAG_OPTUNA_TRIAL])]
        assert [run.data.metrics["objective_0"], run.data.metrics["objective_1"]] == pytest.approx(t.values)
        assert run.data.metrics["objective_0"] == run.data.metrics[T.CLEAN_ACC]

    result = build_report("tiny", None, tmp_path / "report", f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    csv = next(p for p in result.pareto if p.suffix == ".csv")
    trials = pd.read_csv(csv)
    assert (
        len(trials) == 4 and set(trials.loc[trials["on_front"], "trial"]) == optuna_front
    )  # as Optuna has it
    assert {p.suffix for p in result.pareto} == {".csv", ".md", ".png"}
    with pytest.raises(UserError, match="two or more"):
        load_config(path, ["tune.objectives=[{metric: clean_acc}]"])


def test_a_trial_stopped_by_the_scheduler_is_pruned_in_optuna_not_complete():
    from optuna.distributions import FloatDistribution
    from ray.tune.search.optuna import OptunaSearch

    space = st.Suggest({"finetune.lr": FloatDistribution(1e-5, 1e-3, log=True)})
    searcher = ot._final_results_only(OptunaSearch)(space=space, metric=T.OBJECTIVE, mode="max")
    stopped, finished = searcher.suggest("a"), searcher.suggest("b")
    assert {"finetune.lr", st.OPTUNA_TRIAL} <= set(stopped) and finished[st.OPTUNA_TRIAL] == 1
    searcher.on_trial_result("a", {T.EPOCH_CLEAN_ACC: 0.5, "training_iteration": 1})  # no objective yet
    searcher.on_trial_complete("a", {T.EPOCH_CLEAN_ACC: 0.5, "training_iteration": 1})  # ASHA stopped it
    searcher.on_trial_result("b", {T.EPOCH_CLEAN_ACC: 0.6, "training_iteration": 1})
    searcher.on_trial_complete("b", {T.OBJECTIVE: 0.7, "training_iteration": 2})
    trials = searcher._ot_study.trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE] and trials[1].value == 0.7


def test_asha_runs_a_study_on_per_epoch_results(tiny_model_dir, tmp_path, ray_session):
    path = write_config(
        tiny_model_dir, tmp_path, **{"tune.num_samples": 3, "tune.scheduler": "asha", "finetune.epochs": 3}
    )
    assert cli(path) == 0
    study = study_of(tmp_path)
    states = {t.number: t.state for t in study.trials}
    assert set(states.values()) <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len(states) == 3 and TrialState.COMPLETE in states.values()
    for run in runs_of(tmp_path, "trial"):  # a run is tagged stopped early exactly when Optuna pruned it
        pruned = states[int(run.data.tags[T.TAG_OPTUNA_TRIAL])] == TrialState.PRUNED
        assert (run.data.tags.get(T.TAG_STOPPED_EARLY) == "1") == pruned
        assert pruned or T.OBJECTIVE in run.data.metrics
    with pytest.raises(UserError, match="single-objective"):
        from er_ray.config import load_config

        load_config(path, ["tune.objectives=[{metric: clean_acc}, {metric: train_seconds, mode: min}]"])


def test_a_trial_under_the_clean_accuracy_floor_is_not_attacked_and_is_pruned(
    tiny_model_dir, tmp_path, ray_session, monkeypatch
):
    import er_ray.attacks as attacks

    monkeypatch.setattr(
        attacks, "evaluate_robustness", lambda *a, **k: pytest.fail("attacked"), raising=False
    )
    cfg = tiny_experiment(
        tiny_model_dir, tmp_path, **{"tune.objective": "aua_textbugger", "tune.min_clean_acc": 0.99}
    )
    metrics = ot.evaluate_trial(cfg, tmp_path / "trial")  # the tiny model's 58% (one class): a floor case
    assert metrics[T.CLEAN_ACC] < 0.99 and T.OBJECTIVE not in metrics and T.aua("textbugger") not in metrics

    path = write_config(
        tiny_model_dir,
        tmp_path,
        **{"tune.objective": "aua_textbugger", "tune.num_samples": 1, "tune.min_clean_acc": 0.99},
    )
    assert cli(path) == 0
    (trial,) = study_of(tmp_path).trials
    (run,) = runs_of(tmp_path, "trial")
    assert trial.state == TrialState.PRUNED and run.data.tags.get(T.TAG_BELOW_FLOOR) == "1"
    assert T.TAG_STOPPED_EARLY not in run.data.tags and run.info.status == "FINISHED"
    with pytest.raises(UserError, match="single-objective"):
        from er_ray.config import load_config

        load_config(path, ["tune.objectives=[{metric: clean_acc}, {metric: train_seconds, mode: min}]"])
