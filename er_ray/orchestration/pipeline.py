"""`er-ray run` on Ray: Tune search stage -> one task per (gamma, head ratio, ffn ratio) -> attack pool,
all logged to MLflow by this driver (tasks and actors return results; sqlite allows one writer).

Resume: every ticket is written to its own folder atomically and every MLflow child run carries a key
tag, so a rerun with `resume=True` skips finished searches, tickets, attacks and runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from er_ray import tracking as T
from er_ray.config import ExperimentConfig, UserError, settings
from er_ray.convergence import Combo
from er_ray.methods import ticket_name
from er_ray.orchestration.ray_env import init_ray
from er_ray.search import Trajectory

RESULT_FILE = "result.json"
ATTACK_DIR = "attack"
TAG_KEY, TAG_PARENT = T.TAG_KEY, T.TAG_PARENT


# ---------------------------------------------------------------- work on the workers


@ray.remote
def ticket_task(experiment: dict, traj_path: str | None, combo: dict | None, out: str, threads: int) -> dict:
    """Draw + rewind + fine-tune one ticket (or train a full-model baseline); returns its TicketResult."""
    import torch

    from er_ray.methods import full_model_pipeline, prepare, ticket_pipeline

    torch.set_num_threads(threads)
    prep = prepare(ExperimentConfig.model_validate(experiment))
    if traj_path is None:
        return full_model_pipeline(prep, Path(out)).to_json()
    return ticket_pipeline(prep, Trajectory.load(traj_path), Combo(**combo), Path(out)).to_json()


# ---------------------------------------------------------------- MLflow bookkeeping


@dataclass
class Tracker:
    """The parent run and its children; every run this driver opens is closed, whatever happens."""

    client: Any
    experiment_id: str
    parent_id: str
    existing: dict[str, str] = field(default_factory=dict)  # key -> FINISHED child run id

    @classmethod
    def open(cls, cfg: ExperimentConfig, run_dir: Path, resume: bool) -> Tracker:
        from mlflow.tracking import MlflowClient

        uri = cfg.tracking.uri or settings().mlflow_uri or T.default_tracking_uri(cfg.runtime.output_dir)
        client = MlflowClient(uri)
        name = cfg.tracking.experiment or cfg.name
        exp = client.get_experiment_by_name(name)
        if exp:
            exp_id = exp.experiment_id
        else:  # a local store keeps its artifacts beside it, not in ./mlruns of whatever the cwd is
            local = uri.startswith("sqlite:")
            where = (Path(cfg.runtime.output_dir).resolve() / "mlartifacts").as_uri() if local else None
            exp_id = client.create_experiment(name, artifact_location=where)
        id_file = run_dir / "mlflow_parent_run_id"
        if resume and id_file.exists():
            parent = id_file.read_text().strip()
            client.update_run(parent, status="RUNNING")
        else:
            parent = client.create_run(exp_id, run_name=f"{cfg.name}-{run_dir.name}", tags={
                T.TAG_KIND: "parent", T.TAG_NAME: cfg.name, "run_dir": str(run_dir)}).info.run_id  # fmt: skip
            id_file.write_text(parent)
            from er_ray import data

            T.log_batch(client, parent, params={"methods": ",".join(cfg.methods()), T.PARAM_DATASET: cfg.data.name,
                                                T.PARAM_MODEL: cfg.model.name_or_path, "seed": cfg.seed},
                        tags=T.provenance(data.local_files(cfg.data, settings().data_dir)))  # fmt: skip
            T.log_json(client, parent, cfg.model_dump(mode="json"), "config.json")
        tracker = cls(client, exp_id, parent)
        filt = f"tags.`{TAG_PARENT}` = '{parent}'"
        for run in client.search_runs([exp_id], filter_string=filt, max_results=5000):
            key = run.data.tags.get(TAG_KEY)
            if run.info.status == "FINISHED" and key:
                tracker.existing[key] = run.info.run_id
            elif run.info.status == "RUNNING":  # left by a driver that died: it never finished
                client.set_terminated(run.info.run_id, "KILLED")
        return tracker

    def child(self, key: str, kind: str, name: str, parent: str | None = None) -> str:
        tags = {TAG_PARENT: parent or self.parent_id, T.TAG_KIND: kind, TAG_KEY: key}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log_child(self, key: str, kind: str, name: str, fill, parent: str | None = None) -> str:
        """Create, fill and finish one child run; a failure ends it FAILED (KILLED on interrupt)."""
        run_id = self.child(key, kind, name, parent)
        try:
            fill(run_id)
        except BaseException as err:
            self.client.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        self.existing[key] = run_id
        return run_id

    def close(self, status: str) -> None:
        self.client.set_terminated(self.parent_id, status)


# ---------------------------------------------------------------- the pipeline


def run_dir_for(cfg: ExperimentConfig, resume: bool) -> Path:
    runs = Path(cfg.runtime.output_dir).resolve() / cfg.name / "runs"  # Tune needs absolute storage paths
    if resume:
        found = sorted(p for p in runs.glob("*") if p.is_dir()) if runs.is_dir() else []
        if not found:
            raise UserError(f"nothing to resume: no earlier run of '{cfg.name}' under {runs}")
        return found[-1]
    run_dir = runs / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def _ticket_params(r: dict) -> dict:
    return {
        T.PARAM_METHOD: r["method"], T.PARAM_DATASET: r["dataset"], T.PARAM_MODEL: r["model"],
        T.PARAM_GAMMA: r["gamma"], T.PARAM_HEAD_RATIO: r["head_ratio"], T.PARAM_FFN_RATIO: r["ffn_ratio"],
        T.PARAM_DEVICE: r["device"], T.PARAM_THREADS: r["threads"],
    }  # fmt: skip


def _ticket_metrics(r: dict) -> dict:
    return {
        T.CLEAN_ACC: r["clean_acc"], T.SEARCH_SECONDS: r["search_seconds"],
        T.FINETUNE_SECONDS: r["finetune_seconds"], T.TRAIN_SECONDS: r["train_seconds"],
        T.STOP_EPOCH: r["stop_epoch"], T.STOP_MINI_EPOCH: r["stop_mini_epoch"],
        T.CONVERGED: None if r["converged"] is None else float(r["converged"]),
        T.PARAM_COUNT: r["params"], T.SIZE_MB: r["size_mb"], T.LATENCY_MS: r["latency_ms"],
    }  # fmt: skip


def _attack_metrics(summary: dict) -> dict:
    out = {}
    for recipe, value in summary["aua"].items():
        out[T.aua(recipe)] = value
        out[T.queries(recipe)] = summary["mean_queries"][recipe]
        out[T.success_rate(recipe)] = summary["success_rate"][recipe]
    return out


def _attack(cfg: ExperimentConfig, ticket_dir: Path) -> dict:
    """The ticket's robustness (cached in its folder, so a resume does not attack it again)."""
    from er_ray.orchestration.attack_pool import run_attack_pool

    summary_file = ticket_dir / ATTACK_DIR / "summary.json"
    if not summary_file.exists():
        result = run_attack_pool(ticket_dir, cfg.data, cfg.attack, cfg.seed, max_length=cfg.data.max_length)
        result.save(ticket_dir / ATTACK_DIR)
    return json.loads(summary_file.read_text())


def _search(cfg: ExperimentConfig, run_dir: Path, tracker: Tracker, resume: bool) -> Trajectory:
    from er_ray.orchestration.search_tune import curves, run_search

    method_dir = run_dir / cfg.method
    traj_file = method_dir / "trajectory.pt"
    if traj_file.exists():
        traj = Trajectory.load(traj_file)
    else:
        traj, _ = run_search(cfg, run_dir / "tune", resume=resume)
        method_dir.mkdir(parents=True, exist_ok=True)
        tmp = traj_file.with_suffix(".tmp")
        traj.save(tmp)
        tmp.replace(traj_file)
    key = f"search/{cfg.method}"
    if key not in tracker.existing:

        def fill(run_id: str) -> None:
            params = {T.PARAM_METHOD: cfg.method, T.PARAM_DATASET: cfg.data.name, T.PARAM_MODEL: cfg.model.name_or_path,
                      T.PARAM_GAMMA: cfg.search.gamma, T.PARAM_HEAD_RATIO: cfg.prune.head_ratio,
                      T.PARAM_FFN_RATIO: cfg.prune.ffn_ratio, "scope": cfg.prune.scope,
                      "adversary": cfg.search.adversary.kind, "lambda_head": cfg.search.lambda_head,
                      "lambda_ffn": cfg.search.lambda_ffn, "patience": cfg.search.patience}  # fmt: skip
            T.log_batch(tracker.client, run_id, params=params, series=curves(traj))
            tracker.client.log_artifact(run_id, str(traj_file))
            stops = [{"combo": vars(c), "stop": vars(s), "epoch": traj.mini_epochs[s.mini_epoch].epoch}
                     for c, s in traj.stops.items()]  # fmt: skip
            T.log_json(tracker.client, run_id, stops, "stop_points.json")

        tracker.log_child(key, "search", f"search-{cfg.method}", fill)
    return traj


def _log_ticket(cfg: ExperimentConfig, tracker: Tracker, key: str, result: dict, primary: bool) -> None:
    ticket_dir = Path(result["ticket_dir"])
    summary = _attack(cfg, ticket_dir) if cfg.ray.attack else None

    def fill(run_id: str) -> None:
        metrics = _ticket_metrics(result) | (_attack_metrics(summary) if summary else {})
        T.log_batch(tracker.client, run_id, metrics=metrics, params=_ticket_params(result),
                    tags={T.TAG_PRIMARY: "1" if primary else "0"},
                    series={"finetune_loss": list(enumerate(result["finetune_losses"]))})  # fmt: skip
        tracker.client.log_artifact(run_id, str(ticket_dir / "ticket.json"), "ticket")
        tracker.client.log_artifact(run_id, str(ticket_dir / RESULT_FILE), "ticket")
        if summary:
            tracker.log_child(f"{key}/attack", "attack", f"attack-{ticket_dir.name}",
                              lambda a: _fill_attack(tracker, a, ticket_dir, cfg, summary), parent=run_id)  # fmt: skip

    tracker.log_child(key, "ticket", f"{result['method']}-{ticket_dir.name}", fill)


def _fill_attack(tracker: Tracker, run_id: str, ticket_dir: Path, cfg: ExperimentConfig, summary: dict) -> None:
    params = {"recipes": ",".join(cfg.attack.recipes), "resources": cfg.attack.resources,
              "num_examples": len(summary["indices"]), "actors": cfg.attack.actors, "seed": summary["seed"]}  # fmt: skip
    T.log_batch(tracker.client, run_id, metrics={T.CLEAN_ACC: summary["clean_acc"], **_attack_metrics(summary)},
                params=params)  # fmt: skip
    tracker.client.log_artifacts(run_id, str(ticket_dir / ATTACK_DIR), "attack")


def run_pipeline(cfg: ExperimentConfig, resume: bool = False) -> list[dict]:
    """Every method of the config, every ticket of its grid; returns one summary row per ticket."""
    started = time.perf_counter()
    run_dir = run_dir_for(cfg, resume)
    init_ray(cfg)
    tracker = Tracker.open(cfg, run_dir, resume)
    rows: list[dict] = []
    searches: dict[str, float] = {}
    try:
        pending: dict[Any, tuple[ExperimentConfig, str, bool]] = {}
        for method in cfg.methods():
            mcfg = cfg.for_method(method)
            traj = _search(mcfg, run_dir, tracker, resume) if mcfg.uses_ticket() else None
            if traj:
                searches[method] = traj.mini_epochs[-1].seconds
            primary = Combo(mcfg.search.gamma, mcfg.prune.head_ratio, mcfg.prune.ffn_ratio)
            for combo in traj.stops if traj else [None]:
                out = run_dir / method / ticket_name(combo)
                key = f"ticket/{method}/{out.name}"
                is_primary = combo is None or combo == primary
                if (out / RESULT_FILE).exists():  # finished before a crash: no retraining
                    pending[ray.put(json.loads((out / RESULT_FILE).read_text()))] = (mcfg, key, is_primary)
                    continue
                ref = ticket_task.options(
                    num_cpus=mcfg.ray.ticket_cpus, num_gpus=mcfg.ray.ticket_gpus, max_retries=mcfg.ray.max_retries,
                    retry_exceptions=False,
                ).remote(mcfg.model_dump(mode="json"), str(run_dir / method / "trajectory.pt") if traj else None,
                         vars(combo) if combo else None, str(out), max(1, int(mcfg.ray.ticket_cpus)))  # fmt: skip
                pending[ref] = (mcfg, key, is_primary)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            mcfg, key, is_primary = pending.pop(ref)
            result = ray.get(ref)
            if key not in tracker.existing:
                _log_ticket(mcfg, tracker, key, result, is_primary)
            rows.append(summary_row(result, Path(result["ticket_dir"])))
        timing = wall_time_shares(time.perf_counter() - started, searches, rows, run_dir)
        T.log_batch(tracker.client, tracker.parent_id, metrics=timing)
    except BaseException as err:
        tracker.close("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    tracker.close("FINISHED")
    (run_dir / "summary.json").write_text(json.dumps(rows, indent=1))
    (run_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    return rows


def wall_time_shares(wall: float, searches: dict[str, float], rows: list[dict], run_dir: Path) -> dict:
    """Where this invocation's wall time went: training compute, attacking (the pools' wall time once their
    actors were up), and the rest (Ray start-up, scheduling and queueing, checkpoints, loading models, data
    and attack resources, MLflow). Stages are assumed not to overlap (true when each takes the machine)."""
    attack = 0.0
    for summary in run_dir.glob(f"*/*/{ATTACK_DIR}/summary.json"):
        attack += json.loads(summary.read_text()).get("info", {}).get("pool", {}).get("wall_seconds", 0.0)
    training = sum(searches.values()) + sum(r["finetune_seconds"] for r in rows)
    return {
        "wall_seconds": wall, "training_seconds": training, "attack_seconds": attack,
        "overhead_seconds": wall - training - attack, "overhead_share": (wall - training - attack) / wall,
    }  # fmt: skip


def summary_row(result: dict, ticket_dir: Path) -> dict:
    row = {k: result[k] for k in ("method", "gamma", "head_ratio", "ffn_ratio", "stop_epoch", "converged",
                                  "clean_acc", "search_seconds", "finetune_seconds", "train_seconds", "params")}  # fmt: skip
    summary_file = ticket_dir / ATTACK_DIR / "summary.json"
    if summary_file.exists():
        row |= _attack_metrics(json.loads(summary_file.read_text()))
    return row
