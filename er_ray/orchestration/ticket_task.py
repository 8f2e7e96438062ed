"""The work of one ticket on a Ray worker: rewind and fine-tune the drawn masks (or train a full-model
baseline) into its folder of the run (a local path or a storage URI)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from er_ray.config import ExperimentConfig
from er_ray.convergence import Combo
from er_ray.layout import RESULT_FILE
from er_ray.methods import SplitData, prepare, run_model, with_threads
from er_ray.orchestration.nodes import here
from er_ray.orchestration.ray_env import gib
from er_ray.search import Trajectory
from er_ray.storage import Store, is_uri
from er_ray.ticket import Masks

STEP_REPORT_SECONDS = 5.0  # how often a ticket tells the driver its fine-tuning step


@ray.remote
def ticket_task(
    experiment: dict,
    data: SplitData,
    traj: Trajectory | None,
    combo: Combo | None,
    masks: Masks | None,
    out: str,
    threads: int,
    started: Any,
    key: str,
) -> dict:
    """Rewind + fine-tune one ticket of drawn `masks` (or train a full-model baseline) into `out` (a path or a
    storage URI); returns its TicketResult."""
    # fire and forget: a task blocked in ray.get lends its CPUs to another task (oversubscribing the node)
    node = here()
    started.actor.put_nowait.remote(("ticket", key, time.time(), node))
    prep = prepare(with_threads(ExperimentConfig.model_validate(experiment), threads), data=data)
    prep.on_step = _step_reporter(started, key, node)
    if not is_uri(out):
        return run_model(prep, Path(out), combo, traj, masks).to_json()
    with tempfile.TemporaryDirectory(prefix="er-ray-ticket-") as scratch:  # this node's disk, then the store
        local = Path(scratch) / Store.at(out).name
        result = run_model(prep, local, combo, traj, masks).to_json() | {"ticket_dir": out}
        (local / RESULT_FILE).write_text(json.dumps(result, indent=1))  # where the ticket lives now
        Store.at(out).upload(local, last=RESULT_FILE)
    return result


def _step_reporter(queue: Any, key: str, node: str) -> Any:
    """`on_step` that puts ("steps", key, (step, total), node) on the driver's queue at most every few
    seconds."""
    last = 0.0

    def on_step(step: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= STEP_REPORT_SECONDS or step == total:
            last = now
            queue.actor.put_nowait.remote(("steps", key, (step, total), node))

    return on_step


def submit_ticket(
    cfg: ExperimentConfig,
    data: Any,
    traj: Any,
    combo: Combo | None,
    masks: Masks | None,
    out: Store,
    started: Any,
    key: str,
) -> Any:
    """`ticket_task` under the config's resource requests and retries; returns its object ref."""
    c = cfg.ray
    options = {
        "num_cpus": c.ticket_cpus,
        "num_gpus": c.ticket_gpus,
        "memory": gib(c.ticket_memory_gb),
        "resources": dict(c.ticket_node_resources),
        "max_retries": c.max_retries,
        "retry_exceptions": False,
    }
    threads = max(1, int(c.ticket_cpus))  # torch's threads: what the task holds
    return ticket_task.options(**options).remote(
        cfg.model_dump(mode="json"), data, traj, combo, masks, out.uri, threads, started, key
    )
