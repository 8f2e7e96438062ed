"""Faults a user meets, each reproduced with real parts: interrupts that must leave nothing behind, models that
cannot be loaded (issue 19)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import tiny_experiment


def _session_processes(driver_pid: int) -> list[psutil.Process]:
    """The processes whose arguments name the Ray session folder a driver started (its name ends in the
    driver's pid), never matched by process name."""
    folder = re.compile(rf"session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{driver_pid}(?!\d)")
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != driver_pid and folder.search(" ".join(p.info["cmdline"] or [])):
            out.append(p)
    return out


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_one_interrupt_leaves_no_process_of_the_run_behind(how, tiny_model_dir, tmp_path):
    cfg = tiny_experiment(
        tiny_model_dir,
        tmp_path,
        **{
            "search.max_epochs": 40,
            "ray.attack": "false",
            "ray.search_cpus": 1,
            "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
        },
    )
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the run starts a local Ray of its own
    driver = subprocess.Popen(
        [sys.executable, "-m", "er_ray.cli", "run", str(cfg_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("tiny/runs/*/search/*/checkpoint_*")):
        time.sleep(0.3)
    assert driver.poll() is None, driver.communicate()[0][-2000:]
    assert _session_processes(driver.pid), "the run's Ray processes were not found"
    # once: a terminal's Ctrl-C reaches the whole process group, `kill` / `ray job stop` the driver alone
    if how == signal.SIGINT:
        os.killpg(driver.pid, how)
    else:
        os.kill(driver.pid, how)
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 130, out[-2000:]
    deadline = time.time() + 5  # a process still there 5 s after the driver exited was left behind
    while time.time() < deadline and _session_processes(driver.pid):
        time.sleep(0.5)
    left = [" ".join(p.cmdline())[:120] for p in _session_processes(driver.pid) if p.is_running()]
    assert not left, left


@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint", "no-weights"])
def test_an_unloadable_model_is_one_line_and_exit_2_before_any_work(damage, tiny_model_dir, tmp_path, capsys):
    import shutil

    from er_ray.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        weights.unlink()
    if damage == "not-a-checkpoint":
        (broken / "pytorch_model.bin").write_bytes(b"these are not weights")
    cfg = tiny_experiment(broken, tmp_path / "out")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    attack = ["attack", str(broken), "--actors", "2", "--num-examples", "2", "--recipes", "textbugger"]
    for argv in (["check", str(cfg_file)], ["run", str(cfg_file)], attack):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("er-ray: error:") and err.count("\n") == 1 and "weights" in err, err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_two_runs_started_together_on_a_new_store_both_finish(tiny_model_dir, tmp_path):
    """Two drivers start the same config at the same moment on a fresh sqlite store: each gets its own run
    folder (with its parent run in it) and both finish with every run FINISHED."""
    from mlflow.tracking import MlflowClient

    from er_ray.layout import PARENT_ID_FILE

    cfg = tiny_experiment(
        tiny_model_dir,
        tmp_path,
        **{
            "sweep.gammas": "[0.2, 0.5]",
            "ray.attack": "false",
            "ray.search_cpus": 1,
            "ray.ticket_cpus": 1,
            "tracking.uri": f"sqlite:///{tmp_path}/store/mlflow.db",
        },
    )
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "er_ray.cli", "run", str(cfg_file)]
    drivers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    drivers.append(
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
    outs = [d.communicate(timeout=600)[0] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], [o[-1500:] for o in outs]
    folders = sorted((tmp_path / "tiny" / "runs").iterdir())
    assert len(folders) == 2 and all((f / PARENT_ID_FILE).is_file() for f in folders)
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = {r.info.run_id for r in runs if r.data.tags["er_ray.kind"] == "parent"}
    assert {(f / PARENT_ID_FILE).read_text().strip() for f in folders} == parents
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 2 * (
        1 + 1 + 2
    )  # parent, search, 2
