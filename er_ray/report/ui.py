"""`er-ray ui` (declared in er_ray.cli): the MLflow UI of a run's store, on 127.0.0.1, opened at the ticket
comparison (ticket runs, the columns of Table 1), until Ctrl-C.

The UI has no login and anyone who reaches its port can read and delete runs, so it binds the loopback
interface only; from another machine, tunnel (`ssh -L PORT:127.0.0.1:PORT host`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from er_ray import tracking as T
from er_ray.config import UserError, settings
from er_ray.report.cli import ReportTarget, target
from er_ray.storage import redact

START_SECONDS = 120.0  # a cold `mlflow ui` imports for tens of seconds on a slow machine


def comparison_url(base: str, experiment_id: str) -> str:
    """The runs table of an experiment in the model-training view, with er-ray's saved ticket view."""
    query = f"workflowType=machine_learning&viewStateShareKey={T.VIEW_KEY}"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def serve(which: ReportTarget, port: int) -> int:
    """Start the UI for the store `which` names (or, for a tracking server, use it), print the URL of the
    ticket comparison, and wait for Ctrl-C."""
    from mlflow.tracking import MlflowClient

    experiment, runs, uri = target(which)
    if experiment is None:
        client = MlflowClient(uri)
        experiment = client.get_experiment(client.get_run(runs[0]).info.experiment_id).name
    exp_id = T.ticket_view(uri, experiment)
    if uri.startswith(("http://", "https://")):  # a tracking server has its own UI
        print(f"MLflow UI: {comparison_url(redact(uri), exp_id)}", flush=True)
        return 0
    with socket.socket() as sock:  # another server on the port would answer for this one
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise UserError(f"port {port} on 127.0.0.1 is in use; pass --port")
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    log = settings().cache_dir / "mlflow-ui.log"  # the server's own lines: kept out of the console
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:  # the server keeps its own copy of the descriptor
        # its own process group: the UI's workers stop with it
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=out, start_new_session=True)
    try:
        _wait_until_up(proc, base, port, log)
        print(f"MLflow UI of {redact(uri)}, experiment '{experiment}' (Ctrl-C stops it):", flush=True)
        print(comparison_url(base, exp_id), flush=True)
        proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:  # its job consumers take long to stop and hold nothing of the store's
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_until_up(proc: subprocess.Popen, base: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None:
                last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
                raise UserError(f"the MLflow UI did not start on port {port}: {last}") from None
            if time.monotonic() > deadline:
                raise UserError(
                    f"the MLflow UI did not answer on port {port} in {START_SECONDS:.0f} s"
                ) from None
            time.sleep(0.5)
