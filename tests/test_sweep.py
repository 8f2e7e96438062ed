"""The sweep engine on a local multi-node Ray cluster: seeds x gammas x ratios as one event loop whose stages
overlap (tickets while the search goes on, attacks while tickets fine-tune), MLflow runs timed by the work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
from conftest import tiny_experiment

from er_ray import tracking as T

SEEDS, GAMMAS, FFN_RATIOS = (1, 2), (0.9, 0.8, 0.01), (0.2, 0.3)


@pytest.fixture(scope="module")
def cluster():
    """Three nodes with 2 logical CPUs each (oversubscribing this machine's cores: overlap is what's shown)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        c.add_node(num_cpus=2)
    ray.init(address=c.address, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def warm() -> int:  # workers that have imported torch and er_ray: a task starts when scheduled
        import er_ray.orchestration.pipeline  # noqa: F401

        return os.getpid()

    ray.get([warm.remote() for _ in range(6)])
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def sweep(cluster, tiny_model_dir, tmp_path_factory):
    from er_ray.attacks.evaluate import default_resources
    from er_ray.orchestration.pipeline import run_pipeline

    # 6 CPUs: 2 searches + 2 attack actors (started at once: they fit) + 2 tickets at a time, so tickets
    # start while the searches go on and later tickets fine-tune while earlier ones are attacked
    default_resources(with_mlm=False)  # counter-fitted vectors built once into the cache, not by every actor
    out = tmp_path_factory.mktemp("sweep")
    cfg = tiny_experiment(
        tiny_model_dir,
        out,
        **{
            "sweep.seeds": json.dumps(SEEDS),
            "sweep.gammas": json.dumps(GAMMAS),
            "sweep.ffn_ratios": json.dumps(FFN_RATIOS),
            "search.gamma": 0.9,
            "search.patience": 2,
            "search.max_epochs": 24,
            "finetune.epochs": 30,
            "ray.search_cpus": 1,
            "ray.ticket_cpus": 1,
            "attack.recipes": "[textbugger]",
            "attack.num_examples": 6,
            "attack.actors": 2,
            "attack.cpus_per_actor": 1,
            "tracking.uri": f"sqlite:///{out}/mlflow.db",
        },
    )
    rows = run_pipeline(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], max_results=1000)
    ]
    return cfg, rows, client, {k: [r for r in runs if r.data.tags.get(T.TAG_KIND) == k] for k in T.KINDS}


def _span(run) -> tuple[float, float]:
    return run.info.start_time / 1000, run.info.end_time / 1000


def _timeline(runs: dict) -> str:
    """The runs' spans relative to the first start (a failure message that shows what happened)."""
    every = [r for k in ("search", "ticket", "attack") for r in runs[k]]
    t0 = min(_span(r)[0] for r in every)
    return "\n".join(
        f"{r.info.run_name}: {_span(r)[0] - t0:.1f}-{_span(r)[1] - t0:.1f}"
        for r in sorted(every, key=lambda r: r.info.start_time)
    )


def _overlap(a, b) -> bool:
    (s1, e1), (s2, e2) = _span(a), _span(b)
    return s1 < e2 and s2 < e1


def test_every_seed_gamma_and_ratio_gets_one_finished_ticket_run(sweep):
    cfg, rows, client, runs = sweep
    combos = {(s, g, f) for s in SEEDS for g in GAMMAS for f in FFN_RATIOS}
    assert {(r["seed"], r["gamma"], r["ffn_ratio"]) for r in rows} == combos
    tickets = runs["ticket"]
    assert len(tickets) == len(combos) and all(r.info.status == "FINISHED" for r in tickets)
    assert {
        (
            int(r.data.params[T.PARAM_SEED]),
            float(r.data.params[T.PARAM_GAMMA]),
            float(r.data.params[T.PARAM_FFN_RATIO]),
        )
        for r in tickets
    } == combos
    assert all(r.info.status == "FINISHED" for r in runs["search"] + runs["attack"] + runs["parent"])
    assert sorted(int(r.data.params[T.PARAM_SEED]) for r in runs["search"]) == list(
        SEEDS
    )  # one Tuner, 2 trials


def test_identical_masks_share_one_trained_ticket_and_attack(sweep):
    cfg, rows, client, runs = sweep
    # gamma 0.8 and 0.9 exceed every possible mask distance here: same stop point, same masks
    shared = [r for r in runs["ticket"] if T.TAG_SHARED in r.data.tags]
    owners = {r.info.run_id: r for r in runs["ticket"] if T.TAG_SHARED not in r.data.tags}
    assert len(shared) >= len(SEEDS) * len(FFN_RATIOS)
    for r in shared:
        owner = owners[r.data.tags[T.TAG_SHARED]]
        assert owner.data.params[T.PARAM_SEED] == r.data.params[T.PARAM_SEED]
        for m in (T.CLEAN_ACC, T.FINETUNE_SECONDS, T.aua("textbugger")):
            assert r.data.metrics[m] == owner.data.metrics[m]
    assert len(runs["attack"]) == len(owners)  # one attack per trained ticket
    trained = list(Path(cfg.runtime.output_dir).glob("tiny/runs/*/earlyrobust/seed*/*/result.json"))
    assert len(trained) == len(owners)


def test_stages_overlap_in_mlflow_run_times(sweep):
    cfg, rows, client, runs = sweep
    tickets = [r for r in runs["ticket"] if T.TAG_SHARED not in r.data.tags]
    timeline = _timeline(runs)
    assert any(_overlap(a, b) for i, a in enumerate(tickets) for b in tickets[i + 1 :]), timeline
    assert any(_overlap(a, t) for a in runs["attack"] for t in tickets), timeline
    searching_until = max(_span(r)[1] for r in runs["search"])
    assert any(_span(t)[0] < searching_until for t in tickets), timeline  # tickets start while searches run


def test_search_runs_log_one_history_point_per_mini_epoch(sweep):
    cfg, rows, client, runs = sweep
    from er_ray.layout import TRAJECTORY_FILE
    from er_ray.search import Trajectory

    for run in runs["search"]:
        seed = run.data.params[T.PARAM_SEED]
        (traj_file,) = Path(cfg.runtime.output_dir).glob(
            f"tiny/runs/*/earlyrobust/seed{seed}/{TRAJECTORY_FILE}"
        )
        steps = [m.step for m in client.get_metric_history(run.info.run_id, T.SEARCH_SECONDS)]
        assert sorted(steps) == list(range(len(Trajectory.load(traj_file).mini_epochs)))


def test_seeds_train_differently_on_the_same_rows(sweep):
    cfg, rows, client, runs = sweep
    by_seed = {
        s: sorted((r["gamma"], r["ffn_ratio"], r["clean_acc"]) for r in rows if r["seed"] == s) for s in SEEDS
    }
    summaries = {}
    for path in Path(cfg.runtime.output_dir).glob("tiny/runs/*/earlyrobust/seed*/*/attack/summary.json"):
        summaries.setdefault(path.parts[-4], []).append(json.loads(path.read_text())["indices"])
    # the attacked sample is the config's, whatever the training seed
    assert len({json.dumps(i) for v in summaries.values() for i in v}) == 1
    losses = {}
    for path in Path(cfg.runtime.output_dir).glob("tiny/runs/*/earlyrobust/seed*/*/result.json"):
        r = json.loads(path.read_text())
        losses.setdefault(r["seed"], r["finetune_losses"])
    assert losses[1] != losses[2] and by_seed[1] and by_seed[2]
