"""What a sweep records in MLflow: the whole tree against a golden file recorded before the recorder rework."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import start_driver, tiny_experiment
from mlflow_tree import GOLDEN_DIR, compare, tree

from er_ray import tracking as T


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from er_ray.orchestration.ray_env import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _attacked_sweep(model_dir, out, **over):
    """Two methods, two gammas whose stop points coincide (gamma above any mask distance: one shared ticket),
    every model attacked by TextBugger on two sentences."""
    return tiny_experiment(
        model_dir,
        out,
        **{
            "ray.methods": "[earlyrobust, finetune]",
            "sweep.gammas": "[0.9, 0.8]",
            "search.gamma": 0.9,
            "ray.search_cpus": 1,
            "ray.ticket_cpus": 1,
            "attack.recipes": "[textbugger]",
            "attack.num_examples": 2,
            "attack.actors": 1,
            "attack.cpus_per_actor": 1,
            "tracking.uri": f"sqlite:///{out}/mlflow.db",
            **over,
        },
    )


def test_a_sweeps_mlflow_tree_is_the_recorded_one(ray_session, tiny_model_dir, tmp_path):
    from er_ray.orchestration.pipeline import run_pipeline

    cfg = _attacked_sweep(tiny_model_dir, tmp_path)
    run_pipeline(cfg)
    compare(
        tree(cfg.tracking.uri, {str(tmp_path): "<out>", str(tiny_model_dir): "<model>"}), "attacked_sweep"
    )


def test_an_mlflow_outage_mid_sweep_loses_nothing_and_is_said_once(
    ray_session, tiny_model_dir, tmp_path, mlflow_server, capfd
):
    """The tracking server goes away while the search runs and comes back: the sweep goes on, says so once,
    and the server ends up with the tree an undisturbed run writes."""
    import threading
    import time

    from er_ray.orchestration.pipeline import run_pipeline

    cfg = _attacked_sweep(tiny_model_dir, tmp_path, **{"tracking.uri": mlflow_server.uri})
    outage = []

    def take_the_server_away() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not list(tmp_path.glob("tiny/runs/*/search/*/checkpoint_*")):
            time.sleep(0.2)
        mlflow_server.stop()
        outage.append(time.time())
        time.sleep(25)
        mlflow_server.start()
        outage.append(time.time())

    thread = threading.Thread(target=take_the_server_away)
    thread.start()
    run_pipeline(cfg)
    thread.join()
    assert len(outage) == 2, "the search never checkpointed"
    err = capfd.readouterr().err
    assert err.count("is not answering") == 1 and err.count("answers again") == 1, err[-3000:]
    compare(
        tree(mlflow_server.uri, {str(tmp_path): "<out>", str(tiny_model_dir): "<model>"}), "attacked_sweep"
    )


def test_a_driver_killed_during_attacks_resumes_to_the_undisturbed_tree(
    ray_session, tiny_model_dir, tmp_path
):
    """kill -9 while attacks run, then --resume: the attack run left RUNNING is reopened and finished (one row
    per key), a finished attack is not logged again."""
    import subprocess
    import time

    from er_ray.orchestration.pipeline import run_pipeline

    cfg = _attacked_sweep(tiny_model_dir, tmp_path, **{"attack.num_examples": 6})
    driver = start_driver(cfg, tmp_path, ray_session, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("tiny/runs/*/*/seed3/*/attack/summary.json")):
        time.sleep(0.2)
    driver.kill()  # one model attacked, the other's attack under way or queued
    driver.wait()
    attacked = {p: p.stat().st_mtime for p in tmp_path.glob("tiny/runs/*/*/seed3/*/attack/summary.json")}
    assert len(attacked) == 1, "the driver was killed before or after the attacks"

    run_pipeline(cfg, resume=True)
    assert all(p.stat().st_mtime == m for p, m in attacked.items())  # not attacked again
    runs = tree(cfg.tracking.uri, {str(tmp_path): "<out>", str(tiny_model_dir): "<model>"})
    golden = json.loads((GOLDEN_DIR / "attacked_sweep.json").read_text())

    def rows(tree_: list[dict]) -> list[tuple]:
        return [(r["kind"], r["tags"].get(T.TAG_KEY), r["status"], r["parent"]) for r in tree_]

    assert rows(runs) == rows(golden)  # one FINISHED row per key, attack runs under their tickets
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    for run in client.search_runs([client.get_experiment_by_name("tiny").experiment_id]):
        if run.data.tags[T.TAG_KIND] in ("ticket", "attack"):  # every attack metric logged once
            assert len(client.get_metric_history(run.info.run_id, T.aua("textbugger"))) == 1


def test_no_credential_reaches_a_param_an_artifact_or_the_console(
    ray_session, s3, mlflow_server, tiny_model_dir, tmp_path, capfd
):
    """A password in tracking.uri and a secret key in the bucket URI of runtime.output_dir: the key id and the
    user may show, the secrets never do."""
    from mlflow.tracking import MlflowClient

    from er_ray.orchestration.pipeline import run_pipeline

    host = mlflow_server.uri.removeprefix("http://")
    output_dir = s3.format("secret-run").replace("s3://", "s3://KEYID:sEcReT-kEy@")
    cfg = _attacked_sweep(
        tiny_model_dir,
        tmp_path,
        **{"ray.methods": "[finetune]", "tracking.uri": f"http://er-ray:pAsSwOrD@{host}"},
    )
    cfg.runtime.output_dir = output_dir
    run_pipeline(cfg)
    seen = capfd.readouterr().err
    client = MlflowClient(mlflow_server.uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert {r.data.tags["er_ray.kind"] for r in runs} == {"parent", "ticket", "attack"}
    for run in runs:
        seen += json.dumps([run.data.params, run.data.tags])
        for path in _artifact_files(client, run.info.run_id):
            seen += Path(client.download_artifacts(run.info.run_id, path, str(tmp_path / "dl"))).read_text()
    assert "KEYID" in seen and "er-ray" in seen  # the run did name its storage and store
    assert "sEcReT-kEy" not in seen and "pAsSwOrD" not in seen


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out += _artifact_files(client, run_id, f.path)
        elif f.path.endswith((".json", ".jsonl", ".md", ".txt", ".yaml")):
            out.append(f.path)
    return out


def test_resume_finds_runs_written_before_the_root_tag_and_reopens_the_interrupted_one(
    tiny_model_dir, tmp_path
):
    """A store written before `er_ray.root` existed: the ticket run is found by its nesting, its attack run (a
    grandchild) by kind; the attack a dead driver left RUNNING ends KILLED, and is reopened, not duplicated,
    when its unit is redone."""
    from mlflow.tracking import MlflowClient

    from er_ray import events as ev

    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    client, exp = T.open_store(cfg)
    parent = client.create_run(exp, tags={T.TAG_KIND: "parent"}).info.run_id
    ticket_key = ev.ticket_key("earlyrobust", 3, "g0.2-h0.25-f0.3")
    ticket = client.create_run(
        exp, tags={"mlflow.parentRunId": parent, T.TAG_KIND: "ticket", T.TAG_KEY: ticket_key}
    ).info.run_id
    client.set_terminated(ticket, "FINISHED")
    attack_tags = {"mlflow.parentRunId": ticket, T.TAG_KIND: "attack", T.TAG_KEY: ev.attack_key(ticket_key)}
    attack = client.create_run(exp, tags=attack_tags).info.run_id  # left RUNNING by a killed driver
    client.set_terminated(parent, "KILLED")

    recorder = T.Recorder.reopen(cfg, parent)
    assert recorder.runs[ticket_key].run_id == ticket and recorder.runs[ticket_key].status == "FINISHED"
    assert recorder.runs[ev.attack_key(ticket_key)].run_id == attack
    assert MlflowClient(cfg.tracking.uri).get_run(attack).info.status == "KILLED"

    recorder.emit(ev.AttackStarted(ticket_key, cfg, 2))  # the attack is redone
    assert recorder.wait(30)
    assert MlflowClient(cfg.tracking.uri).get_run(attack).info.status == "RUNNING"  # reopened
    recorder.emit(ev.RunEnded("KILLED", wait=30))
    runs = MlflowClient(cfg.tracking.uri).search_runs([exp])
    attacks = [r for r in runs if r.data.tags[T.TAG_KIND] == "attack"]
    assert [r.info.run_id for r in attacks] == [attack] and attacks[0].info.status == "KILLED"  # one row


def test_a_record_that_cannot_be_written_fails_the_run_and_leaves_nothing_running(tiny_model_dir, tmp_path):
    """A write that fails for good (a bug, a rejected value; not a store that does not answer) is raised by
    the next emit, and the run's end is still written: FAILED, with no child left RUNNING."""
    from mlflow.tracking import MlflowClient

    from er_ray import events as ev

    cfg = tiny_experiment(tiny_model_dir, tmp_path, **{"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    recorder = T.Recorder.open(cfg, "parent", {}, {})
    key = ev.ticket_key("finetune", 3, "full")
    recorder.emit(ev.TicketStarted(key, cfg, None, True))
    recorder.emit(ev.TicketFinished(key, cfg, None, True, {"clean_acc": 0.5}))  # no losses: cannot be logged
    with pytest.raises(RuntimeError, match="finetune_losses"):
        recorder.emit(ev.RunEnded("FINISHED", wait=30))
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    status = {r.data.tags[T.TAG_KIND]: r.info.status for r in runs}
    assert status["parent"] == "FAILED" and "RUNNING" not in status.values(), status
