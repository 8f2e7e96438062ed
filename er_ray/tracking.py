"""MLflow: the contract of run kinds, parameter and metric names, and batched logging.

`er-ray report` and the MLflow UI comparison rely on these names; they are defined here once.

Runs of one invocation:
  parent (kind=parent)  the whole `er-ray run` / `er-ray tune` invocation: resolved config, provenance
    search (kind=search)   one search stage: per-mini-epoch curves (step = mini-epoch index), trajectory
    ticket (kind=ticket)   one (method, gamma, ratios) ticket or baseline model: results, ticket files,
                           and the attack summary metrics copied from its attack run (one row per ticket)
      attack (kind=attack) one robustness evaluation: per-attack metrics, per-example results
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- the contract

TAG_KIND = "er_ray.kind"  # parent | search | ticket | attack | trial
TAG_NAME = "er_ray.name"  # the config's `name`
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
TAG_KEY = "er_ray.key"  # a child run's work item (search / ticket / attack), so a resume never logs it twice
TAG_STUDY = "er_ray.study"  # trials of `er-ray tune`: the Optuna study
TAG_TRIAL_ID = "er_ray.trial_id"
TAG_ERROR = "er_ray.error"  # a failed trial's error, one line
OBJECTIVE = "objective"  # the tuned objective of a trial
TAG_PRIMARY = "er_ray.primary"  # "1" on the ticket at the config's own gamma and ratios (Table 1's row)
KINDS = ("parent", "search", "ticket", "attack", "trial")

PARAM_METHOD = "method"
PARAM_DATASET = "dataset"
PARAM_MODEL = "model"
PARAM_GAMMA = "gamma"
PARAM_HEAD_RATIO = "head_ratio"
PARAM_FFN_RATIO = "ffn_ratio"
PARAM_DEVICE = "device"  # timing conditions, stated by the report
PARAM_THREADS = "threads"
PARAMS = (PARAM_METHOD, PARAM_DATASET, PARAM_MODEL, PARAM_GAMMA, PARAM_HEAD_RATIO, PARAM_FFN_RATIO)

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


def aua(attack: str) -> str:
    """Accuracy under attack, fraction in [0, 1]."""
    return f"aua_{attack}"


def queries(attack: str) -> str:
    """Mean number of model queries per attacked example."""
    return f"queries_{attack}"


def success_rate(attack: str) -> str:
    return f"success_rate_{attack}"


ATTACKS = ("textfooler", "textbugger", "bertattack")

# ---------------------------------------------------------------- store


def default_tracking_uri(output_dir: str | Path) -> str:
    """A local sqlite store beside the outputs (sqlite allows one writer: the driver logs)."""
    path = Path(output_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def provenance(data_files: list[Path]) -> dict[str, str]:
    """Package versions, git commit and sha256 of local data files, as tags."""
    import hashlib

    tags = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "textattack", "ray", "mlflow", "er-ray"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        here = Path(__file__).resolve().parent
        tags["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for f in data_files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        tags[f"sha256.{f.parent.name}/{f.name}"] = h.hexdigest()
    return tags


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
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    # the REST API takes at most 1000 metrics, 100 params and 100 tags per call
    calls = max(-(-len(ms) // 1000), -(-len(ps) // 100), -(-len(ts) // 100))
    for i in range(calls):
        client.log_batch(run_id, metrics=ms[i * 1000 : (i + 1) * 1000], params=ps[i * 100 : (i + 1) * 100],
                         tags=ts[i * 100 : (i + 1) * 100])  # fmt: skip


def log_json(client, run_id: str, obj: Any, artifact_file: str) -> None:
    client.log_text(run_id, json.dumps(obj, indent=1, default=str), artifact_file)
