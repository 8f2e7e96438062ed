"""Starting or joining Ray: one place, so every entry point agrees on how."""

from __future__ import annotations

import os

from er_ray.config import ExperimentConfig, settings


def init_ray(cfg: ExperimentConfig | None = None, num_cpus: int | None = None) -> None:
    """Join `ray.address` / RAY_ADDRESS when given, else start a local Ray sized to this machine.

    A Ray already initialised in this process (a test session, a notebook) is reused as it is.
    """
    # one checkpoint per mini-epoch is the design; Tune's warning about frequent experiment snapshots is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    if ray.is_initialized():
        return
    address = (cfg.ray.address if cfg else None) or settings().ray_address
    # workers import er_ray from this checkout; keep their output quiet unless something fails
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
