"""The search stage as a Ray Tune function trainable, stopped by a convergence `Stopper`.

The trainable reports every mini-epoch: the mask distances at the config's own ratios (the contract
metrics) and the distance curves of every ratio pair of the sweep grid; the Stopper applies the
gamma/patience rule to those curves and ends the trial once every (gamma, ratios) combo has converged.
The Stopper is stateless (it reads whole curves), so it behaves the same after a driver restart.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune.stopper import Stopper

from er_ray import tracking as T
from er_ray.config import ExperimentConfig
from er_ray.convergence import Combo, stop_index
from er_ray.methods import prepare
from er_ray.model import load_backbone
from er_ray.search import (
    TRAJECTORY_FILE,
    MiniEpoch,
    SearchStage,
    Trajectory,
    load_search_state,
    save_search_state,
    search_grid,
)

GRID_CURVES = "grid_curves"  # JSON: [[head_ratio, ffn_ratio, [[d_heads, d_ffn], ...]], ...]


class ConvergenceStopper(Stopper):
    """Stop a search trial when every combo of the grid meets the stop rule (both distances < gamma,
    `patience` times in a row), read off the curves the trial reports."""

    def __init__(self, combos: list[Combo], patience: int) -> None:
        self.combos, self.patience = list(combos), patience

    def converged(self, result: dict[str, Any]) -> bool:
        if GRID_CURVES not in result:
            return False
        curves = {(h, f): [tuple(p) for p in c] for h, f, c in json.loads(result[GRID_CURVES])}
        return all(
            stop_index(curves.get(c.ratios, []), c.gamma, self.patience) is not None for c in self.combos
        )

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.converged(result)

    def stop_all(self) -> bool:
        return False


def search_trainable(config: dict[str, Any]) -> None:
    """Tune function trainable: one search stage, resumable from its last checkpoint."""
    cfg = ExperimentConfig.model_validate(config["experiment"])
    threads = max(1, int(config.get("threads") or 1))
    torch.set_num_threads(threads)
    prep = prepare(cfg)
    model = load_backbone(prep.cfg.model.name_or_path, prep.num_labels, cfg.seed).to(prep.device)
    stage = SearchStage(prep.cfg, model, prep.batches(cfg.search.batch_size), prep.device)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_search_state(stage, d)  # light checkpoints hold only the trajectory: start over
    every = int(config.get("checkpoint_every") or 1)

    def report(point: MiniEpoch) -> None:
        metrics = {
            "mini_epoch": point.index,
            "step": point.step,
            "epoch": point.epoch,
            T.SEARCH_SECONDS: point.seconds,
            T.SEARCH_LOSS: point.loss,
            T.MASK_DISTANCE_HEADS: point.head_distance,
            T.MASK_DISTANCE_FFN: point.ffn_distance,
            GRID_CURVES: json.dumps([[h, f, c] for (h, f), c in stage.rule.curves.items()]),
            "threads": threads,
            "device": prep.device.type,
        }
        with tempfile.TemporaryDirectory() as d:
            stage.trajectory().save(Path(d) / TRAJECTORY_FILE)
            if point.index % every == 0:
                save_search_state(stage, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    # the Stopper ends the trial; running to the cap is the fallback
    stage.run(on_mini_epoch=report, stop_when_converged=False)


def load_trajectory(checkpoint: tune.Checkpoint, cfg: ExperimentConfig) -> Trajectory:
    """The trajectory in a search checkpoint, with stop points for the config's grid."""
    from er_ray.convergence import stop_points

    with checkpoint.as_directory() as d:
        traj = Trajectory.load(Path(d) / TRAJECTORY_FILE)
    traj.stops = stop_points(traj.coefficients(), search_grid(cfg), cfg.search.patience, cfg.prune.scope)
    return traj


def run_search(cfg: ExperimentConfig, storage: Path, resume: bool = False) -> tuple[Trajectory, dict]:
    """Run (or resume) the search trial for `cfg` under Tune; returns its trajectory and last result."""
    name = f"search-{cfg.method}"
    trainable = tune.with_resources(
        search_trainable, {"cpu": cfg.ray.search_cpus, "gpu": cfg.ray.search_gpus}
    )
    path = storage / name
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {
            "experiment": cfg.model_dump(mode="json"),
            "threads": max(1, int(cfg.ray.search_cpus)),
            "checkpoint_every": cfg.ray.checkpoint_every,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                stop=ConvergenceStopper(search_grid(cfg), cfg.search.patience),
                failure_config=tune.FailureConfig(max_failures=cfg.ray.max_retries),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=0,
            ),
        )
    (result,) = list(tuner.fit())
    if result.error is not None:
        raise RuntimeError(f"search stage failed: {result.error}") from result.error
    return load_trajectory(result.checkpoint, cfg), dict(result.metrics or {})


def curves(traj: Trajectory) -> dict[str, list[tuple[int, float]]]:
    """Per-mini-epoch series for MLflow (step = mini-epoch index)."""
    return {
        T.MASK_DISTANCE_HEADS: [(m.index, m.head_distance) for m in traj.mini_epochs],
        T.MASK_DISTANCE_FFN: [(m.index, m.ffn_distance) for m in traj.mini_epochs],
        T.SEARCH_LOSS: [(m.index, m.loss) for m in traj.mini_epochs],
        T.SEARCH_SECONDS: [(m.index, m.seconds) for m in traj.mini_epochs],
    }
