"""The Ray layer: Tune search + Stopper, fan-out per (gamma, ratios), MLflow states, resume and retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import mlflow
import pytest
import torch
from conftest import own_processes, start_driver, tiny_experiment

from er_ray import events as ev
from er_ray import tracking as T
from er_ray.convergence import Combo
from er_ray.layout import TRAJECTORY_FILE
from er_ray.methods import prepare, search_stage
from er_ray.orchestration.search_tune import PENDING, ConvergenceStopper


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from er_ray.orchestration.ray_env import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _runs(uri: str, kind: str | None = None):
    client = mlflow.tracking.MlflowClient(uri)
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], max_results=1000)
    ]
    return [r for r in runs if kind is None or r.data.tags.get(T.TAG_KIND) == kind]


def run_search(cfg, storage, resume=False):
    """One search stage under Tune, blocking: its trajectory and last result."""
    import ray

    from er_ray.methods import load_data
    from er_ray.orchestration import search_tune as S

    tuner = S.search_tuner({cfg.method: cfg}, storage, ray.put(load_data(cfg)), "", resume)
    (result,) = list(tuner.fit())
    assert result.error is None, result.error
    return S.load_trajectory(result.checkpoint), dict(result.metrics or {})


def test_stopper_waits_until_no_combo_is_pending():
    stopper = ConvergenceStopper()
    assert not stopper("t", {PENDING: 2}) and not stopper("t", {PENDING: 1})
    assert stopper("t", {PENDING: 0})
    assert not stopper("t", {"mask_distance_heads": 0.0}) and not stopper.stop_all()  # no count: keep going


def test_tune_search_equals_the_in_process_search(ray_session, tiny_model_dir, tmp_path):
    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"sweep.gammas": "[0.2, 0.5]", "ray.search_cpus": 1})
    traj, last = run_search(cfg, tmp_path / "tune")
    local = search_stage(prepare(cfg))
    assert traj.stops == local.stops and all(s.converged for s in traj.stops.values())
    # the Stopper ended the trial at the last combo's stop point, not at the cap
    assert last["mini_epoch"] == max(s.decision for s in local.stops.values())
    combo = Combo(0.5, 0.25, 0.3)
    assert torch.equal(traj.at(combo).ffn, local.at(combo).ffn)
    assert last[T.MASK_DISTANCE_HEADS] == local.mini_epochs[last["mini_epoch"]].head_distance


def test_a_search_stopped_like_ctrl_c_resumes_to_the_uninterrupted_trajectory(
    ray_session, tiny_model_dir, tmp_path
):
    """Tune's own Ctrl-C handler exists only when fit() runs on the main thread; a sweep fits on a thread and
    must still end Tune's loop with a consistent experiment state (checkpoints it names exist on storage)."""
    import queue
    import threading

    from er_ray.methods import load_data
    from er_ray.orchestration import search_tune as S

    cfg = tiny_experiment(
        tiny_model_dir, tmp_path, **{"search.max_epochs": 6, "search.patience": 100, "ray.search_cpus": 1}
    )  # never converges: runs to the cap
    local = search_stage(prepare(cfg))
    last = local.mini_epochs[-1].index
    data_ref = ray_session.put(load_data(cfg))
    events = S.CHANNELS["stop-test"] = queue.Queue()
    stop, outcome = threading.Event(), []
    tuner = S.search_tuner({cfg.method: cfg}, tmp_path / "tune", data_ref, "stop-test", False)
    fit = threading.Thread(target=lambda: outcome.append(S.fit_until(tuner, stop)))
    fit.start()
    seen = 0
    while seen < 3:
        seen += events.get(timeout=120).kind == "trajectory"
    stop.set()
    fit.join(60)
    assert not fit.is_alive(), "Tune's loop did not end when asked"
    (stopped,) = list(outcome[0])
    assert stopped.metrics["mini_epoch"] < last - 3 and os.path.isdir(stopped.checkpoint.path)

    resumed = S.search_tuner({cfg.method: cfg}, tmp_path / "tune", data_ref, "stop-test", True)
    (result,) = list(resumed.fit())
    S.CHANNELS.pop("stop-test")
    assert result.error is None and result.metrics["mini_epoch"] == last
    traj = S.load_trajectory(result.checkpoint)
    assert traj.stops == local.stops
    assert [p.head_distance for p in traj.mini_epochs] == [p.head_distance for p in local.mini_epochs]


def _sweep_config(model_dir, out, **over):
    return tiny_experiment(
        model_dir,
        out,
        **{
            "sweep.gammas": "[0.2, 0.5]",
            "sweep.ffn_ratios": "[0.2, 0.3]",
            "ray.attack": "false",
            "ray.search_cpus": 1,
            "ray.ticket_cpus": 1,
            "tracking.uri": f"sqlite:///{out}/mlflow.db",
            **over,
        },
    )


def test_fan_out_one_ticket_per_combo_and_mlflow_states(ray_session, tiny_model_dir, tmp_path, monkeypatch):
    from er_ray.orchestration import console
    from er_ray.orchestration.pipeline import run_pipeline

    seen: list = []  # what the status line is built from
    emit = console.Progress.emit
    monkeypatch.setattr(console.Progress, "emit", lambda self, e: (seen.append(e), emit(self, e))[1])
    cfg = _sweep_config(
        tiny_model_dir, tmp_path, **{"ray.methods": "[earlyrobust, finetune]", "runtime.threads": 2}
    )
    rows = run_pipeline(cfg)
    # the workers told the driver their fine-tuning steps while they trained (a tiny ticket may finish before
    # its fire-and-forget report is read: the driver then drops it, so not every ticket need show)
    stepped = {e.key for e in seen if isinstance(e, ev.TicketSteps) and 0 < e.step <= e.total}
    assert stepped and stepped <= {e.key for e in seen if isinstance(e, ev.TicketStarted)}
    # a task runs as many torch threads as it holds CPUs (ray.ticket_cpus 1), not runtime.threads
    assert {
        json.loads(p.read_text())["threads"] for p in tmp_path.glob("tiny/runs/*/*/seed3/*/result.json")
    } == {1}
    tickets = [(r["method"], r["gamma"], r["ffn_ratio"]) for r in rows]
    assert sorted(t for t in tickets if t[0] == "earlyrobust") == [
        ("earlyrobust", g, f) for g in (0.2, 0.5) for f in (0.2, 0.3)
    ]
    assert ("finetune", None, 0.0) in tickets and len(tickets) == 5
    uri = cfg.tracking.uri
    assert [r.info.status for r in _runs(uri, "parent")] == ["FINISHED"]
    assert len(_runs(uri, "search")) == 1 and len(_runs(uri, "ticket")) == 5
    assert all(r.info.status == "FINISHED" for r in _runs(uri))
    primary = [r for r in _runs(uri, "ticket") if r.data.tags[T.TAG_PRIMARY] == "1"]
    assert sorted(r.data.params["method"] for r in primary) == ["earlyrobust", "finetune"]
    search = _runs(uri, "search")[0]
    hist = mlflow.tracking.MlflowClient(uri).get_metric_history(search.info.run_id, T.MASK_DISTANCE_FFN)
    assert len(hist) >= 2 and all(0 <= m.value <= 1 for m in hist)
    for r in _runs(uri, "ticket"):
        assert {T.CLEAN_ACC, T.TRAIN_SECONDS, T.FINETUNE_SECONDS} <= set(r.data.metrics)
    (timing_file,) = (tmp_path / "tiny" / "runs").glob("*/timing.json")
    (timing,) = json.loads(timing_file.read_text())  # one invocation
    assert 0 < timing[T.BUSY_SECONDS] < timing[T.WALL_SECONDS]
    assert timing[T.OVERHEAD_SHARE] == pytest.approx(1 - timing[T.BUSY_SECONDS] / timing[T.WALL_SECONDS])
    assert _runs(uri, "parent")[0].data.metrics[T.OVERHEAD_SHARE] == pytest.approx(timing[T.OVERHEAD_SHARE])
    for r in _runs(uri):  # every ticket and search run carries its seed
        if r.data.tags[T.TAG_KIND] in ("search", "ticket"):
            assert r.data.params[T.PARAM_SEED] == "3"
    parent = _runs(uri, "parent")[0]
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40  # MLflow's Source / Version columns
    for r in (parent, *_runs(uri, "ticket")):  # MLflow's Dataset column: both splits, by name and digest
        inputs = {(d.dataset.name, t.value) for d in r.inputs.dataset_inputs for t in d.tags}
        assert inputs == {("sst2/train", "train"), ("sst2/validation", "eval")}


def test_primary_tickets_are_mlflow_models_that_predict_label_names(ray_session, tiny_model_dir, tmp_path):
    from er_ray.orchestration.pipeline import run_pipeline

    cfg = _sweep_config(tiny_model_dir, tmp_path, **{"sweep.gammas": "[0.5]"})
    run_pipeline(cfg)
    assert (
        os.environ.get("MLFLOW_TRACKING_URI") != cfg.tracking.uri
    )  # logging the model left no global behind
    by_primary = {r.data.tags[T.TAG_PRIMARY]: r for r in _runs(cfg.tracking.uri, "ticket")}
    assert set(by_primary) == {"0", "1"}
    run_id, exp = by_primary["1"].info.run_id, by_primary["1"].info.experiment_id
    with T.fluent(cfg.tracking.uri):
        models = {m.source_run_id: m for m in mlflow.search_logged_models([exp], output_format="list")}
        assert set(models) == {run_id}  # the config's own combo only, by default
        name = by_primary["1"].data.tags[T.TAG_MODEL]  # the model says what it is, in the UI's Models list
        assert models[run_id].name == name and name.startswith("sst2-earlyrobust-seed3-g")
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{name}")
        assert model.metadata.signature is not None and "transformers" in model.metadata.flavors
        out = model.predict(["a gripping, funny film", "dull and far too long"])
        assert len(out) == 2 and set(out["label"]) <= {"negative", "positive"}
        card = mlflow.artifacts.load_text(f"runs:/{run_id}/{name}/model_card.md")
        assert "| method | earlyrobust |" in card and "| seed | 3 |" in card  # the export's card
        version = mlflow.register_model(f"runs:/{run_id}/{name}", "tiny-ticket")
        assert str(version.version) == "1" and version.run_id == run_id


def test_bad_input_found_by_a_trial_is_reported_once_not_retried_and_ends_runs_failed(
    ray_session, tiny_model_dir, tmp_path
):
    from transformers import AutoConfig, AutoTokenizer

    from er_ray.config import UserError
    from er_ray.orchestration.pipeline import run_pipeline

    # tokenizer and config but no weights (`check` would refuse it; the pipeline is called directly): the
    # driver reads the data, the search trial finds the input bad on its worker
    broken = tmp_path / "no-weights"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    AutoConfig.from_pretrained(tiny_model_dir).save_pretrained(broken)
    cfg = _sweep_config(tiny_model_dir, tmp_path, **{"model.name_or_path": str(broken), "ray.max_retries": 2})
    with pytest.raises(UserError, match="has no weights"):
        run_pipeline(cfg)
    assert not list(tmp_path.rglob("error.txt"))  # Tune never saw the trial fail: nothing was retried
    runs = _runs(cfg.tracking.uri)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert [r.info.status for r in _runs(cfg.tracking.uri, "parent")] == ["FAILED"]


def test_killed_ticket_worker_is_retried(ray_session, tiny_model_dir, tmp_path):
    import threading

    from er_ray.orchestration.pipeline import run_pipeline

    cfg = _sweep_config(
        tiny_model_dir,
        tmp_path,
        **{"sweep.gammas": "[0.2]", "sweep.ffn_ratios": "[0.3]", "finetune.epochs": 30},
    )
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for pid in own_processes("ray::ticket_task"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    thread = threading.Thread(target=killer)
    thread.start()
    rows = run_pipeline(cfg)
    thread.join()
    assert killed, "the ticket task never started"
    assert len(rows) == 1 and 0 <= rows[0]["clean_acc"] <= 1
    assert [r.info.status for r in _runs(cfg.tracking.uri, "ticket")] == ["FINISHED"]


def test_driver_killed_mid_sweep_resumes_without_redoing_work(ray_session, tiny_model_dir, tmp_path):
    cfg = _sweep_config(tiny_model_dir, tmp_path, **{"finetune.epochs": 20})
    driver = start_driver(cfg, tmp_path, ray_session, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "tiny" / "runs"
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/earlyrobust/seed3/*/result.json")):
        time.sleep(0.3)
    driver.kill()  # the driver dies once a ticket has finished (tickets start while the search goes on)
    driver.wait()
    (run_dir,) = runs.iterdir()
    traj_file = run_dir / "earlyrobust" / "seed3" / TRAJECTORY_FILE
    traj_mtime = traj_file.stat().st_mtime if traj_file.exists() else None
    done = {p: p.stat().st_mtime for p in run_dir.glob("earlyrobust/seed3/*/result.json")}
    assert done

    from er_ray.orchestration.pipeline import run_pipeline

    rows = run_pipeline(cfg, resume=True)
    assert len(rows) == 4 and traj_file.exists()
    assert traj_mtime is None or traj_file.stat().st_mtime == traj_mtime  # no second search
    assert all(p.stat().st_mtime == m for p, m in done.items())  # finished tickets were not retrained
    uri = cfg.tracking.uri
    assert [r.info.status for r in _runs(uri, "parent")] == ["FINISHED"]
    assert [r.info.status for r in _runs(uri, "search") if r.info.status == "FINISHED"] == ["FINISHED"]
    tickets = [r for r in _runs(uri, "ticket") if r.info.status == "FINISHED"]
    assert len(tickets) == 4 and len({r.data.tags["er_ray.key"] for r in tickets}) == 4
    assert not [r for r in _runs(uri) if r.info.status == "RUNNING"]
    history = json.loads((run_dir / "timing.json").read_text())  # the killed invocation never wrote its own
    assert len(history) == 1 and 0 <= history[0][T.OVERHEAD_SHARE] < 1


def test_run_folder_is_absolute_for_a_relative_output_dir(tmp_path, monkeypatch):
    """Tune rejects relative storage paths; the default output_dir ('outputs') is relative."""
    from er_ray.config import config_from_dict
    from er_ray.layout import RunFolder

    def run_dir_for(cfg, resume):
        if resume:
            return RunFolder.latest(cfg).root
        folder = RunFolder.new(cfg)
        folder.create("parent-run-id")
        return folder.root

    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"name": "rel", "runtime": {"output_dir": "outputs"}})
    run_dir = run_dir_for(cfg, resume=False).local
    assert (
        run_dir.is_absolute() and run_dir.is_dir() and run_dir.parent == tmp_path / "outputs" / "rel" / "runs"
    )
    assert run_dir_for(cfg, resume=True).local == run_dir
    with pytest.raises(Exception, match="nothing to resume"):
        run_dir_for(config_from_dict({"name": "other"}), resume=True)


def test_a_resumed_search_that_ends_before_its_trajectory_arrives_waits_for_it(tiny_model_dir, tmp_path):
    # a Ctrl-C between a trial's last checkpoint and the driver reading it: on resume Tune ends the trial at
    # once, and its end reaches the driver before the trajectory that the fit's results carry
    from er_ray.orchestration import search_tune as S
    from er_ray.orchestration.pipeline import Search, Sweep

    cfg = tiny_experiment(tiny_model_dir, tmp_path)
    traj = search_stage(prepare(cfg))
    sweep = Sweep.__new__(Sweep)  # the driver's event handling alone: no Ray, no Tune
    search = Search("search/earlyrobust/seed3", cfg, None, started=True)
    completed: list[str] = []
    sweep._on_trajectory = lambda s, t: setattr(s, "traj", t)
    sweep._complete = lambda s: completed.append(s.key)
    sweep._on_search_event(search, S.Event("complete", search.key))
    assert completed == [] and not search.done  # no crash, and not over yet
    sweep._on_search_event(search, S.Event("trajectory", search.key, traj))
    sweep._on_search_event(search, S.Event("complete", search.key))
    assert completed == [search.key]


def test_a_started_ticket_silent_for_long_counts_as_waiting_so_idle_attack_actors_make_room(
    tiny_model_dir, tmp_path
):
    # its worker died and Ray's retry waits for the CPUs that idle attack actors hold: seen deadlocked once
    from types import SimpleNamespace

    from er_ray.orchestration.pipeline import SILENT_S, Job, Sweep

    cfg = tiny_experiment(tiny_model_dir, tmp_path)
    sweep = Sweep.__new__(Sweep)  # the driver's scheduling decision alone: no Ray
    calls = []
    sweep.service = SimpleNamespace(make_room=lambda *a: calls.append(a[:3]))
    sweep.cfg, sweep.searches, sweep.room_checked = cfg, {}, 0.0
    job = Job("ticket/earlyrobust/seed3/g", cfg, None, None, True, started=True, heard=time.monotonic())
    sweep.jobs, sweep.running = {job.key: job}, {"ref": job.key}
    sweep._make_room()
    assert calls[-1] == (0, 0, True)  # training, as it reported a step just now
    job.heard -= SILENT_S + 1
    sweep.room_checked = 0.0
    sweep._make_room()
    assert calls[-1] == (1, 0, False)  # waiting, and nothing running will free CPUs


def test_one_ctrl_c_ends_the_run_killed_and_resume_finishes_it(ray_session, tiny_model_dir, tmp_path):
    cfg = _sweep_config(tiny_model_dir, tmp_path, **{"search.max_epochs": 20, "finetune.epochs": 5})
    # a terminal's Ctrl-C goes to the whole foreground process group: run the driver in its own
    driver = start_driver(
        cfg,
        tmp_path,
        ray_session,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("tiny/runs/*/search/*/checkpoint_*")):
        time.sleep(0.3)
    assert driver.poll() is None, driver.communicate()[0][-2000:]
    os.killpg(driver.pid, signal.SIGINT)  # once
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out[-2000:]
    uri = cfg.tracking.uri
    assert [r.info.status for r in _runs(uri, "parent")] == ["KILLED"]
    assert not [r for r in _runs(uri) if r.info.status == "RUNNING"]

    from er_ray.orchestration.pipeline import run_pipeline

    assert len(run_pipeline(cfg, resume=True)) == 4
    assert [r.info.status for r in _runs(uri, "parent")] == ["FINISHED"]
    assert not [r for r in _runs(uri) if r.info.status == "RUNNING"]
    # the interrupted part counts in the run's time: both invocations, each with how it ended
    (timing_file,) = tmp_path.glob("tiny/runs/*/timing.json")
    history = json.loads(timing_file.read_text())
    assert [h["status"] for h in history] == ["KILLED", "FINISHED"] and history[0][T.WALL_SECONDS] > 0
    (parent,) = _runs(uri, "parent")
    walls = mlflow.MlflowClient(uri).get_metric_history(parent.info.run_id, T.WALL_SECONDS)
    assert sorted(m.step for m in walls) == [0, 1]
