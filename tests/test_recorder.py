"""What a sweep records in MLflow: the whole tree against a golden file recorded before the recorder rework."""

from __future__ import annotations

import pytest
from conftest import tiny_experiment
from mlflow_tree import compare, tree


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
