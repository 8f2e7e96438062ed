"""MLflow: the one module that writes it. The contract of run kinds, parameter and metric names; where the
store and its artifacts live; the parent run with provenance; child runs keyed for resume; batched logging.

`er-ray run`, `er-ray tune` and `er-ray report` all log through here; the report and the MLflow UI
comparison rely on these names, defined here once.

Runs of one invocation:
  parent (kind=parent)  the whole `er-ray run` / `er-ray tune` invocation: resolved config, provenance
    search (kind=search)   one search stage: per-mini-epoch curves (step = mini-epoch index), trajectory
    ticket (kind=ticket)   one (method, gamma, ratios) ticket or baseline model: results, ticket files,
                           and the attack summary metrics copied from its attack run (one row per ticket)
      attack (kind=attack) one robustness evaluation: per-attack metrics, per-example results

mlflow and the torch side of er-ray (search, export) are imported where they are used: the report and the CLI
read the names above without paying for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from er_ray import data, layout
from er_ray import events as ev
from er_ray.config import UserError, settings
from er_ray.layout import RESULT_FILE, STOP_POINTS_FILE, TICKET_FILE
from er_ray.storage import redact, sqlite_lock

# ---------------------------------------------------------------- the contract

TAG_KIND = "er_ray.kind"  # parent | search | ticket | attack | trial
TAG_NAME = "er_ray.name"  # the config's `name`
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
TAG_KEY = "er_ray.key"  # a child run's work item (search / ticket / attack), so a resume never logs it twice
TAG_ROOT = "er_ray.root"  # every child run: the parent run of its invocation (attack runs nest deeper)
TAG_STUDY = "er_ray.study"  # trials of `er-ray tune`: the Optuna study
TAG_TRIAL_ID = "er_ray.trial_id"  # the Ray Tune trial
TAG_OPTUNA_TRIAL = "er_ray.optuna_trial"  # its number in the Optuna study (the run is named trial-<number>)
TAG_ERROR = "er_ray.error"  # a failed trial's error, one line
OBJECTIVE = "objective"  # the tuned objective of a trial; objective_<i> for each of several
EPOCH_CLEAN_ACC = (
    "epoch_clean_acc"  # a tune trial's clean accuracy after each fine-tuning epoch (step = epoch)
)
TAG_STOPPED_EARLY = "er_ray.stopped_early"  # "1" on a tune trial its scheduler stopped (Optuna: PRUNED)
TAG_BELOW_FLOOR = (
    "er_ray.below_min_clean_acc"  # "1" on a tune trial under tune.min_clean_acc (Optuna: PRUNED)
)
PARAM_OBJECTIVES = "objectives"  # a tune parent: JSON list of {name, metric, mode}
TAG_ATTEMPTS = "er_ray.attempts"  # a search, ticket or attack run whose work was retried: how many starts
TAG_PRIMARY = "er_ray.primary"  # "1" on the ticket at the config's own gamma and ratios (Table 1's row)
TAG_SHARED = "er_ray.shared_with"  # a combo whose masks equal another's: the ticket run holding the weights
TAG_MODEL = "er_ray.model"  # a ticket run's logged model name: runs:/<ticket run>/<this>
TAG_NOTE = "mlflow.note.content"  # MLflow's description of an experiment or a run
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI opens an experiment in its model-training view ...
EXPERIMENT_KIND = "custom_model_development"  # ... with this, not the GenAI (traces) view
TAG_VIEW = "mlflow.sharedViewState."  # + key: a runs-table view (filter, columns) the UI opens by URL
VIEW_KEY = "er-ray-tickets"  # the ticket comparison of `er-ray ui`
KINDS = ("parent", "search", "ticket", "attack", "trial")

PARAM_METHOD = "method"
PARAM_DATASET = "dataset"
PARAM_MODEL = "model"
PARAM_GAMMA = "gamma"
PARAM_HEAD_RATIO = "head_ratio"
PARAM_FFN_RATIO = "ffn_ratio"
PARAM_DEVICE = "device"  # timing conditions, stated by the report
PARAM_THREADS = "threads"
PARAM_SEED = "seed"  # the training seed (a sweep dimension like gamma)
PARAM_TICKETS_PLANNED = "tickets_planned"  # on a run parent: the tickets it makes (a report says N of these)
PARAM_PRECISION = "precision"  # what runtime.precision resolved to on the device (fp32, bf16, fp16)
PARAMS = (
    PARAM_METHOD,
    PARAM_DATASET,
    PARAM_MODEL,
    PARAM_GAMMA,
    PARAM_HEAD_RATIO,
    PARAM_FFN_RATIO,
    PARAM_SEED,
)

CLEAN_ACC = "clean_acc"  # fraction in [0, 1]
SEARCH_SECONDS = "search_seconds"
FINETUNE_SECONDS = "finetune_seconds"
TRAIN_SECONDS = "train_seconds"  # search + fine-tune, compute only (no data I/O)
MASK_DISTANCE_HEADS = "mask_distance_heads"  # per mini-epoch (step = mini-epoch index)
MASK_DISTANCE_FFN = "mask_distance_ffn"
SEARCH_LOSS = "search_loss"  # per mini-epoch
STOP_EPOCH = "stop_epoch"
STOP_MINI_EPOCH = "stop_mini_epoch"
CONVERGED = "converged"  # 1 = the stop rule fired, 0 = the search cap was used
PARAM_COUNT = "param_count"
SIZE_MB = "size_mb"
LATENCY_MS = "latency_ms"
# the parent run of `er-ray run`: where this invocation's wall time went
WALL_SECONDS = "wall_seconds"
BUSY_SECONDS = "busy_seconds"  # union of the intervals in which training or attacking ran
OVERHEAD_SHARE = "overhead_share"  # 1 - busy / wall
STAGE_SECONDS = "stage_seconds"  # sum of every stage's own time (> wall when stages overlap)
CONCURRENCY = "concurrency"  # stage_seconds / wall


def aua(attack: str) -> str:
    """Accuracy under attack, fraction in [0, 1]."""
    return f"aua_{attack}"


def queries(attack: str) -> str:
    """Mean number of model queries per attacked example."""
    return f"queries_{attack}"


def success_rate(attack: str) -> str:
    return f"success_rate_{attack}"


ATTACKS = ("textfooler", "textbugger", "bertattack")
# short method names for run names: the MLflow UI cuts a run name near 15 characters
METHOD_SHORT = {
    "finetune": "FT",
    "earlybert": "EB",
    "pgd": "PGD",
    "freelb": "FreeLB",
    "earlyrobust": "ER",
    "earlyrobust-no-l1": "ER-noL1",
    "earlyrobust-random": "ER-rand",
    "earlyrobust-random-layerwise": "ER-randLW",
    "earlyrobust-reinit": "ER-reinit",
    "earlyrobust-no-structure": "ER-nostruct",
}
PROVENANCE_PACKAGES = ("torch", "transformers", "textattack", "ray", "mlflow", "er-ray")  # version.<pkg> tags
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "mlflow")  # pinned to what ran

# ---------------------------------------------------------------- store


def existing_store(uri: str) -> str:
    """`uri`, unless it is a sqlite file that does not exist (opening it would create an empty store)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}; pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    return uri


def open_store(cfg: Any) -> tuple[Any, str]:
    """(client, experiment id) of the config's experiment in its store (`layout.tracking_uri`), created if new."""
    from mlflow.tracking import MlflowClient

    uri = layout.tracking_uri(cfg)
    # not MLflow's "Creating/Updating database tables" on every start
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    name = layout.experiment_name(cfg)
    # two runs starting on a new sqlite store would both create its tables (MlflowClient does, at once) and
    # its experiment: one at a time
    with sqlite_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp:
            return client, exp.experiment_id
        tags = {
            TAG_EXPERIMENT_KIND: EXPERIMENT_KIND,
            TAG_NOTE: f"er-ray (EarlyRobust on Ray) runs of config '{cfg.name}'. Each `er-ray run` or "
            "`er-ray tune` is a parent run; ticket runs (tags.`er_ray.kind` = 'ticket') are the rows to "
            "compare; `er-ray ui` opens that comparison.",
        }
        location = layout.artifact_location(uri)
        return client, client.create_experiment(name, artifact_location=location, tags=tags)


def ticket_view(uri: str, experiment: str) -> str:
    """Make `experiment` (by name) open in the UI's model-training view, with a saved runs-table view under
    `VIEW_KEY`: ticket runs only, parents expanded, the columns of Table 1 shown. Returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no experiment '{experiment}' in the MLflow store {redact(uri)}")
    parents = client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'parent'", max_results=1000)
    params = (PARAM_METHOD, PARAM_SEED, PARAM_DATASET, PARAM_GAMMA, PARAM_FFN_RATIO, PARAM_HEAD_RATIO)
    metrics = (CLEAN_ACC, *map(aua, ATTACKS), *map(queries, ATTACKS), TRAIN_SECONDS, STOP_EPOCH)
    view = {
        "searchFilter": f"tags.`{TAG_KIND}` = 'ticket'",
        "orderByKey": f"params.`{PARAM_METHOD}`",
        "orderByAsc": True,
        "selectedColumns": [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics],
        "runsExpanded": {r.info.run_id: True for r in parents},
    }
    client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    client.set_experiment_tag(exp.experiment_id, TAG_VIEW + VIEW_KEY, json.dumps(view))
    return exp.experiment_id


def end_stale(cfg: Any, filter_string: str) -> None:
    """Runs matching `filter_string` that a killed driver left RUNNING end KILLED."""
    client, exp_id = open_store(cfg)
    running = f"{filter_string} and attributes.status = 'RUNNING'"
    for r in client.search_runs([exp_id], filter_string=running, max_results=1000):
        client.set_terminated(r.info.run_id, "KILLED")


def now_ms(t: float | None = None) -> int:
    """MLflow's timestamps: milliseconds since the epoch (of `t`, a time.time(), or now)."""
    return int((time.time() if t is None else t) * 1000)


# ---------------------------------------------------------------- what each kind of run holds


def run_name(cfg: Any, combo: Any = None, kind: str = "ticket") -> str:
    """A child run's name, short and distinct in the UI's narrow column: `ER s42 γ0.1 f0.3 h0.17` (a ticket),
    `FreeLB s42` (a baseline), `search ER s42`, `attack ER s42 γ0.1 f0.3 h0.17`."""
    parts = [METHOD_SHORT.get(cfg.method, cfg.method), f"s{cfg.seed}"]
    if combo is not None:
        parts += [f"γ{combo.gamma:g}", f"f{combo.ffn_ratio:g}", f"h{combo.head_ratio:.2g}"]
    return " ".join(parts if kind == "ticket" else [kind, *parts])


def model_name(cfg: Any, combo: Any) -> str:
    """A ticket's logged MLflow model: what it is, readable in the UI's Models list (not "model"), e.g.
    `sst2-earlyrobust-seed42-g0_1-f0_3-h0_17` (MLflow refuses `/ : . % " '` in model names)."""
    parts = [_dataset_name(cfg.data), cfg.method, f"seed{cfg.seed}"]
    if combo is not None:
        parts += [f"g{combo.gamma:g}", f"f{combo.ffn_ratio:g}", f"h{combo.head_ratio:.2g}"]
    return re.sub(r"[/:.%\"']", "_", "-".join(parts))


def model_params(cfg: Any, combo: Any) -> dict[str, Any]:
    """What a ticket or trial trained: method, data, model and its combo (blank gamma, zero ratios without one)."""
    return {
        PARAM_METHOD: cfg.method,
        PARAM_DATASET: _dataset_name(cfg.data),
        PARAM_MODEL: cfg.model.name_or_path,
        PARAM_GAMMA: combo.gamma if combo else None,
        PARAM_HEAD_RATIO: combo.head_ratio if combo else 0.0,
        PARAM_FFN_RATIO: combo.ffn_ratio if combo else 0.0,
    }


def search_params(cfg: Any, adversary: str) -> dict[str, Any]:
    from er_ray.search import search_grid

    return {
        PARAM_METHOD: cfg.method,
        PARAM_SEED: cfg.seed,
        PARAM_DATASET: _dataset_name(cfg.data),
        PARAM_MODEL: cfg.model.name_or_path,
        "combos": json.dumps([vars(x) for x in search_grid(cfg)]),
        "scope": cfg.prune.scope,
        "adversary": adversary,
        "lambda_head": cfg.search.lambda_head,
        "lambda_ffn": cfg.search.lambda_ffn,
        "patience": cfg.search.patience,
    }


def ticket_metrics(r: Mapping[str, Any]) -> dict[str, float | None]:
    """A TicketResult (as JSON, or a tune trial's reported result) as contract metrics."""
    converged = r.get("converged")
    return {
        CLEAN_ACC: r.get("clean_acc"),
        SEARCH_SECONDS: r.get("search_seconds"),
        FINETUNE_SECONDS: r.get("finetune_seconds"),
        TRAIN_SECONDS: r.get("train_seconds"),
        STOP_EPOCH: r.get("stop_epoch"),
        STOP_MINI_EPOCH: r.get("stop_mini_epoch"),
        CONVERGED: None if converged is None else float(converged),
        PARAM_COUNT: r.get("param_count"),
        SIZE_MB: r.get("size_mb"),
        LATENCY_MS: r.get("latency_ms"),
    }


TICKET_METRICS = tuple(ticket_metrics({}))


def attack_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """An attack summary (or a trial's robustness result) as aua_/queries_/success_rate_<recipe> metrics."""
    out = {}
    for recipe, value in summary["aua"].items():
        out[aua(recipe)] = value
        out[queries(recipe)] = summary["mean_queries"][recipe]
        out[success_rate(recipe)] = summary["success_rate"][recipe]
    return out


ATTACK_METRICS = {f(r): r for r in ATTACKS for f in (aua, queries, success_rate)}  # name -> recipe


def attack_params(cfg: Any, examples: int, combo: Any = None) -> dict[str, Any]:
    """How a ticket of `cfg` (its method, seed, γ and ratios) is attacked."""
    a = cfg.attack
    return model_params(cfg, combo) | {
        "recipes": ",".join(a.recipes),
        "resources": a.resources,
        "num_examples": examples,
        "actors": a.actors,
        "attack_seed": cfg.sample_seed,
        PARAM_SEED: cfg.seed,
    }


def planned_tickets(cfg: Any) -> int:
    """The tickets a run makes: one per combo of its grid for each ticket method and seed, one per baseline and
    seed (a combo whose masks equal another's counts: it gets a run of its own)."""
    from er_ray.search import search_grid

    runs = [cfg.for_method(m, s) for m in cfg.methods() for s in cfg.seeds()]
    return sum(len(search_grid(c)) if c.uses_ticket() else 1 for c in runs)


def run_parent(cfg: Any, run_dir: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(tags, params) of an `er-ray run` parent: what it sweeps, and how many tickets (for a partial report)."""
    params = {
        "methods": ",".join(cfg.methods()),
        "seeds": ",".join(map(str, cfg.seeds())),
        PARAM_DATASET: _dataset_name(cfg.data),
        PARAM_MODEL: cfg.model.name_or_path,
        PARAM_SEED: cfg.seed,
        "run_dir": run_dir,
        PARAM_TICKETS_PLANNED: planned_tickets(cfg),
    }
    note = (
        f"`er-ray run` of config '{cfg.name}': {', '.join(cfg.methods())} on {params[PARAM_DATASET]} with "
        f"{params[PARAM_MODEL]}, seeds {params['seeds']}, {params[PARAM_TICKETS_PLANNED]} tickets planned. "
        f"Children: one search run per method and seed, one ticket run per model (its attack run below it). "
        f"Run folder: {run_dir}"
    )
    return {"run_dir": run_dir, TAG_NOTE: note}, params


def tune_parent(cfg: Any, study: str, storage: str, objectives: list[dict]) -> tuple[dict[str, str], dict]:
    """(tags, params) of an `er-ray tune` parent: the whole resolved config, the study and its objectives."""
    params = flatten(cfg.model_dump(mode="json"))
    params |= {PARAM_OBJECTIVES: json.dumps(objectives), "study": study, "storage": storage}
    note = f"`er-ray tune` of config '{cfg.name}': Optuna study '{study}'; one child run per trial."
    return {TAG_STUDY: study, "er_ray.command": "tune", TAG_NOTE: note}, params


def _dataset_name(data_cfg: Any) -> str:
    return data.dataset_name(data_cfg)


# ---------------------------------------------------------------- the recorder


@dataclass
class _Run:
    """A child run the recorder knows: opened here, or found in the store on resume."""

    run_id: str
    status: str
    metrics: set[str] = field(default_factory=set)  # metric keys logged
    steps: set[int] = field(default_factory=set)  # a search's mini-epochs logged


class Recorder:
    """Turns the drivers' events (`er_ray.events`) into MLflow runs: the one writer of a run's MLflow tree.

    Every child run is keyed by its unit of work (`TAG_KEY`) and tagged with its parent run (`TAG_ROOT`), so a
    resumed invocation finds every run of the sweep, attack runs (children of ticket runs) included. Opening
    and finishing are idempotent: a FINISHED unit is never logged twice, a unit redone after an interruption
    reopens its own run (one key, one row), and runs a dead driver left RUNNING end KILLED on resume. Runs
    open when their work starts and close when it ends, at the times the workers reported, so MLflow's run
    times are the stages' real times.

    It writes in the background, in the order of the events: while the store does not answer the run says so
    once (`note`) and goes on training and attacking; what was held back is written when the store answers.
    A run that ends first leaves it unwritten, and loses nothing: every result is in the run folder, and
    `--resume` replays what the store lacks (the recorder logs only what a unit's run does not hold yet).
    """

    def __init__(self, client: Any, experiment_id: str, parent_id: str, inputs: list[Any]) -> None:
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.uri = client.tracking_uri
        self.inputs = inputs  # the data splits, logged on the parent and on every ticket and trial run
        self.runs: dict[str, _Run] = {}
        self.combos: dict[str, Any] = {}  # ticket key -> its combo (its attack run carries γ and ratios)
        self.sharers: dict[str, list[str]] = {}  # ticket key -> keys of combos sharing its weights
        self.attacked: dict[str, dict[str, float]] = {}  # ticket key -> its attack metrics
        self.note: Callable[[str], None] = _note  # how the recorder tells the user (the CLI: its console)
        self._queue: queue.Queue = queue.Queue()
        self._failure: BaseException | None = None  # a write that failed for good, raised by the next emit
        self._down = False  # the store has not answered; said once
        threading.Thread(target=self._write, daemon=True, name="er-ray-recorder").start()

    # ------------------------------------------------------------ the parent

    @classmethod
    def open(
        cls,
        cfg: Any,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        artifacts: dict[str, Any] | None = None,
    ) -> Recorder:
        """A new parent run with provenance, params, the data splits and JSON artifacts."""
        client, exp_id = open_store(cfg)
        parent = client.create_run(
            exp_id, run_name=name, tags={TAG_KIND: "parent", TAG_NAME: cfg.name, **tags}
        )
        parent_id = parent.info.run_id
        try:
            inputs = dataset_inputs(cfg.data, settings().data_dir)
            log_batch(
                client,
                parent_id,
                params=params,
                tags=provenance(data.local_files(cfg.data, settings().data_dir)),
            )
            client.log_inputs(parent_id, datasets=inputs)
            for file, obj in (artifacts or {}).items():
                log_json(client, parent_id, obj, file)
        except BaseException:
            client.set_terminated(parent_id, "FAILED")
            raise
        return cls(client, exp_id, parent_id, inputs)

    @classmethod
    def for_run(cls, cfg: Any, folder: layout.RunFolder, resume: bool) -> Recorder:
        """The parent run of an `er-ray run` folder: reopened on resume, else new (its id written into it)."""
        if resume and folder.parent_id_file.exists():
            return cls.reopen(cfg, folder.parent_id_file.read_text().strip())
        tags, params = run_parent(cfg, str(folder.root))
        config = {layout.CONFIG_FILE: cfg.model_dump(mode="json")}
        recorder = cls.open(cfg, f"{cfg.name}-{folder.name}", tags, params, artifacts=config)
        try:
            folder.create(recorder.parent_id)
        except BaseException:
            recorder.emit(ev.RunEnded("FAILED"))
            raise
        return recorder

    @classmethod
    def reopen(cls, cfg: Any, parent_id: str) -> Recorder:
        """An earlier parent run continued: every child run of it is found by its key (runs written before the
        root tag by their nesting) and those a dead driver left RUNNING end KILLED."""
        client, exp_id = open_store(cfg)
        client.update_run(parent_id, status="RUNNING")
        rec = cls(client, exp_id, parent_id, dataset_inputs(cfg.data, settings().data_dir))
        for run in rec._children():
            key, status = run.data.tags.get(TAG_KEY), run.info.status
            if status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
                status = "KILLED"
            known = rec.runs.get(key) if key else None
            if key and (known is None or (known.status != "FINISHED" and status == "FINISHED")):
                rec.runs[key] = _Run(run.info.run_id, status, set(run.data.metrics))
        return rec

    def _children(self) -> list[Any]:
        def search(filt: str) -> list[Any]:
            return list(self.client.search_runs([self.experiment_id], filter_string=filt, max_results=50000))

        found = {r.info.run_id: r for r in search(f"tags.`{TAG_ROOT}` = '{self.parent_id}'")}
        # stores written before the root tag: the parent's children, and the attack runs below them
        direct = {r.info.run_id: r for r in search(f"tags.`{TAG_PARENT}` = '{self.parent_id}'")}
        attacks = [
            r for r in search(f"tags.`{TAG_KIND}` = 'attack'") if r.data.tags.get(TAG_PARENT) in direct
        ]
        found |= direct | {r.info.run_id: r for r in attacks}
        return sorted(found.values(), key=lambda r: r.info.start_time)

    def close(self, status: str) -> None:
        """End every child still open here (KILLED unless the parent FINISHED) and then the parent."""
        for key, run in self.runs.items():
            if run.status == "RUNNING":
                self._finish(key, "KILLED" if status != "FINISHED" else "FAILED")
        self.client.set_terminated(self.parent_id, status)

    # ------------------------------------------------------------ events

    def emit(self, event: Any) -> None:
        """Queue `event` for the writer; `RunEnded` waits (up to `wait` seconds) until everything is written.
        A write that failed for good (not a store that does not answer) is raised here, once, after the event
        is queued: the run's end is always written, FAILED if anything was lost."""
        self._queue.put(event)
        if isinstance(event, ev.RunEnded):
            self.wait(event.wait)
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RuntimeError(f"writing to MLflow at {redact(self.uri)} failed: {failure}") from failure

    def wait(self, timeout: float) -> bool:
        """True once every queued event is written; False after `timeout` seconds (the store not answering)."""
        deadline = time.time() + timeout
        while self._queue.unfinished_tasks and time.time() < deadline:
            time.sleep(0.05)
        if self._queue.unfinished_tasks:
            self.note(
                f"MLflow at {self.uri} did not answer: {self._queue.unfinished_tasks} record(s) not written; "
                "the results are in the run folder, and `er-ray run CONFIG --resume` writes them"
            )
            return False
        return True

    def _write(self) -> None:
        while True:
            event = self._queue.get()
            handler = getattr(self, f"_on_{type(event).__name__}", None)
            delay = 1.0
            while handler is not None:
                slow = threading.Timer(SLOW_STORE_SECONDS, self._say_down)
                slow.start()
                try:
                    handler(event)
                    break
                except Exception as err:  # the store or the network: wait and write it again
                    if not _unreachable(err):
                        self._failure = err
                        break
                    self._say_down()
                    time.sleep(delay)
                    delay = min(2 * delay, 30.0)
                finally:
                    slow.cancel()
            if self._down and self._queue.qsize() == 0:
                self._down = False
                self.note(f"MLflow at {self.uri} answers again: the held-back records are written")
            self._queue.task_done()

    def _say_down(self) -> None:
        if not self._down:
            self._down = True
            self.note(
                f"MLflow at {self.uri} is not answering; training and attacks go on and their records "
                "are written when it answers"
            )

    def _on_SearchStarted(self, e: ev.SearchStarted) -> None:
        name = run_name(e.cfg, kind="search")
        self._open(e.key, "search", name, params=search_params(e.cfg, e.adversary))

    def _on_MiniEpochDone(self, e: ev.MiniEpochDone) -> None:
        run = self.runs.get(e.key)
        if run is not None and run.status == "RUNNING" and e.step not in run.steps:
            self._log(e.key, metrics=e.metrics, step=e.step)
            run.steps.add(e.step)

    def _on_SearchFinished(self, e: ev.SearchFinished) -> None:
        name = run_name(e.cfg, kind="search")
        run_id = self._open(e.key, "search", name, params=search_params(e.cfg, e.adversary))
        if run_id is None:
            return
        logged = self.runs[e.key].steps
        series = {n: [(s, v) for s, v in pts if s not in logged] for n, pts in e.curves.items()}
        self._log(e.key, series=series, params={PARAM_PRECISION: e.trajectory.meta.get("precision")})
        with tempfile.TemporaryDirectory() as d:
            self.client.log_artifact(run_id, str(e.file.local or e.file.get(Path(d) / e.file.name)))
        log_json(self.client, run_id, e.stop_points, STOP_POINTS_FILE)
        self._finish(e.key)

    def _on_TicketStarted(self, e: ev.TicketStarted) -> None:
        self._open_ticket(e.key, e.cfg, e.combo, e.primary, e.at)

    def _on_TicketFinished(self, e: ev.TicketFinished) -> None:
        if e.shared_with:
            self.sharers.setdefault(e.shared_with, []).append(e.key)
        interval = e.result.get("finetune_interval") or [None, None]
        at, end = (None, None) if e.shared_with else interval
        run_id = self._open_ticket(e.key, e.cfg, e.combo, e.primary, at)
        if run_id is not None:
            losses = {"finetune_loss": list(enumerate(e.result["finetune_losses"]))}
            params = {PARAM_PRECISION: e.result.get("precision")}
            self._log(e.key, metrics=ticket_metrics(e.result), params=params, series=losses)
            if e.folder is not None and not e.shared_with:
                local = e.folder.fetch(layout.fetched_cache())
                self._log_files(run_id, [local / TICKET_FILE, local / RESULT_FILE], "ticket")
                wanted = e.cfg.tracking.models
                if wanted == "all" or (wanted == "primary" and e.primary):
                    self._log_model(run_id, local, e.examples, model_name(e.cfg, e.combo))
                    self._log(e.key, tags={TAG_MODEL: model_name(e.cfg, e.combo)})
            if e.shared_with:
                self._log(e.key, tags={TAG_SHARED: self.runs[e.shared_with].run_id})
            self._finish(e.key, end_time=end)
        owner = e.shared_with or e.key
        if owner in self.attacked:
            self._copy_attack(e.key, self.attacked[owner])

    def _on_WorkRetried(self, e: ev.WorkRetried) -> None:
        run = self.runs.get(e.key)
        if run is not None and run.status == "RUNNING":
            self._log(e.key, tags={TAG_ATTEMPTS: str(e.attempt)})

    def _on_AttackStarted(self, e: ev.AttackStarted) -> None:
        self._open_attack(e.ticket, e.cfg, e.examples, e.at)

    def _on_AttackFinished(self, e: ev.AttackFinished) -> None:
        start, end = e.interval or (None, None)
        metrics = attack_metrics(e.summary)
        key = ev.attack_key(e.ticket)
        run_id = self._open_attack(e.ticket, e.cfg, e.examples, start)
        if run_id is not None:
            values = {CLEAN_ACC: e.summary["clean_acc"], **metrics}
            if not set(values) <= self.runs[key].metrics:  # a driver killed before finishing logged them
                self._log(key, metrics=values)
            if e.folder is not None:
                local = e.folder.fetch(layout.fetched_cache())
                self._log_files(run_id, sorted(p for p in local.iterdir() if p.is_file()), "attack")
            self._finish(key, end_time=end)
        self.attacked[e.ticket] = metrics
        for k in (e.ticket, *self.sharers.get(e.ticket, [])):
            self._copy_attack(k, metrics)

    def _on_TrialFinished(self, e: ev.TrialFinished) -> None:
        params: dict[str, Any] = dict(e.sampled)
        if e.cfg is not None:
            params |= model_params(e.cfg, _own_combo(e.cfg))
        params |= {k: e.result[k] for k in (PARAM_DEVICE, PARAM_THREADS) if k in e.result}
        known = {*TICKET_METRICS, *ATTACK_METRICS}
        metrics = {
            k: v
            for k, v in e.result.items()
            if (k in known or k.startswith(OBJECTIVE)) and isinstance(v, (int, float))
        }
        tags = {
            TAG_NAME: e.cfg.name if e.cfg is not None else "",
            TAG_STUDY: e.study,
            TAG_TRIAL_ID: e.trial_id,
            TAG_OPTUNA_TRIAL: str(e.number),
        }
        if e.error is not None:
            tags[TAG_ERROR] = e.error
        if e.pruned is not None:
            tags[TAG_BELOW_FLOOR if e.pruned == "floor" else TAG_STOPPED_EARLY] = "1"
        if self._open(e.key, "trial", f"trial-{e.number}", tags=tags) is None:
            return
        status = "FAILED"
        try:
            self._log(e.key, metrics=metrics, params=params)
            status = e.status
        finally:
            self._finish(e.key, status)

    def _on_RunEnded(self, e: ev.RunEnded) -> None:
        log_batch(self.client, self.parent_id, metrics=e.metrics, tags=e.tags, step=e.step)
        for file, obj in e.artifacts.items():
            log_json(self.client, self.parent_id, obj, file)
        self.close("FAILED" if e.status == "FINISHED" and self._failure is not None else e.status)

    # ------------------------------------------------------------ runs by key

    def _open(
        self,
        key: str,
        kind: str,
        name: str,
        parent: str | None = None,
        at: float | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> str | None:
        """The RUNNING run of `key`: opened now, already open, or reopened after an interruption; None when
        the unit FINISHED earlier (nothing more is logged to it)."""
        run = self.runs.get(key)
        if run is not None and run.status == "FINISHED":
            return None
        if run is not None and run.status == "RUNNING":
            return run.run_id
        if run is not None:  # interrupted earlier and redone now: the same row
            self.client.update_run(run.run_id, status="RUNNING")
            run.status = "RUNNING"
            if kind == "search":  # the mini-epochs it holds are not logged again
                run.steps = {m.step for m in self.client.get_metric_history(run.run_id, SEARCH_SECONDS)}
            return run.run_id
        all_tags = {
            TAG_PARENT: parent or self.parent_id,
            TAG_ROOT: self.parent_id,
            TAG_KIND: kind,
            TAG_KEY: key,
            **(tags or {}),
        }
        run_id = self.client.create_run(
            self.experiment_id, start_time=now_ms(at), run_name=name, tags=all_tags
        ).info.run_id
        self.runs[key] = _Run(run_id, "RUNNING")
        if kind in ("ticket", "trial") and self.inputs:
            self.client.log_inputs(run_id, datasets=self.inputs)
        if params:
            self._log(key, params=params)
        return run_id

    def _open_ticket(self, key: str, cfg: Any, combo: Any, primary: bool, at: float | None) -> str | None:
        params = model_params(cfg, combo) | {
            PARAM_SEED: cfg.seed,
            PARAM_DEVICE: cfg.runtime.device,
            PARAM_THREADS: max(1, int(cfg.ray.ticket_cpus)),
        }
        self.combos[key] = combo
        return self._open(
            key,
            "ticket",
            run_name(cfg, combo),
            at=at,
            tags={TAG_PRIMARY: "1" if primary else "0"},
            params=params,
        )

    def _open_attack(self, ticket: str, cfg: Any, examples: int, at: float | None) -> str | None:
        owner, combo = self.runs.get(ticket), self.combos.get(ticket)
        name = run_name(cfg, combo, kind="attack")
        parent = owner.run_id if owner else None
        params = attack_params(cfg, examples, combo)
        return self._open(ev.attack_key(ticket), "attack", name, parent, at, params=params)

    def _copy_attack(self, key: str, metrics: dict[str, float]) -> None:
        """A ticket run carries its attack's summary metrics (one row per ticket), logged once."""
        run = self.runs.get(key)
        if run is not None and not set(metrics) <= run.metrics:
            self._log(key, metrics=metrics)

    def _finish(self, key: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        run = self.runs[key]
        self.client.set_terminated(run.run_id, status, end_time=now_ms(end_time))
        run.status = status

    def _log(self, key: str, **values: Any) -> None:
        run = self.runs[key]
        log_batch(self.client, run.run_id, **values)
        run.metrics |= {k for k, v in (values.get("metrics") or {}).items() if v is not None}
        run.metrics |= set(values.get("series") or {})

    def _log_files(self, run_id: str, files: list[Path], where: str) -> None:
        """Files as artifacts under `where/`; JSON goes through `mask` (a ticket's result names its storage URI)."""
        for file in files:
            if file.suffix == ".json":
                log_json(self.client, run_id, json.loads(file.read_text()), f"{where}/{file.name}")
            else:
                self.client.log_artifact(run_id, str(file), where)

    def _log_model(self, run_id: str, ticket: Path, examples: list[str], name: str) -> None:
        """The ticket as a folder stock transformers loads (`er_ray.export.export_hf`), logged as the run's
        MLflow model named `name`: transformers flavour from the local checkpoint (no pickled code), a
        signature, an input example and pinned requirements; `mlflow.pyfunc.load_model("runs:/<run>/<name>")
        .predict(texts)` gives labels and scores."""
        import mlflow
        from huggingface_hub import ModelCard
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        from er_ray.export import CARD_FILE, export_hf

        signature = ModelSignature(
            inputs=Schema([ColSpec("string")]),
            outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
        )
        pins = [f"{pkg}=={v}" for pkg, v in versions(MODEL_REQUIREMENTS).items()]
        # the flavour warns that a local folder has no license: known, and not the user's concern
        logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as tmp, fluent(self.uri), mlflow.start_run(run_id=run_id):
            folder = export_hf(ticket, Path(tmp) / "hf")  # the flavour logs into the active run only
            mlflow.transformers.log_model(
                str(folder),
                name=name,
                task="text-classification",
                model_card=ModelCard((folder / CARD_FILE).read_text()),  # the export's, not the hub's
                signature=signature,
                input_example=examples,
                pip_requirements=pins,
            )


SLOW_STORE_SECONDS = 10.0  # a write taking longer is a store not answering (MLflow retries for minutes)


def _unreachable(err: Exception) -> bool:
    """A store that does not answer (a server down, a network gone, sqlite busy), not a bad request."""
    text = f"{type(err).__name__}: {err}"
    signs = (
        "Max retries exceeded",
        "Connection",
        "timed out",
        "Timeout",
        "database is locked",
        "TEMPORARILY_UNAVAILABLE",
        "503",
        "502",
        "504",
    )
    return any(sign in text for sign in signs)


def _note(line: str) -> None:
    print(f"er-ray: {redact(line)}", file=sys.stderr, flush=True)


def _own_combo(cfg: Any) -> Any:
    from er_ray.methods import own_combo

    return own_combo(cfg)


@contextlib.contextmanager
def fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for the block, then back as it was. `mlflow.set_tracking_uri` also
    sets MLFLOW_TRACKING_URI, which would send every later store lookup of this process to `uri`."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each package that is installed."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(data_files: list[Path]) -> dict[str, str]:
    """Package versions, the git commit (MLflow's own source tags) and sha256 of local data files, as tags."""
    tags = {"python": sys.version.split()[0], "mlflow.source.type": "LOCAL", "mlflow.source.name": "er-ray"}
    tags |= {f"version.{pkg}": v for pkg, v in versions(PROVENANCE_PACKAGES).items()}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    for f in data_files:
        tags[f"sha256.{f.parent.name}/{f.name}"] = data.sha256_file(f)
    return tags


def dataset_inputs(data_cfg: Any, data_dir: Path | None = None) -> list[Any]:
    """The training and evaluation splits as MLflow dataset inputs (name, digest, source, context tag), so the
    Dataset column names what a run trained and was evaluated on. Digest: sha256 of the file read, else of
    the hub name and split."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    files = data.local_files(data_cfg, data_dir)
    held = data_cfg.validation_from_train
    # (context, split, rows, which file): a held-out evaluation set is read from the training file
    splits = [
        ("train", data_cfg.train_split, data_cfg.max_train_examples, 0),
        ("eval", data.eval_split_name(data_cfg), held or data_cfg.max_eval_examples, 0 if held else 1),
    ]
    out = []
    for context, split, limit, i in splits:
        if len(files) == (1 if held else 2):
            digest, source_type, source = data.sha256_file(files[i])[:16], "local", {"uri": str(files[i])}
        else:
            digest = hashlib.sha256(f"{data_cfg.name}/{split}".encode()).hexdigest()[:16]
            source_type, source = (
                "hugging_face",
                {"path": "glue", "config_name": data_cfg.name, "split": split},
            )
        profile = json.dumps({"max_examples": limit, "max_length": data_cfg.max_length})
        ds = Dataset(
            name=f"{data.dataset_name(data_cfg)}/{split}",
            digest=digest,
            source_type=source_type,
            source=json.dumps(source),
            profile=profile,
        )
        out.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
    return out


def log_batch(
    client,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    step: int = 0,
    series: Mapping[str, list[tuple[int, float]]] | None = None,
) -> None:
    """One call per batch of values (per-metric calls cost seconds against a server).

    `series` logs curves: name -> [(step, value), ...]. None values are skipped (blank, never zero).
    """
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
    for name, points in (series or {}).items():
        ms += [Metric(name, float(v), now, s) for s, v in points if v is not None]
    ps = [Param(k, mask(str(v))[:6000]) for k, v in (params or {}).items() if v is not None]
    ts = [RunTag(k, mask(str(v))) for k, v in (tags or {}).items()]
    # the REST API takes at most 1000 metrics, 100 params and 100 tags per call
    calls = max(-(-len(ms) // 1000), -(-len(ps) // 100), -(-len(ts) // 100))
    for i in range(calls):
        client.log_batch(
            run_id,
            metrics=ms[i * 1000 : (i + 1) * 1000],
            params=ps[i * 100 : (i + 1) * 100],
            tags=ts[i * 100 : (i + 1) * 100],
        )


def log_files(client, run_id: str, paths: list[str | Path], where: str | None = None) -> None:
    """Attach files to a run (the report's table and figures under `report/`)."""
    for path in paths:
        client.log_artifact(run_id, str(path), where)


def log_json(client, run_id: str, obj: Any, artifact_file: str) -> None:
    client.log_text(run_id, json.dumps(mask(obj), indent=1, default=str), artifact_file)


def mask(obj: Any) -> Any:
    """`obj` with every credential in a URL or URI masked (`storage.redact`: a password or secret key, never the
    user or key id), in strings, lists and dicts: every param, tag and JSON artifact goes through here."""
    if isinstance(obj, str):
        return redact(obj) if "://" in obj else obj
    if isinstance(obj, Mapping):
        return {k: mask(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask(v) for v in obj]
    return obj
