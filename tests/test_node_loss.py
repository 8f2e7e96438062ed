"""A node lost mid-sweep: on a `ray.cluster_utils.Cluster` (a head that runs no work, a node for the search
trial, a node for ticket tasks and the attack actor; placed by test-only custom node resources), with the run
folder in moto's S3, a worker node is removed without warning and a replacement joins, as a cluster's
autoscaler replaces a preempted node. The sweep finishes with the results of an undisturbed run, no MLflow run
twice or left RUNNING, and the console names what was lost and what was retried."""

from __future__ import annotations

import time

import mlflow
import pytest
from conftest import own_processes, start_driver, tiny_experiment

from er_ray import tracking as T
from er_ray.layout import SEARCH_STATE_FILE, SUMMARY_FILE, TICKET_FILE
from er_ray.storage import Store

SEARCH_NODE = {"num_cpus": 1, "resources": {"er_ray_test_search": 1}}
# a ticket task takes two of the work node's three units and the actor one: the ticket waits for the baseline
# and starts with the baseline's attack actor, so it still trains for seconds after the actor's start-up (10-20 s)
WORK_NODE = {"num_cpus": 3, "resources": {"er_ray_test_work": 3}}


@pytest.fixture(scope="module")
def cluster(s3):
    """Head (no CPUs: the driver, its queue), a search node and a work node; fast node-death detection."""
    import ray
    from ray.cluster_utils import Cluster

    from er_ray.attacks.evaluate import default_resources

    default_resources(with_mlm=False)  # the attack actors' one-time builds, before the clock matters
    if ray.is_initialized():
        ray.shutdown()
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    c.nodes = {"search": c.add_node(**SEARCH_NODE), "work": c.add_node(**WORK_NODE)}
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _config(model_dir, tmp_path, s3, name):
    cfg = tiny_experiment(
        model_dir,
        tmp_path / name,
        **{
            "ray.methods": "[earlyrobust, finetune]",
            "ray.search_cpus": 1,
            "ray.ticket_cpus": 1,
            "ray.search_node_resources": "{er_ray_test_search: 1}",
            "ray.ticket_node_resources": "{er_ray_test_work: 2}",
            "search.max_epochs": 3,
            "search.patience": 3,
            "finetune.epochs": 300,  # tickets train for tens of seconds (see WORK_NODE)
            "attack.recipes": "[textbugger]",
            "attack.num_examples": 24,  # the actor attacks for seconds, not a moment the test could miss
            "attack.actors": 1,
            "attack.cpus_per_actor": 1,
            "attack.node_resources_per_actor": "{er_ray_test_work: 1}",
            "tracking.uri": f"sqlite:///{tmp_path}/{name}.db",
        },
    )
    cfg.runtime.output_dir = s3.format(name)
    return cfg


def _outcome(cfg, rows) -> dict:
    """What must not depend on a lost node: per ticket its stop point, clean accuracy, kept units and Aua."""
    import json

    (stamp,) = (Store.at(cfg.runtime.output_dir) / "tiny" / "runs").children()
    root = Store.at(cfg.runtime.output_dir) / "tiny" / "runs" / stamp
    out = {}
    for row in rows:
        ticket = "full" if row["method"] == "finetune" else None
        folder = root / row["method"] / f"seed{row['seed']}"
        if ticket is None:
            (ticket,) = [c for c in folder.children() if c.startswith("g")]
        summary = json.loads((folder / ticket / "attack" / SUMMARY_FILE).read_text())
        file = folder / ticket / TICKET_FILE
        info = json.loads(file.read_text()) if file.exists() else {}  # a full-model baseline has none
        kept = (info.get("kept_heads"), info.get("kept_neurons"))
        out[(row["method"], ticket)] = (row["stop_epoch"], row["clean_acc"], kept, summary["aua"])
    return out


def _mlflow_runs(uri: str) -> list:
    client = mlflow.tracking.MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture(scope="module")
def undisturbed(cluster, s3, tiny_model_dir, tmp_path_factory):
    from er_ray.orchestration.pipeline import run_pipeline

    cfg = _config(tiny_model_dir, tmp_path_factory.mktemp("calm"), s3, "calm")
    return _outcome(cfg, run_pipeline(cfg))


def _titled(title: str) -> bool:
    return bool(own_processes(title))


def _run_losing(cluster, cfg, tmp_path, role: str, when, timeout: float = 240.0) -> tuple[list[dict], str]:
    """`er-ray run` of `cfg` in a process of its own; once `when()` holds, the `role` node is removed without
    warning and, once Ray has declared it dead, a replacement joins (as an autoscaler replaces a preempted
    node). Returns the run's summary rows and what the driver said."""
    import json

    import ray

    log = tmp_path / "driver.log"
    with open(log, "w") as err:
        driver = start_driver(cfg, tmp_path, ray, stderr=err)
    deadline = time.time() + timeout
    while not when():
        assert driver.poll() is None and time.time() < deadline, "the moment to lose the node never came"
        time.sleep(0.1)
    node = cluster.nodes[role]
    cluster.remove_node(node, allow_graceful=False)
    while any(n["Alive"] and n["NodeID"] == node.node_id for n in ray.nodes()):
        assert time.time() < deadline, "Ray never declared the removed node dead"
        time.sleep(0.2)
    cluster.nodes[role] = cluster.add_node(**(SEARCH_NODE if role == "search" else WORK_NODE))
    assert driver.wait(timeout) == 0, log.read_text()[-3000:]
    (stamp,) = (Store.at(cfg.runtime.output_dir) / "tiny" / "runs").children()
    summary = Store.at(cfg.runtime.output_dir) / "tiny" / "runs" / stamp / "summary.json"
    return json.loads(summary.read_text()), log.read_text()


def _check(cfg, rows, undisturbed) -> None:
    assert _outcome(cfg, rows) == undisturbed
    runs = _mlflow_runs(cfg.tracking.uri)
    keys = [r.data.tags.get(T.TAG_KEY) for r in runs if r.data.tags.get(T.TAG_KIND) != "parent"]
    assert len(keys) == len(set(keys)) == 5  # a search, two tickets, two attacks: once each
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_node_lost_with_a_ticket_task_and_an_attack_actor_changes_no_result(
    cluster, s3, tiny_model_dir, tmp_path, undisturbed
):
    cfg = _config(tiny_model_dir, tmp_path, s3, "ticket-lost")

    def both() -> bool:  # running there, and their starts already reached the driver (a busy machine lags)
        if not (_titled("ray::ticket_task") and _titled("ray::AttackActor.work")):
            return False
        running = [r for r in _mlflow_runs(cfg.tracking.uri) if r.info.status == "RUNNING"]
        keys = [r.data.tags.get(T.TAG_KEY) or "" for r in running]
        ticket = any(k.startswith("ticket/earlyrobust") and not k.endswith("attack") for k in keys)
        return ticket and any(k.endswith("/attack") for k in keys)

    rows, err = _run_losing(cluster, cfg, tmp_path, "work", both)
    _check(cfg, rows, undisturbed)
    lost_line = next(line for line in err.splitlines() if "left the cluster" in line)
    assert "ticket/earlyrobust/seed3/g" in lost_line and "/attack" in lost_line, lost_line
    retried = [line for line in err.splitlines() if "started again" in line]
    assert any(line.split(" ")[2].startswith("ticket/earlyrobust") for line in retried), retried
    assert any("/attack:" in line and "on a fresh actor" in line for line in retried), retried
    tags = {
        r.data.tags.get(T.TAG_KEY): r.data.tags.get(T.TAG_ATTEMPTS) for r in _mlflow_runs(cfg.tracking.uri)
    }
    assert any(
        k.startswith("ticket/earlyrobust") and not k.endswith("attack") and v == "2" for k, v in tags.items()
    )


def test_a_node_lost_with_the_search_trial_changes_no_result(
    cluster, s3, tiny_model_dir, tmp_path, undisturbed
):
    cfg = _config(tiny_model_dir, tmp_path, s3, "search-lost")

    def reported() -> bool:  # the trial has saved a restart state and reported a mini-epoch to Tune
        import pyarrow.fs as pafs

        root = Store.at(cfg.runtime.output_dir)
        infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
        paths = [i.path for i in infos]
        return any(p.endswith(SEARCH_STATE_FILE) for p in paths) and any("/checkpoint_" in p for p in paths)

    rows, err = _run_losing(cluster, cfg, tmp_path, "search", reported)
    _check(cfg, rows, undisturbed)
    assert "holding search/earlyrobust/seed3" in err
    assert "search/earlyrobust/seed3: started again" in err and "from its last restart state" in err
    search = next(r for r in _mlflow_runs(cfg.tracking.uri) if r.data.tags.get(T.TAG_KIND) == "search")
    assert search.data.tags.get(T.TAG_ATTEMPTS) == "2"
