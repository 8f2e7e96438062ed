"""Starting or joining Ray: one place, so every entry point agrees on how."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from er_ray.config import ExperimentConfig, UserError, settings
from er_ray.orchestration import ray_patches


def init_ray(cfg: ExperimentConfig | None = None, num_cpus: int | None = None) -> None:
    """Join `ray.address` / RAY_ADDRESS when given, else start a local Ray sized to this machine.

    A Ray already initialised in this process (a test session, a notebook) is reused as it is.
    """
    # one checkpoint per mini-epoch is the design; Tune's warning about frequent experiment snapshots is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray_patches.no_auto_connect()
    import ray

    if ray.is_initialized():
        return
    address = (cfg.ray.address if cfg else None) or settings().ray_address
    # workers' warnings and progress reach the terminal (Ray prefixes each line with its worker and folds
    # repeats across workers); the per-checkpoint INFO lines of Tune are silenced in the trainable
    # ray.init replaces the driver's SIGTERM handler with one that exits at once: keep the caller's (the CLI
    # turns SIGTERM into an interrupt, so runs end KILLED and can be resumed)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    # every worker loads a pre-trained encoder under a classifier head initialised from the seed, on purpose:
    # Hugging Face's "newly initialized ... You should probably TRAIN this model" once per worker is noise
    quiet = {"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}}
    if address:
        try:
            ray.init(address=address, runtime_env=quiet, logging_level=logging.WARNING)
        except ConnectionError:
            raise UserError(join_failed(address)) from None
    else:
        # "local": always a fresh Ray of our own; a bare init() would join whatever Ray instance this machine
        # last started (another user's run, or the leftovers of a driver that was killed). Its token
        # authentication is Ray's default and stays on; the warning that says so on every start does not.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env=quiet,
            logging_level=logging.WARNING,  # not "Started a local Ray instance": the run says where it is
        )
    if main and previous is not None:
        signal.signal(signal.SIGTERM, previous)


def join_failed(address: str) -> str:
    """Why joining the Ray at `address` failed, in one line with its fix: a head that answers refused this
    driver's token (Ray 2.60 turns token authentication on), or nothing answers there."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError):
        return f"no Ray answers at {address} (ray.address / RAY_ADDRESS): start one with `ray start --head`"
    return (
        f"the Ray at {address} refused this driver's authentication token: give the driver the head's token "
        "(RAY_AUTH_TOKEN, or the head's ~/.ray/auth_token via RAY_AUTH_TOKEN_PATH), or, on a machine of your "
        "own, start the head and the driver with RAY_AUTH_MODE=disabled (docs/cluster.md)"
    )


def shutdown_ray(timeout: float = 30.0) -> bool:
    """`ray.shutdown()` (a local Ray's processes end with it; a joined cluster is only left), given at most
    `timeout` seconds; False when it did not return in time."""
    import ray

    done = threading.Thread(target=ray.shutdown, daemon=True, name="ray-shutdown")
    done.start()
    done.join(timeout)
    return not done.is_alive()


def gib(gb: float) -> int | None:
    """A `memory` resource request in bytes; None (no reservation) for 0."""
    return int(gb * 2**30) or None
