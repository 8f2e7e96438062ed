"""Where a run's files live and what they are called: the one module that names them.

    <runtime.output_dir>/
      mlflow.db, mlartifacts/          the default MLflow store (see `tracking_uri`)
      optuna.db                        the default Optuna storage of `er-ray tune`
      cache/                           attack builds shared by nodes (only under a storage URI)
      attacks/<model>-<data>-<split>-seed<seed>/  `er-ray attack` results
      <name>/tune/<study>/<trial id>/  a tune trial's model
      <name>/runs/<stamp>-<4 hex>/     one `er-ray run`: a `RunFolder`
        mlflow_parent_run_id, timing.json, summary.json
        search/                        Ray Tune's state of the search stages
        <method>/seed<seed>/
          trajectory.safetensors       the search stage, once it ended
          <ticket>/                    a ticket (`ticket_name`): ticket.json, model.safetensors, result.json
            attack/                    its attack: summary.json, examples.jsonl, deviations.md

Completion files are written last (`result.json` of a ticket, `summary.json` of an attack): a folder without
one is unfinished. Everything here is a path computation; nothing is created except by `RunFolder.create`.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from er_ray.config import ExperimentConfig, UserError, settings
from er_ray.storage import Store, is_uri, redact

# ---------------------------------------------------------------- file names

RESULT_FILE = "result.json"  # a ticket's TicketResult, written last: the ticket is complete
TICKET_FILE = "ticket.json"  # a ticket's structure (kept units) and base model
TRAJECTORY_FILE = "trajectory.safetensors"  # a search stage's coefficients and distances per mini-epoch
STOP_POINTS_FILE = "stop_points.json"  # a search's stop points of every rule and combo (an MLflow artifact)
SEARCH_STATE_FILE = "search_state.safetensors"  # a search stage's restart state
ATTACK_DIR = "attack"
SUMMARY_FILE = "summary.json"  # an attack's summary, written last: the attack is complete
EXAMPLES_FILE = "examples.jsonl"  # an attack's per-example records
DEVIATIONS_FILE = "deviations.md"  # where an attack's offline resources differ from the published ones
TIMING_FILE = "timing.json"  # a run folder's wall-time accounting, one entry per invocation
PARENT_ID_FILE = "mlflow_parent_run_id"  # a run folder's MLflow parent run
CONFIG_FILE = "config.json"  # the resolved config, on the parent run (credentials masked)
TUNE_DIR = "search"  # Ray Tune's folder of the search stages, in a run folder
CACHE_DIR = "cache"  # under a storage URI output_dir: the attacks' one-time builds
FETCHED_DIR = "fetched"  # in the local cache: copies of stored tickets (MLflow artifacts, victims)
MLFLOW_DB, MLFLOW_ARTIFACTS, OPTUNA_DB = "mlflow.db", "mlartifacts", "optuna.db"


def ticket_name(combo: Any) -> str:
    """A ticket's folder: `g<gamma>-h<head ratio>-f<ffn ratio>`, or `full` for a full-model baseline."""
    return "full" if combo is None else f"g{combo.gamma:g}-h{combo.head_ratio:.4g}-f{combo.ffn_ratio:.4g}"


# ---------------------------------------------------------------- the store rule


def tracking_uri(cfg: ExperimentConfig) -> str:
    """A config's MLflow store: `tracking.uri`, else the rule of `store_uri`."""
    return store_uri(cfg.runtime.output_dir, cfg.tracking.uri)


def store_uri(output_dir: str | Path, explicit: str | None = None) -> str:
    """The one rule: an explicit URI, else MLFLOW_TRACKING_URI, else `<output_dir>/mlflow.db`."""
    return explicit or settings().mlflow_uri or default_store(output_dir)


def default_store(output_dir: str | Path) -> str:
    """A local sqlite store beside the outputs. A storage URI holds files, not a database: MLflow then needs a
    server or a local path."""
    if is_uri(output_dir):
        raise UserError(
            f"runtime.output_dir is a storage URI ({redact(str(output_dir))}): MLflow needs a "
            "tracking server or a local path: set tracking.uri or MLFLOW_TRACKING_URI"
        )
    return f"sqlite:///{Path(output_dir).expanduser().resolve() / MLFLOW_DB}"


def artifact_location(uri: str) -> str | None:
    """A sqlite store keeps its artifacts in `mlartifacts/` beside the database (not in ./mlruns of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / MLFLOW_ARTIFACTS).as_uri()


def experiment_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.experiment or cfg.name


def optuna_storage(cfg: ExperimentConfig) -> str:
    """`tune.storage`, else `<runtime.output_dir>/optuna.db`."""
    if cfg.tune.storage:
        return cfg.tune.storage
    if is_uri(cfg.runtime.output_dir):
        raise UserError(
            f"runtime.output_dir is a storage URI ({redact(cfg.runtime.output_dir)}): the Optuna "
            "study needs a database: set tune.storage (e.g. postgresql://… or sqlite:///local.db)"
        )
    return f"sqlite:///{Path(cfg.runtime.output_dir).expanduser().resolve() / OPTUNA_DB}"


def tune_folder(cfg: ExperimentConfig, study: str) -> Store:
    """A study's trial models (one folder per Ray Tune trial) and Ray Tune's state."""
    return Store.at(cfg.runtime.output_dir) / cfg.name / "tune" / study


def attack_folder(output_dir: str | Path, model_dir: Path, dataset: str, split: str, seed: int) -> Path:
    """`er-ray attack`'s default output folder."""
    return Path(output_dir) / "attacks" / f"{model_dir.resolve().name}-{dataset}-{split}-seed{seed}"


def shared_cache(cfg: ExperimentConfig) -> str | None:
    """Under a storage URI output_dir the attacks' one-time builds live there too: a new node fetches them."""
    return (Store.at(cfg.runtime.output_dir) / CACHE_DIR).uri if is_uri(cfg.runtime.output_dir) else None


def fetched_cache() -> Path:
    return settings().cache_dir / FETCHED_DIR


# ---------------------------------------------------------------- one run's folder


@dataclass(frozen=True)
class RunFolder:
    """One `er-ray run` invocation's folder (a local path or a storage URI) and the places inside it."""

    root: Store

    @classmethod
    def new(cls, cfg: ExperimentConfig) -> RunFolder:
        """A fresh run's folder, `<stamp>-<4 hex>` (two runs started in the same second get two), not made
        yet: it is made by `create` once its MLflow parent run exists."""
        return cls(_runs(cfg) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")

    def create(self, parent_id: str) -> None:
        """Make the folder with its parent run's id in it: a folder without one is never resumed."""
        if self.root.exists():
            raise UserError(f"run folder {self.root} exists already")
        self.root.mkdir()
        self.parent_id_file.write_text(parent_id)

    @classmethod
    def latest(cls, cfg: ExperimentConfig) -> RunFolder:
        """The newest run of the config that has a parent run (what `--resume` continues)."""
        runs = _runs(cfg)
        found = [name for name in runs.children() if (runs / name / PARENT_ID_FILE).exists()]
        if not found:
            raise UserError(f"nothing to resume: no earlier run of '{cfg.name}' under {runs}")
        return cls(runs / found[-1])

    @classmethod
    def at(cls, path: str | Path) -> RunFolder:
        """An existing run folder named by a user (`er-ray report --run-dir`)."""
        folder = cls(Store.at(path))
        if not folder.parent_id_file.exists():
            raise UserError(f"{path} is not an er-ray run folder (it has no {PARENT_ID_FILE})")
        return folder

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def output_dir(self) -> Path:
        """The `runtime.output_dir` this folder was made under (a local folder only)."""
        assert self.root.local is not None, "a run folder on a storage URI has no local output_dir"
        return self.root.local.parents[2]  # <output_dir>/<name>/runs/<stamp>-<4 hex>

    @property
    def parent_id_file(self) -> Store:
        return self.root / PARENT_ID_FILE

    @property
    def timing_file(self) -> Store:
        return self.root / TIMING_FILE

    @property
    def summary_file(self) -> Store:
        return self.root / SUMMARY_FILE

    def method(self, method: str, seed: int) -> Store:
        """One (method, seed): its trajectory and its tickets."""
        return self.root / method / f"seed{seed}"

    def trajectory(self, method: str, seed: int) -> Store:
        return self.method(method, seed) / TRAJECTORY_FILE

    def search_state(self, method: str, seed: int) -> Store:
        """The state a restarted search continues from (kept by (method, seed), not by Tune trial)."""
        return self.method(method, seed) / SEARCH_STATE_FILE

    def ticket(self, method: str, seed: int, combo: Any) -> Store:
        return self.method(method, seed) / ticket_name(combo)


def attack_dir(ticket: Store) -> Store:
    return ticket / ATTACK_DIR


def _runs(cfg: ExperimentConfig) -> Store:
    return Store.at(cfg.runtime.output_dir) / cfg.name / "runs"  # absolute: Tune refuses relative paths
