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
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from er_ray.config import UserError

# ---------------------------------------------------------------- the contract

TAG_KIND = "er_ray.kind"  # parent | search | ticket | attack | trial
TAG_NAME = "er_ray.name"  # the config's `name`
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
TAG_KEY = "er_ray.key"  # a child run's work item (search / ticket / attack), so a resume never logs it twice
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
TAG_PRIMARY = "er_ray.primary"  # "1" on the ticket at the config's own gamma and ratios (Table 1's row)
TAG_SHARED = "er_ray.shared_with"  # a combo whose masks equal another's: the ticket run holding the weights
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
PARENT_ID_FILE = "mlflow_parent_run_id"  # in a run folder: the parent run that holds it
MODEL_ARTIFACT = "model"  # a ticket run's MLflow model: runs:/<ticket run>/model
PROVENANCE_PACKAGES = ("torch", "transformers", "textattack", "ray", "mlflow", "er-ray")  # version.<pkg> tags
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "mlflow")  # pinned to what ran

# ---------------------------------------------------------------- store


def default_tracking_uri(output_dir: str | Path) -> str:
    """A local sqlite store beside the outputs (sqlite allows one writer: the driver logs). A storage URI
    holds files, not a database: MLflow then needs a server or a local path."""
    from er_ray.storage import is_uri, redact

    if is_uri(output_dir):
        raise UserError(
            f"runtime.output_dir is a storage URI ({redact(str(output_dir))}): MLflow needs a "
            "tracking server or a local path: set tracking.uri or MLFLOW_TRACKING_URI"
        )
    path = Path(output_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def tracking_uri(cfg: Any) -> str:
    """The one rule: `tracking.uri`, else MLFLOW_TRACKING_URI, else `<runtime.output_dir>/mlflow.db`."""
    from er_ray.config import settings

    return cfg.tracking.uri or settings().mlflow_uri or default_tracking_uri(cfg.runtime.output_dir)


def existing_store(uri: str) -> str:
    """`uri`, unless it is a sqlite file that does not exist (opening it would create an empty store)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}; pass --tracking-uri or set "
            "MLFLOW_TRACKING_URI"
        )
    return uri


def open_store(cfg: Any) -> tuple[Any, str]:
    """(client, experiment id) of the config's experiment, created if new; a local sqlite store keeps its
    artifacts in `mlartifacts/` beside the database (not in ./mlruns of whatever the cwd is)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    name = cfg.tracking.experiment or cfg.name
    exp = client.get_experiment_by_name(name)
    if exp:
        return client, exp.experiment_id
    where = None
    if uri.startswith("sqlite:///"):
        where = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return client, client.create_experiment(name, artifact_location=where)


def end_stale(cfg: Any, filter_string: str) -> None:
    """Runs matching `filter_string` that a killed driver left RUNNING end KILLED."""
    client, exp_id = open_store(cfg)
    running = f"{filter_string} and attributes.status = 'RUNNING'"
    for r in client.search_runs([exp_id], filter_string=running, max_results=1000):
        client.set_terminated(r.info.run_id, "KILLED")


def now_ms(t: float | None = None) -> int:
    """MLflow's timestamps: milliseconds since the epoch (of `t`, a time.time(), or now)."""
    import time

    return int((time.time() if t is None else t) * 1000)


class Tracker:
    """A parent run and its children. Children carry a key tag (their work item), so a resumed invocation
    finds what is FINISHED and never logs it twice; whatever this tracker opened it also closes.

    Runs open when their work starts and close when it ends (`start_time` / `end_time` may be given as the
    time the worker reported), so MLflow's run times are the stages' real times.
    """

    def __init__(
        self, client: Any, experiment_id: str, parent_id: str, inputs: list[Any] | None = None
    ) -> None:
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.uri = client.tracking_uri
        self.inputs = inputs or []  # the data splits, logged on the parent and on every ticket and trial run
        self.existing: dict[str, str] = {}  # key -> FINISHED child run id
        self.open_runs: dict[str, str] = {}  # key -> RUNNING child run id opened here

    @classmethod
    def open(
        cls,
        cfg: Any,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        artifacts: dict[str, Any] | None = None,
    ) -> Tracker:
        """A new parent run with provenance, params and JSON artifacts."""
        from er_ray import data
        from er_ray.config import settings

        client, exp_id = open_store(cfg)
        run_tags = {TAG_KIND: "parent", TAG_NAME: cfg.name, **tags}
        parent = client.create_run(exp_id, run_name=name, tags=run_tags).info.run_id
        try:
            prov = provenance(data.local_files(cfg.data, settings().data_dir))
            log_batch(client, parent, params=params, tags=prov)
            inputs = dataset_inputs(cfg.data, settings().data_dir)
            client.log_inputs(parent, datasets=inputs)
            for file, obj in (artifacts or {}).items():
                log_json(client, parent, obj, file)
        except BaseException:
            client.set_terminated(parent, "FAILED")
            raise
        return cls(client, exp_id, parent, inputs)

    @classmethod
    def resume(cls, cfg: Any, parent_id: str) -> Tracker:
        """An earlier parent run reopened: its FINISHED children are collected (never logged twice) and
        children a dead driver left RUNNING end KILLED."""
        from er_ray.config import settings

        client, exp_id = open_store(cfg)
        client.update_run(parent_id, status="RUNNING")
        tracker = cls(client, exp_id, parent_id, dataset_inputs(cfg.data, settings().data_dir))
        filt = f"tags.`{TAG_PARENT}` = '{parent_id}'"
        for run in client.search_runs([exp_id], filter_string=filt, max_results=50000):
            key = run.data.tags.get(TAG_KEY)
            if run.info.status == "FINISHED" and key:
                tracker.existing[key] = run.info.run_id
            elif run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
        return tracker

    def start(
        self,
        key: str,
        kind: str,
        name: str,
        parent: str | None = None,
        start_time: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Open a RUNNING child run for the work item `key`."""
        all_tags = {TAG_PARENT: parent or self.parent_id, TAG_KIND: kind, TAG_KEY: key, **(tags or {})}
        run_id = self.client.create_run(
            self.experiment_id, start_time=now_ms(start_time), run_name=name, tags=all_tags
        ).info.run_id
        self.open_runs[key] = run_id
        if kind in ("ticket", "trial") and self.inputs:
            self.client.log_inputs(run_id, datasets=self.inputs)
        return run_id

    def finish(self, key: str, status: str = "FINISHED", end_time: float | None = None) -> str:
        run_id = self.open_runs.pop(key)
        self.client.set_terminated(run_id, status, end_time=now_ms(end_time))
        if status == "FINISHED":
            self.existing[key] = run_id
        return run_id

    def log(self, run_id: str, **values: Any) -> None:
        log_batch(self.client, run_id, **values)

    def artifact(self, run_id: str, path: str | Path, where: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), where)
        else:
            self.client.log_artifact(run_id, str(path), where)

    def log_model(self, run_id: str, hf_folder: Path, examples: list[str]) -> None:
        """A folder stock transformers loads (`er_ray.export.export_hf`) as the run's MLflow model: transformers
        flavour from the local checkpoint (no pickled code), a signature, an input example and pinned
        requirements; `mlflow.pyfunc.load_model("runs:/<run>/model").predict(texts)` gives labels and scores."""
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        signature = ModelSignature(
            inputs=Schema([ColSpec("string")]),
            outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
        )
        pins = [f"{pkg}=={v}" for pkg, v in versions(MODEL_REQUIREMENTS).items()]
        with fluent(self.uri), mlflow.start_run(run_id=run_id):  # the flavour logs into the active run only
            mlflow.transformers.log_model(
                str(hf_folder),
                name=MODEL_ARTIFACT,
                task="text-classification",
                signature=signature,
                input_example=examples,
                pip_requirements=pins,
            )

    def close(self, status: str) -> None:
        """End every child still open here (KILLED unless the parent FINISHED) and then the parent."""
        for key in list(self.open_runs):
            self.finish(key, "KILLED" if status != "FINISHED" else "FAILED")
        self.client.set_terminated(self.parent_id, status)


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
    from er_ray.data import sha256_file

    for f in data_files:
        tags[f"sha256.{f.parent.name}/{f.name}"] = sha256_file(f)
    return tags


def dataset_inputs(data_cfg: Any, data_dir: Path | None = None) -> list[Any]:
    """The training and evaluation splits as MLflow dataset inputs (name, digest, source, context tag), so the
    Dataset column names what a run trained and was evaluated on. Digest: sha256 of the file read, else of
    the hub name and split."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from er_ray import data

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
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items() if v is not None]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
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
    client.log_text(run_id, json.dumps(obj, indent=1, default=str), artifact_file)
