"""An `er-ray tune` study: what it searches (dotted config keys, `tune.space`, as Optuna distributions), what it
optimises (objectives as sums of contract metrics), the config of each sampled trial, and the Optuna study
itself (its storage, resume rules, best trial and Pareto front). The space and objectives are checked before
Ray, MLflow or the study are touched.

Resume: the study lives in an RDB storage (sqlite in runtime.output_dir unless tune.storage) under a fixed name
(tune.study_name, else the config's name). Re-running the same config continues it: completed trials count
towards tune.num_samples and are not redone; trials a dead driver left RUNNING become FAIL. The study
remembers the config it was made from; `--resume` continues it even though the config changed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from er_ray import layout
from er_ray import tracking as T
from er_ray.config import TICKET_METHODS, ExperimentConfig, SweepConfig, UserError, config_from_dict
from er_ray.storage import is_uri, redact, sqlite_lock

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


# ---------------------------------------------------------------- the Optuna study


def below_floor(cfg: ExperimentConfig, clean_acc: float | None) -> bool:
    """Under tune.min_clean_acc: the trial is not attacked and not scored."""
    floor = cfg.tune.min_clean_acc
    return floor is not None and clean_acc is not None and clean_acc < floor


def open_study(cfg: ExperimentConfig, resume: bool) -> tuple[Any, Any]:
    """(study, storage): created, or loaded when the same config made it (any config with `resume`)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = layout.optuna_storage(cfg), study_name(cfg)
    with sqlite_lock(url):  # two studies starting on a new sqlite file would both create its tables
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


def best(study: Any) -> tuple[float | None, dict]:
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
