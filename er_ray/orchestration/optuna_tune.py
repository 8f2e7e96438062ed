"""`er-ray tune`: Optuna, through Ray Tune's OptunaSearch, over dotted config keys (`tune.space`).

Each trial runs the whole pipeline in-process (prepare, search, the config's own ticket or the full-model
baseline, then a small attack sample when the objective names an attack metric): on a small machine a trial
never waits on tasks or actors that need its CPUs. Trials return metrics; this driver logs them to MLflow,
one batch per trial (sqlite allows one writer).

Resume: the Optuna study lives in an RDB storage (sqlite in runtime.output_dir unless tune.storage) under a
fixed name (tune.study_name, else the config's name). Re-running the same config continues it: completed
trials count towards tune.num_samples and are not redone; trials a dead driver left RUNNING become FAIL.
The study remembers the config it was made from; `--resume` continues it even though the config changed.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from er_ray import events as ev
from er_ray import layout
from er_ray import tracking as T
from er_ray.config import TICKET_METHODS, ExperimentConfig, SweepConfig, UserError, config_from_dict
from er_ray.storage import Store, is_uri, redact

STUDY_CONFIG_ATTR = "er_ray.config"  # study user attribute: the flattened config the study was made from
SEARCH_ONLY_METRICS = (T.STOP_EPOCH, T.STOP_MINI_EPOCH, T.CONVERGED)  # blank for full-model baselines
NOT_TUNABLE = ("name", "tune", "ray", "tracking", "runtime")  # sections that say how to run, not what
# keys that may change without making a different study (how much, where and on what it runs)
UNFINGERPRINTED = (
    "ray.",
    "tracking.",
    "runtime.",
    "tune.num_samples",
    "tune.max_concurrent",
    "tune.storage",
    "tune.study_name",
)


# ---------------------------------------------------------------- config, objective and space


def objective_terms(objective: str) -> list[str]:
    """'clean_acc+aua_textfooler' -> ['clean_acc', 'aua_textfooler'], each a known contract metric."""
    terms = [t.strip() for t in objective.split("+")]
    known = set(T.TICKET_METRICS) | set(T.ATTACK_METRICS)
    for t in terms:
        if t not in known:
            raise UserError(
                f"bad tune.objective '{objective}': unknown metric '{t}' (known: {', '.join(sorted(known))})"
            )
    return terms


@dataclass(frozen=True)
class Goal:
    """One objective of the study: what the trial reports (`name`), as the sum of `terms`, and its direction."""

    name: str  # "objective" for a single-objective study, else "objective_<i>"
    metric: str  # as configured
    terms: tuple[str, ...]
    mode: str  # max | min

    @property
    def direction(self) -> str:
        return "maximize" if self.mode == "max" else "minimize"

    def describe(self) -> dict[str, str]:
        """As logged (the tune parent's `objectives` param, `pareto_front.json`) and read by the report."""
        return {"name": self.name, "metric": self.metric, "mode": self.mode}


def goals(cfg: ExperimentConfig) -> list[Goal]:
    """`tune.objectives` (a multi-objective study) when given, else `tune.objective` / `tune.mode`."""
    t = cfg.tune
    if t.objectives:
        return [
            Goal(f"{T.OBJECTIVE}_{i}", o.metric, tuple(objective_terms(o.metric)), o.mode)
            for i, o in enumerate(t.objectives)
        ]
    return [Goal(T.OBJECTIVE, t.objective, tuple(objective_terms(t.objective)), t.mode)]


def check_objective(cfg: ExperimentConfig) -> list[str]:
    """Every objective's terms, refused before any trial when a method that may be sampled cannot produce one."""
    terms = list(dict.fromkeys(t for g in goals(cfg) for t in g.terms))
    space = cfg.tune.space.get("method")
    methods = list(space.values or []) if space and space.kind == "choice" else [cfg.method]
    no_search = [m for m in methods if m not in TICKET_METHODS]
    needs_search = [t for t in terms if t in SEARCH_ONLY_METRICS]
    if no_search and needs_search:
        raise UserError(
            f"tune.objective uses {needs_search[0]}, which method {no_search[0]} (no search) lacks"
        )
    return terms


def attack_recipes(terms: list[str]) -> list[str]:
    """Only the recipes the objective needs are run (an attack costs seconds per example)."""
    return list(dict.fromkeys(T.ATTACK_METRICS[t] for t in terms if t in T.ATTACK_METRICS))


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"tune.space key '{key}': '{part}' is not a section")
        node = child
    node[leaf] = value


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> ExperimentConfig:
    """The base config (a JSON dump) with sampled values at dotted keys, validated."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        _set_dotted(raw, key, value)
    cfg = config_from_dict(raw)
    # one ticket per trial, at the config's own combo: the search then waits for no other grid point
    cfg.sweep = SweepConfig()
    return cfg


OPTUNA_TRIAL = "optuna_trial"  # a Tune trial's config constant: its Optuna trial number


class Suggest:
    """The space as a define-by-run function: Optuna's suggestions, plus the Optuna trial number as a constant
    of the Tune config, so each trial's MLflow run is named after its trial in the study. A class, not a
    closure: Tune pickles its searcher with the experiment state."""

    def __init__(self, dists: dict[str, Any]) -> None:
        self.dists = dists

    def __call__(self, trial: Any) -> dict[str, int]:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        for key, d in self.dists.items():
            if isinstance(d, CategoricalDistribution):
                trial.suggest_categorical(key, d.choices)
            elif isinstance(d, IntDistribution):
                trial.suggest_int(key, d.low, d.high, log=d.log)
            else:
                trial.suggest_float(key, d.low, d.high, log=d.log)
        return {OPTUNA_TRIAL: trial.number}


def search_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """tune.space as Optuna distributions; both bounds (every choice) must make a valid config."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not cfg.tune.space:
        raise UserError(
            "tune.space is empty: declare the keys to search, "
            "e.g. search.lambda_head: {kind: loguniform, low: 1.0e-5, high: 1.0e-3}"
        )
    base = cfg.model_dump(mode="json")
    dists: dict[str, Any] = {}
    for key, p in cfg.tune.space.items():
        if key.split(".")[0] in NOT_TUNABLE:
            raise UserError(f"tune.space key '{key}': {key.split('.')[0]} is not tunable")
        if p.kind == "choice":
            bad = [v for v in p.values or [] if v is not None and not isinstance(v, (bool, int, float, str))]
            if bad:
                raise UserError(
                    f"tune.space.{key}: choices must be numbers, strings or booleans, got {bad[0]!r}"
                )
            dists[key], probes = CategoricalDistribution(p.values), list(p.values or [])
        elif p.kind == "int":
            if p.low != int(p.low) or p.high != int(p.high):
                raise UserError(f"tune.space.{key}: an int range needs whole-number bounds")
            dists[key], probes = IntDistribution(int(p.low), int(p.high)), [int(p.low), int(p.high)]
        else:
            dists[key], probes = FloatDistribution(p.low, p.high, log=p.kind == "loguniform"), [p.low, p.high]
        for value in probes:  # catch typos and impossible values here, not in trial after trial
            try:
                trial_config(base, {key: value})
            except UserError as err:
                raise UserError(f"tune.space.{key}: {value!r} is not a valid value ({err})") from None
    return dists


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Tune runs each trial in its own directory: relative paths would point elsewhere there."""
    cfg = cfg.model_copy(deep=True)
    if not is_uri(cfg.runtime.output_dir):
        cfg.runtime.output_dir = str(Path(cfg.runtime.output_dir).expanduser().resolve())
    for attr in ("train_file", "eval_file"):
        if getattr(cfg.data, attr) is not None:
            setattr(cfg.data, attr, Path(getattr(cfg.data, attr)).expanduser().resolve())
    model = Path(cfg.model.name_or_path).expanduser()
    if model.exists():
        cfg.model.name_or_path = str(model.resolve())
    return cfg


def study_name(cfg: ExperimentConfig) -> str:
    return cfg.tune.study_name or cfg.name


def fingerprint(cfg: ExperimentConfig) -> dict[str, str]:
    flat = T.flatten(cfg.model_dump(mode="json"))
    return {k: json.dumps(v) for k, v in flat.items() if not k.startswith(UNFINGERPRINTED)}


# ---------------------------------------------------------------- one trial (runs in a Ray worker)


def evaluate_trial(cfg: ExperimentConfig, out: Path, on_epoch: Any = None) -> dict[str, Any]:
    """The whole pipeline for one sampled config, in this process: contract metrics, the objectives, and the
    device and threads the timings were measured with. `on_epoch(epoch, clean_acc)`: after each fine-tuning
    epoch but the last."""
    from er_ray.methods import prepare, run_model

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


def below_floor(cfg: ExperimentConfig, clean_acc: float | None) -> bool:
    """Under tune.min_clean_acc: the trial is not attacked and not scored."""
    floor = cfg.tune.min_clean_acc
    return floor is not None and clean_acc is not None and clean_acc < floor


def _trainable(config: dict[str, Any], base: dict, out_root: str, threads: int) -> None:
    from ray import tune

    from er_ray.methods import with_threads

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


def open_study(cfg: ExperimentConfig, resume: bool) -> tuple[Any, Any]:
    """(study, storage): created, or loaded when the same config made it (any config with `resume`)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = layout.optuna_storage(cfg), study_name(cfg)
    storage = optuna.storages.RDBStorage(url)
    directions = [g.direction for g in goals(cfg)]
    now = fingerprint(cfg)
    if name not in optuna.get_all_study_names(storage):
        if resume:
            raise UserError(f"nothing to resume: no study '{name}' in {redact(url)}")
        study = optuna.create_study(study_name=name, storage=storage, directions=directions)
        study.set_user_attr(STUDY_CONFIG_ATTR, now)
        return study, storage
    study = optuna.load_study(study_name=name, storage=storage)
    if [d.name.lower() for d in study.directions] != directions:
        had = ", ".join(d.name.lower() for d in study.directions)
        raise UserError(
            f"study '{name}' in {redact(url)} has the directions ({had}), not "
            f"({', '.join(directions)}): other objectives need another tune.study_name"
        )
    before = study.user_attrs.get(STUDY_CONFIG_ATTR, {})
    changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    if changed and not resume:
        raise UserError(
            f"study '{name}' in {redact(url)} was made from another config (changed: "
            f"{', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}); pass --resume to "
            f"continue it anyway, or set tune.study_name"
        )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)  # left by a driver that died: never to be told
    return study, storage


def completed(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class TrialEvents:
    """Each finished or failed trial, as a `TrialFinished` event for the recorder.

    Mixed into a `ray.tune.Callback` by `tune_study` (importing ray.tune here would slow every CLI call).
    """

    def __init__(self, emit: Any, base: dict, study: str) -> None:
        self.emit, self.base, self.study = emit, base, study
        self.finished = 0
        self.failed = 0

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


def _best(study: Any) -> tuple[float | None, dict]:
    if not completed(study) or len(study.directions) > 1:
        return None, {}
    return study.best_value, dict(study.best_params)


def pareto_front(study: Any) -> list[dict[str, Any]]:
    """A multi-objective study's Pareto-optimal trials (Optuna's `best_trials`), by trial number."""
    if len(study.directions) < 2 or not completed(study):
        return []
    return [
        {"number": t.number, "values": list(t.values), "params": dict(t.params)}
        for t in sorted(study.best_trials, key=lambda t: t.number)
    ]


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
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

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
    from ray import tune

    from er_ray.orchestration.ray_env import init_ray

    check_objective(cfg)
    cfg = absolute_paths(cfg)
    search_space(cfg)  # bad keys and values fail here, before Ray, MLflow or the study are touched
    study, storage = open_study(cfg, resume)
    name, url = study.study_name, redact(layout.optuna_storage(cfg))
    summary = TuneSummary(name, url, cfg.tune.num_samples, completed(study), 0, 0)
    remaining = cfg.tune.num_samples - summary.completed
    if remaining <= 0:
        summary.best_value, summary.best_params = _best(study)
        summary.goals, summary.front = goals(cfg), pareto_front(study)
        return summary

    init_ray(cfg)
    T.end_stale(cfg, f"tags.`{T.TAG_STUDY}` = '{name}'")
    recorder = _recorder(cfg, name, url)
    summary.parent_run_id = recorder.parent_id
    end = ev.RunEnded("FAILED")
    try:
        events = type("TrialEventsCallback", (TrialEvents, tune.Callback), {})
        trials = events(recorder.emit, cfg.model_dump(mode="json"), name)
        _tuner(cfg, study, storage, remaining, trials).fit()
        # Tune stops gracefully on the first Ctrl-C and returns: fewer trials ended than were asked for
        summary.new_trials, summary.failed_trials = trials.finished, trials.failed
        summary.interrupted = trials.finished + trials.failed < remaining
        summary.completed = completed(study)
        summary.best_value, summary.best_params = _best(study)
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
