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


def _command(cfg, folder) -> tuple[list[str], dict[str, str]]:
    """`er-ray run` of `cfg` (written to folder/cfg.yaml) and an environment without RAY_ADDRESS: the run
    starts a local Ray of its own, as a user's first run does."""
    cfg_file = folder / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return [sys.executable, "-m", "er_ray.cli", "run", str(cfg_file)], env


def _start(cmd: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def _wait_for(driver: subprocess.Popen, found) -> None:
    """Until `found()` (the first checkpoint, say), with the driver still running."""
    deadline = time.time() + 240
    while time.time() < deadline and not found():
        time.sleep(0.3)
    assert driver.poll() is None, driver.communicate()[0][-2000:]


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
    cmd, env = _command(cfg, tmp_path)
    driver = _start(cmd, env, start_new_session=True)  # its own process group, as in a terminal
    _wait_for(driver, lambda: list(tmp_path.glob("tiny/runs/*/search/*/checkpoint_*")))
    assert _session_processes(driver.pid), "the run's Ray processes were not found"
    # once: a terminal's Ctrl-C reaches the whole process group, `kill` / `ray job stop` the driver alone
    if how == signal.SIGINT:
        os.killpg(driver.pid, how)
    else:
        os.kill(driver.pid, how)
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 130, out[-2000:]
    assert f"to continue: er-ray run {cmd[-1]} --resume" in out, out[-2000:]
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
            "runtime.status_seconds": 1,
        },
    )
    cmd, env = _command(cfg, tmp_path)
    drivers = [_start(cmd, env), _start(cmd, env)]
    outs = [d.communicate(timeout=600)[0] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], [o[-1500:] for o in outs]
    # where each run is, every second, as plain lines: the output is a pipe, not a terminal
    assert all(" status: " in o and "tickets " in o and "\x1b" not in o and "\r" not in o for o in outs), outs
    folders = sorted((tmp_path / "tiny" / "runs").iterdir())
    assert len(folders) == 2 and all((f / PARENT_ID_FILE).is_file() for f in folders)
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = {r.info.run_id for r in runs if r.data.tags["er_ray.kind"] == "parent"}
    assert {(f / PARENT_ID_FILE).read_text().strip() for f in folders} == parents
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 2 * (
        1 + 1 + 2
    )  # parent, search, 2


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    """`Store.put` and `write_bytes` on a file system that refuses the write (a file-size limit stands in for a
    full disk, always available): the error goes up, no `.tmp` stays, the old file is untouched."""
    script = f"""
import resource, signal, sys
from pathlib import Path
from er_ray.storage import Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a signal
big = Path({str(tmp_path)!r}) / "big"
big.write_bytes(b"x" * 100_000)
target = Store.at({str(tmp_path)!r}) / "dst" / "state.safetensors"
target.write_bytes(b"old")
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
for write in (lambda: target.put(big), lambda: target.write_bytes(big.read_bytes())):
    try:
        write()
    except OSError as err:
        print("refused", err.errno)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["refused 27", "refused 27"], out.stdout + out.stderr
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["state.safetensors"]
    assert (tmp_path / "dst" / "state.safetensors").read_bytes() == b"old"


def test_fault_lines_name_the_cause_and_the_path():
    import errno

    from ray.exceptions import RayTaskError

    from er_ray.storage import Store, fault_line

    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/a", None, "/out/x.tmp")
    assert fault_line(full) == "no space left on device: /out/x.tmp"
    # pyarrow's errors carry no path: the caller's is used; Ray's wrapped task errors are looked through
    arrow = OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    wrapped = RayTaskError("train", "traceback", arrow).as_instanceof_cause()
    try:
        raise RuntimeError("search stage failed") from wrapped
    except RuntimeError as err:
        assert fault_line(err, Store.at("/out/run")) == "no space left on device: /out/run"
    gone = OSError("When uploading part: AWS Error NO_SUCH_BUCKET during UploadPart operation")
    assert fault_line(gone).startswith("the bucket does not exist")
    assert fault_line(OSError(errno.ECONNRESET, "Connection reset")) is None
    assert fault_line(ValueError("no space left on device")) is None  # only a storage error is a fault


def _tmpfs(path, size="40m"):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    return path


def _fill(folder):
    """Write a ballast file until the file system is full."""
    with open(folder / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as err:
            assert err.errno == 28


@pytest.mark.parametrize("tune_state", ["intact", "truncated"])
def test_a_full_disk_stops_in_one_line_and_resume_continues_from_the_restart_state(
    tune_state, tiny_model_dir, tmp_path
):
    """The run folder's disk fills after the first checkpoint: one line naming the cause and the path, exit 1,
    every MLflow run ended, no partial file. Once space is freed, `--resume` continues from the last restart
    state, through Tune's state when it is intact or a new Tune run when a file of it was truncated, saying
    which; no mini-epoch is searched twice."""
    from er_ray.layout import TUNE_DIR

    disk = _tmpfs(tmp_path / "disk")
    try:
        cfg = tiny_experiment(
            tiny_model_dir,
            disk,
            **{  # a search that cannot converge (patience beyond the cap): the disk fills during it
                "search.patience": 100,
                "search.max_epochs": 6,
                "ray.attack": "false",
                "ray.search_cpus": 1,
                "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
            },
        )
        cmd, env = _command(cfg, tmp_path)
        driver = _start(cmd, env)
        _wait_for(driver, lambda: list(disk.glob("tiny/runs/*/search/*/checkpoint_*")))
        _fill(disk)
        out = driver.communicate(timeout=240)[0]
        assert driver.returncode == 1, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"er-ray: error: no space left on device: {disk}/tiny/runs/"), out[-3000:]
        assert "Traceback" not in out and "--resume" in last, out[-3000:]
        assert not [p for p in disk.rglob("*.tmp")]
        runs = _mlflow_runs(cfg.tracking.uri)
        assert {r.info.status for r in runs} <= {"FAILED", "KILLED"}, [r.info.status for r in runs]

        (disk / "ballast").unlink()
        state = next((disk / "tiny" / "runs").glob(f"*/{TUNE_DIR}/basic-variant-state-*.json"))
        if tune_state == "truncated":  # what a full disk did to Tune's own state before it was caught
            state.write_bytes(state.read_bytes()[:20])
        done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        # the full disk itself may have cut a file of Tune's: then the resume says so too (either way in one line)
        damaged = f"{TUNE_DIR} is damaged (" in done.stderr
        assert damaged or (tune_state == "intact" and "continue from Tune's state" in done.stderr), (
            done.stderr
        )
        if damaged:
            assert "the unfinished searches start again from their restart states" in done.stderr
        runs = _mlflow_runs(cfg.tracking.uri)
        assert {r.info.status for r in runs} == {"FINISHED"}, [r.info.status for r in runs]
        client = _client(cfg.tracking.uri)
        (search,) = [r for r in runs if r.data.tags["er_ray.kind"] == "search"]
        steps = [m.step for m in client.get_metric_history(search.info.run_id, "mask_distance_heads")]
        assert len(steps) == len(set(steps)) and steps, steps  # from the restart state, not from the start
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _mlflow_runs(uri):
    client = _client(uri)
    return client.search_runs([client.get_experiment_by_name("tiny").experiment_id])


def test_a_bucket_deleted_mid_run_stops_it_in_one_line(s3, tiny_model_dir, tmp_path):
    """The run folder's bucket disappears after the first checkpoint: one line naming it, exit 1, every
    MLflow run ended (the store is local)."""
    import boto3

    endpoint = re.search(r"endpoint_override=([^&]+)", s3).group(1)
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    client.create_bucket(Bucket="vanishing")
    cfg = tiny_experiment(
        tiny_model_dir,
        s3.replace("er-ray-test", "vanishing").format("out"),
        **{
            "search.max_epochs": 40,
            "ray.attack": "false",
            "ray.search_cpus": 1,
            "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
        },
    )
    driver = _start(*_command(cfg, tmp_path))

    def keys() -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket="vanishing").get("Contents", [])]

    _wait_for(driver, lambda: [k for k in keys() if "/checkpoint_" in k])
    while True:  # S3 deletes only an empty bucket, and the run keeps writing
        for key in keys():
            client.delete_object(Bucket="vanishing", Key=key)
        try:
            client.delete_bucket(Bucket="vanishing")
            break
        except client.exceptions.ClientError:
            continue
    out = driver.communicate(timeout=240)[0]
    assert driver.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("er-ray: error: the bucket does not exist"), out[-3000:]
    assert "vanishing/out/tiny/runs/" in last and "Traceback" not in out, out[-3000:]
    assert last.endswith("start the run again")  # its run folder went with the bucket: nothing to resume
    assert {r.info.status for r in _mlflow_runs(cfg.tracking.uri)} <= {"FAILED", "KILLED"}


def test_a_driver_refused_by_rays_token_check_is_told_how_to_fix_it(tiny_model_dir, tmp_path):
    """A head started with token authentication, a driver holding another token: exit 2 and one last line
    that names the token and how to fix it (not Ray's `ConnectionError` traceback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    head_env = {**base, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "a" * 64}
    head = subprocess.Popen(  # --block: the head's processes end with this one, not by `ray stop` (all Rays)
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
        env=head_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        cfg = tiny_experiment(tiny_model_dir, tmp_path / "out", **{"ray.attack": "false"})
        cfg_file = tmp_path / "cfg.yaml"
        cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
        env = {**base, "HOME": str(tmp_path), "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_TOKEN": "b" * 64}
        done = subprocess.run(
            [sys.executable, "-m", "er_ray.cli", "run", str(cfg_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and last.startswith("er-ray: error: the Ray at"), done.stderr[-2000:]
        assert (
            "RAY_AUTH_TOKEN" in last and "RAY_AUTH_MODE=disabled" in last and "Traceback" not in done.stderr
        )
        assert not (tmp_path / "out").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)


# Ray 2.60's gRPC servers (the GCS, the raylet, every core worker including the driver's) listen on all
# interfaces and its runtime-env agent on the node's address: `_node_ip_address="127.0.0.1"` does not move
# them (measured; docs/reliability.md). Token authentication, on by default, guards them.
RAY_LISTENERS_ANYWHERE = ("gcs_server", "raylet", "ray::")


def test_a_local_ray_listens_beyond_loopback_only_where_ray_cannot_be_moved_and_with_its_token_on(tmp_path):
    script = """
import json, os, psutil, ray
from er_ray.orchestration.ray_env import init_ray
init_ray(num_cpus=1)

@ray.remote
class Probe:
    def ping(self):
        return 1

ray.get(Probe.remote().ping.remote())
me = psutil.Process()
out = []
for p in [me, *me.children(recursive=True)]:
    try:
        out += [[p.pid, p.name(), c.laddr.ip] for c in p.net_connections("inet") if c.status == "LISTEN"]
    except psutil.Error:
        pass
print(json.dumps({"auth": os.environ.get("RAY_AUTH_MODE"), "listening": out, "driver": me.pid}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # er-ray starts its own Ray
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["auth"] == "token"
    assert any(name == "gcs_server" for _, name, _ in found["listening"])  # the listing sees Ray's servers
    wide = [(pid, name, ip) for pid, name, ip in found["listening"] if ip not in ("127.0.0.1", "::1")]
    unexpected = [
        (name, ip)
        for pid, name, ip in wide
        if pid != found["driver"] and not name.startswith(RAY_LISTENERS_ANYWHERE)
    ]
    assert not unexpected, unexpected  # a dashboard, a metrics exporter, a client server: not started
