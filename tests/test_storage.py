"""Storage URIs: a run whose output_dir is an S3 bucket (moto's S3 server, started here) on a two-node Ray
cluster writes every file through pyarrow, resumes from the bucket, and needs no shared local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import BUCKET, tiny_experiment

from er_ray import layout
from er_ray.config import UserError
from er_ray.storage import Store, is_uri, redact


def _objects(store: Store) -> dict[str, float]:
    """Relative key -> modification time of every object under `store`."""
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(store.path, recursive=True, allow_not_found=True))
    return {i.path[len(store.path) + 1 :]: i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File}


def test_a_uri_is_told_from_a_path_and_keeps_its_options_when_joined(s3):
    assert is_uri("s3://b/x") and is_uri("gs://b") and not is_uri("outputs") and not is_uri("/tmp/x")
    assert not is_uri("file:///tmp/x") and not is_uri(Path("C:/x"))
    root = Store.at(s3.format("join"))
    child = root / "a" / "b.json"
    assert child.path == f"{BUCKET}/join/a/b.json" and child.name == "b.json"
    assert child.uri.startswith(f"s3://{BUCKET}/join/a/b.json?scheme=http&endpoint_override=")
    assert Store.at(child.uri).path == child.path  # a worker re-opens the joined URI as the same object
    assert redact("s3://b/x?scheme=http&secret_key=abc") == "s3://b/x?scheme=http"
    assert redact("postgresql://me:pw@db/optuna") == "postgresql://me:***@db/optuna"
    with pytest.raises(UserError, match="cannot open storage"):
        Store.at("nosuchfs://b/x")


def test_an_upload_puts_its_completion_file_last_and_a_fetch_gets_the_folder_back(s3, tmp_path, monkeypatch):
    src = tmp_path / "ticket"
    (src / "sub").mkdir(parents=True)
    for name in ("result.json", "model.safetensors", "sub/a.txt"):
        (src / name).write_text(name)
    order: list[str] = []
    put = Store.put
    monkeypatch.setattr(Store, "put", lambda self, file: (order.append(self.name), put(self, file))[1])
    dest = Store.at(s3.format("upload")) / "ticket"
    dest.upload(src, last="result.json")
    assert order[-1] == "result.json" and sorted(order) == ["a.txt", "model.safetensors", "result.json"]
    got = dest.fetch(tmp_path / "cache")
    assert (got / "sub" / "a.txt").read_text() == "sub/a.txt" and dest.fetch(tmp_path / "cache") == got
    assert (dest / "result.json").read_text() == "result.json" and (dest / "result.json").exists()
    assert Store.at(s3.format("upload")).children() == ["ticket"]
    local = Store.at(tmp_path / "here")
    (local / "x" / "f.txt").write_text("hi")  # local writes: tmp + rename, parents made
    assert local.children() == ["x"] and local.fetch() == tmp_path / "here"
    assert not list((tmp_path / "here" / "x").glob("*.tmp"))


def test_a_node_pulls_the_attack_builds_another_node_pushed_and_never_a_partial_one(s3, tmp_path):
    from er_ray.attacks.builds import Build, pull_builds, push_builds

    def entry(root: str, name: str) -> Build:
        return Build("vectors", tmp_path / root / "vectors" / name, "meta.json", 1)

    done, partial = entry("a", "done"), entry("a", "partial")
    for b in (done, partial):
        b.folder.mkdir(parents=True)
        (b.folder / "vectors.npy").write_bytes(b"123")
    (done.folder / "meta.json").write_text("{}")  # only this one finished building
    shared = Store.at(s3.format("cache"))
    push_builds(shared, [done, partial])
    assert (shared / "vectors" / "done" / "meta.json").exists() and not (
        shared / "vectors" / "partial"
    ).exists()
    other, other_partial = entry("b", "done"), entry("b", "partial")
    pull_builds(shared, [other, other_partial])
    assert (other.folder / "vectors.npy").read_bytes() == b"123" and not other_partial.folder.exists()


def test_with_a_uri_output_dir_mlflow_and_optuna_must_be_named(s3, tmp_path, tiny_model_dir, capsys):
    from er_ray.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"name: uri\nruntime: {{output_dir: '{s3.format('checks')}'}}\n"
        f"model: {{name_or_path: {tiny_model_dir}}}\n"
    )
    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert main(["check", str(cfg)]) == 2
        assert "MLflow needs a tracking server or a local path" in capsys.readouterr().err
        db = f"sqlite:///{tmp_path}/mlflow.db"
        assert main(["check", str(cfg), "--set", f"tracking.uri={db}"]) == 0
        tune = [
            "--set",
            f"tracking.uri={db}",
            "--set",
            "tune.space={search.gamma: {kind: uniform, low: 0.1, high: 0.2}}",
        ]
        assert main(["check", str(cfg), *tune]) == 2
        assert "the Optuna study needs a database" in capsys.readouterr().err
        assert main(["run", str(cfg), "--no-ray", "--set", f"tracking.uri={db}"]) == 2
        assert "writes a local folder" in capsys.readouterr().err
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture(scope="module")
def cluster(s3):
    """Two nodes, started after the credentials are in the environment."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2)
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_a_run_on_a_bucket_writes_everything_there_and_resumes_from_it(s3, cluster, tiny_model_dir, tmp_path):
    import mlflow

    from er_ray import tracking as T
    from er_ray.attacks.evaluate import default_resources
    from er_ray.orchestration.pipeline import run_pipeline

    default_resources(with_mlm=False)
    uri = s3.format("runs")
    cfg = tiny_experiment(
        tiny_model_dir,
        tmp_path,
        **{
            "ray.methods": "[earlyrobust, finetune]",
            "ray.search_cpus": 1,
            "ray.ticket_cpus": 1,
            "attack.recipes": "[textbugger]",
            "attack.num_examples": 4,
            "attack.actors": 1,
            "attack.cpus_per_actor": 1,
            "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
            # memory reservations on every kind of work (fractional GPUs rely on them): accepted by Ray, and held
            "ray.search_memory_gb": 0.25,
            "ray.ticket_memory_gb": 0.25,
            "attack.memory_gb_per_actor": 0.25,
        },
    )
    cfg.runtime.output_dir = uri
    rows = run_pipeline(cfg)

    root = Store.at(uri) / "tiny" / "runs"
    (stamp,) = root.children()
    objects = _objects(root / stamp)
    for key in (
        "earlyrobust/seed3/trajectory.safetensors",
        "finetune/seed3/full/result.json",
        "finetune/seed3/full/model.safetensors",
        "finetune/seed3/full/attack/summary.json",
        "summary.json",
        "timing.json",
        layout.PARENT_ID_FILE,
    ):
        assert key in objects, sorted(objects)
    assert any(k.startswith("search/") and "experiment_state" in k for k in objects)  # Tune's own state
    tickets = [k for k in objects if k.startswith("earlyrobust/seed3/g") and k.endswith("/result.json")]
    assert len(tickets) == 1 and tickets[0].replace("result.json", "attack/summary.json") in objects
    assert not any(p.name == "runs" for p in tmp_path.rglob("runs"))  # nothing of the run on local disk
    built = _objects(Store.at(uri) / "cache")  # the attacks' one-time builds, for the next node
    assert any(k.startswith("vectors/") and k.endswith("/meta.json") for k in built), sorted(built)
    stored = json.loads((root / stamp / "finetune/seed3/full/result.json").read_text())
    assert stored["ticket_dir"].startswith(f"s3://{BUCKET}/runs/tiny/runs/{stamp}/finetune/seed3/full")
    assert {r["clean_acc"] for r in rows if r["method"] == "finetune"} == {stored["clean_acc"]}

    again = run_pipeline(cfg, resume=True)  # the driver reads back what the workers wrote
    assert _objects(root / stamp) | {"timing.json": 0, "summary.json": 0} == objects | {
        "timing.json": 0,
        "summary.json": 0,
    }  # nothing retrained or re-attacked
    key = lambda r: (r["method"], r["gamma"])  # noqa: E731
    assert sorted(again, key=key) == sorted(rows, key=key)
    assert len(json.loads((root / stamp / "timing.json").read_text())) == 2
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sum(r.data.tags.get(T.TAG_KIND) == "ticket" for r in runs) == 2  # no duplicates on resume
