"""`er-ray tune`: Optuna, through Ray Tune's OptunaSearch, over dotted config keys (`tune.space`, see `study`).

Each trial runs the whole pipeline in-process (prepare, search, the config's own ticket or the full-model
baseline, then a small attack sample when the objective names an attack metric): on a small machine a trial
never waits on tasks or actors that need its CPUs. Trials return metrics; a Tune callback turns each ended
trial into an event, which the recorder writes as one MLflow run. Resume: see `study`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter

from er_ray import events as ev
from er_ray import layout
from er_ray import tracking as T
from er_ray.config import ExperimentConfig, UserError, config_from_dict
from er_ray.methods import prepare, run_model, with_threads
from er_ray.orchestration.ray_env import init_ray
from er_ray.orchestration.study import (
    OPTUNA_TRIAL,
    Goal,
    Suggest,
    absolute_paths,
    attack_recipes,
    below_floor,
    best,
    check_objective,
    completed,
    goals,
    open_study,
    pareto_front,
    search_space,
    trial_config,
)
from er_ray.storage import Store, redact

# ---------------------------------------------------------------- one trial (runs in a Ray worker)


def evaluate_trial(cfg: ExperimentConfig, out: Path, on_epoch: Any = None) -> dict[str, Any]:
    """The whole pipeline for one sampled config, in this process: contract metrics, the objectives, and the
    device and threads the timings were measured with. `on_epoch(epoch, clean_acc)`: after each fine-tuning
    epoch but the last."""
    prep = prepare(cfg)
    prep.on_epoch = on_epoch
    c = prep.cfg
    result = run_model(prep, out)
    metrics = T.ticket_metrics(result.to_json())
    terms = check_objective(c)
    device = {T.PARAM_DEVICE: result.device, T.PARAM_THREADS: result.threads}
    if below_floor(c, result.clean_acc):  # no objective: the searcher tells Optuna PRUNED
        return {k: float(v) for k, v in metrics.items() if v is not None} | device
    recipes = attack_recipes(terms)
    if recipes:
        from er_ray.attacks import evaluate_robustness, load_victim

        model, tokenizer = load_victim(result.ticket_dir)
        acfg = c.attack.model_copy(update={"recipes": recipes, "num_examples": c.tune.attack_examples})
        rob = evaluate_robustness(
            model.to(prep.device), tokenizer, prep.eval, acfg, c.sample_seed, c.data.max_length
        )
        metrics |= T.attack_metrics(vars(rob))
    missing = [t for t in terms if metrics.get(t) is None]
    if missing:
        raise UserError(
            f"tune.objective needs {', '.join(missing)}, which method {c.method} does not produce"
        )
    values = {k: float(v) for k, v in metrics.items() if v is not None}
    for goal in goals(c):
        values[goal.name] = sum(values[t] for t in goal.terms)
    return values | device


def _trainable(config: dict[str, Any], base: dict, out_root: str, threads: int) -> None:
    cfg = with_threads(trial_config(base, {k: v for k, v in config.items() if k != OPTUNA_TRIAL}), threads)

    def on_epoch(epoch: int, acc: float) -> None:  # the scheduler's intermediate results: no objective yet
        tune.report({T.EPOCH_CLEAN_ACC: acc, "finetune_epoch": epoch})

    early = on_epoch if cfg.tune.scheduler != "none" else None
    out = Store.at(out_root) / tune.get_context().get_trial_id()
    if out.local is not None:
        tune.report(evaluate_trial(cfg, out.local, early))
        return
    with tempfile.TemporaryDirectory(prefix="er-ray-trial-") as scratch:  # this node's disk, then the store
        metrics = evaluate_trial(cfg, Path(scratch) / out.name, early)
        out.upload(Path(scratch) / out.name, last=layout.RESULT_FILE)
    tune.report(metrics)


# ---------------------------------------------------------------- the driver


class TrialEvents(tune.Callback):
    """A Tune callback: each finished or failed trial, as a `TrialFinished` event for the recorder."""

    def __init__(self, emit: Any, base: dict, study: str) -> None:
        self.emit, self.base, self.study = emit, base, study
        self.finished = 0
        self.failed = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the recorder (a thread, a queue) stays here
        return {k: v for k, v in self.__dict__.items() if k != "emit"}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "FINISHED")
        self.finished += 1

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "FAILED")
        self.failed += 1

    def _ended(self, trial: Any, status: str) -> None:
        sampled = dict(trial.config)
        number = sampled.pop(OPTUNA_TRIAL, None)
        try:
            cfg = trial_config(self.base, sampled)
        except UserError:
            cfg = None
        result = dict(trial.last_result or {})
        error = _error_line(trial) if status == "FAILED" else None
        pruned = None
        if status == "FINISHED" and not any(k.startswith(T.OBJECTIVE) for k in result):
            pruned = (
                "floor" if below_floor(config_from_dict(self.base), result.get(T.CLEAN_ACC)) else "scheduler"
            )
        self.emit(
            ev.TrialFinished(
                f"trial/{trial.trial_id}",
                self.study,
                trial.trial_id,
                number,
                sampled,
                cfg,
                result,
                status,
                error,
                pruned,
            )
        )


def _error_line(trial: Any) -> str:
    """The exception line of a failed trial's traceback (the whole file stays in Tune's trial dir)."""
    # at on_trial_error the error file is in the trial's local staging dir; get_error() reads synced storage
    path = trial.error_file
    text = Path(path).read_text(errors="replace") if path and Path(path).exists() else trial.get_error() or ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


@dataclass
class TuneSummary:
    study_name: str
    storage: str  # redacted
    num_samples: int
    completed: int  # COMPLETE trials in the study after this invocation
    new_trials: int  # finished in this invocation
    failed_trials: int  # failed (after retries) in this invocation
    interrupted: bool = False
    parent_run_id: str | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    front: list[dict[str, Any]] = field(default_factory=list)  # several objectives: the Pareto-optimal trials

    def lines(self) -> list[str]:
        out = [
            f"study '{self.study_name}' in {self.storage}: {self.completed} of {self.num_samples} trials "
            f"complete ({self.new_trials} new, {self.failed_trials} failed)"
        ]
        if self.best_value is not None:
            out.append(f"best {T.OBJECTIVE} {self.best_value:.4f} at {json.dumps(self.best_params)}")
        if self.front:
            out.append(
                f"Pareto front: {len(self.front)} trial(s) ("
                + ", ".join(f"{g.metric} {g.mode}" for g in self.goals)
                + ")"
            )
            for t in self.front:
                values = ", ".join(
                    f"{g.metric} {v:.4g}" for g, v in zip(self.goals, t["values"], strict=True)
                )
                out.append(f"  trial {t['number']}: {values} at {json.dumps(t['params'])}")
        if self.interrupted:
            out.append("interrupted: run the same command again to continue the study")
        return out


PARETO_FILE = "pareto_front.json"  # on a multi-objective study's parent run: objectives and front


def _front_json(summary: TuneSummary) -> dict[str, Any]:
    return {"objectives": [g.describe() for g in summary.goals], "front": summary.front}


def _recorder(cfg: ExperimentConfig, study: str, url: str) -> T.Recorder:
    """The invocation's run: the resolved config as params (credentials masked), provenance as tags."""
    tags, params = T.tune_parent(cfg, study, url, [g.describe() for g in goals(cfg)])
    return T.Recorder.open(cfg, f"tune-{study}", tags, params)


def _final_results_only(optuna_search: type) -> type:
    """Ray's OptunaSearch, told only final results: a scheduler's intermediate results carry no objective, and a
    trial the scheduler stopped (its last result has none) is told PRUNED, not COMPLETE with a partial value."""

    class FinalResultsOnly(optuna_search):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, str) and self.metric in result:
                super().on_trial_result(trial_id, result)

    return FinalResultsOnly


def _tuner(cfg: ExperimentConfig, study: Any, storage: Any, num_samples: int, callback: Any) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch  # imports optuna's samplers: only when a study runs

    name = study.study_name
    # a fresh seed per invocation: a resumed study must not replay its first random samples
    # TPE handles one objective and several (MOTPE); a fresh seed per invocation: a resumed study must not
    # replay its first random samples
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials))
    gs = goals(cfg)
    metric, mode = ([g.name for g in gs], [g.mode for g in gs]) if len(gs) > 1 else (gs[0].name, gs[0].mode)
    searcher = _final_results_only(OptunaSearch)(
        space=Suggest(search_space(cfg)),
        metric=metric,
        mode=mode,
        sampler=sampler,
        study_name=name,
        storage=storage,
    )
    out_root = layout.tune_folder(cfg, name)
    threads = max(1, int(cfg.ray.search_cpus))  # a trial runs as many torch threads as it holds CPUs
    trainable = tune.with_parameters(
        _trainable, base=cfg.model_dump(mode="json"), out_root=out_root.uri, threads=threads
    )
    scheduler = None
    if cfg.tune.scheduler == "asha" or cfg.tune.min_clean_acc is not None:
        # per-epoch results and trials under the accuracy floor carry no objective by design; Tune would
        # refuse them
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if cfg.tune.scheduler == "asha":
        # rungs at fine-tuning epochs 1, 2, 4, ... (iteration e = after epoch e); a trial in the lower half of
        # those that reached a rung stops there
        scheduler = tune.schedulers.ASHAScheduler(
            metric=T.EPOCH_CLEAN_ACC,
            mode="max",
            grace_period=1,
            reduction_factor=2,
            max_t=max(2, cfg.finetune.epochs),
        )
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.ray.search_cpus, "gpu": cfg.ray.search_gpus}),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.tune.max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            reuse_actors=True,  # one process imports torch once for a run of trials
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=(out_root / "ray_results").path,
            storage_filesystem=None if out_root.local is not None else out_root.fs,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_retries),
        ),
    )


def tune_study(cfg: ExperimentConfig, resume: bool = False) -> TuneSummary:
    """Run (or continue) the study until tune.num_samples trials are complete; returns what happened."""
    check_objective(cfg)
    cfg = absolute_paths(cfg)
    search_space(cfg)  # bad keys and values fail here, before Ray, MLflow or the study are touched
    study, storage = open_study(cfg, resume)
    name, url = study.study_name, redact(layout.optuna_storage(cfg))
    summary = TuneSummary(name, url, cfg.tune.num_samples, completed(study), 0, 0)
    remaining = cfg.tune.num_samples - summary.completed
    if remaining <= 0:
        summary.best_value, summary.best_params = best(study)
        summary.goals, summary.front = goals(cfg), pareto_front(study)
        return summary

    init_ray(cfg)
    T.end_stale(cfg, f"tags.`{T.TAG_STUDY}` = '{name}'")
    recorder = _recorder(cfg, name, url)
    summary.parent_run_id = recorder.parent_id
    end = ev.RunEnded("FAILED")
    try:
        trials = TrialEvents(recorder.emit, cfg.model_dump(mode="json"), name)
        _tuner(cfg, study, storage, remaining, trials).fit()
        # Tune stops gracefully on the first Ctrl-C and returns: fewer trials ended than were asked for
        summary.new_trials, summary.failed_trials = trials.finished, trials.failed
        summary.interrupted = trials.finished + trials.failed < remaining
        summary.completed = completed(study)
        summary.best_value, summary.best_params = best(study)
        summary.goals, summary.front = goals(cfg), pareto_front(study)
        metrics = {
            "trials_completed": summary.completed,
            "trials_new": trials.finished,
            "trials_failed": trials.failed,
            f"best_{T.OBJECTIVE}": summary.best_value,
        }
        status = "KILLED" if summary.interrupted else "FAILED" if trials.failed else "FINISHED"
        end = ev.RunEnded(
            status,
            metrics,
            tags={"best_params": json.dumps(summary.best_params)},
            artifacts={PARETO_FILE: _front_json(summary)} if summary.front else {},
        )
    except KeyboardInterrupt:
        end = ev.RunEnded("KILLED")
        raise
    finally:
        recorder.emit(end)
    return summary
