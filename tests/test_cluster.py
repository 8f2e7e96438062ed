"""cluster.yaml against Ray's own cluster-launcher schema, and the tune example config in docs/cluster.md."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_the_schema_check_is_real(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu"]["max_worker"] = 4  # a typo: node types allow no unknown keys
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_gpu_workers_get_a_cuda_torch_before_the_project(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    (gpu,) = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # work goes to the GPU workers
    assert re.match(r"^(g|p)\d", gpu["node_config"]["InstanceType"])
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cluster["max_workers"]
    cmds = cluster["setup_commands"]
    torch_at = next(
        i for i, c in enumerate(cmds) if re.search(r"pip install .*torch==\S+ --index-url \S+/whl/cu\d+", c)
    )
    project_at = next(i for i, c in enumerate(cmds) if "pip install" in c and "-e ~/er-ray" in c)
    assert torch_at < project_at  # else pip resolves `torch>=2.1` itself (a CPU wheel on some platforms)
    assert cluster["file_mounts"]["~/er-ray"] == "."
    assert any("torch.cuda.is_available()" in c for c in cluster["worker_setup_commands"])
    assert any("mlflow server" in c for c in cluster["head_start_ray_commands"])


def test_the_head_serves_the_dashboard_and_mlflow_on_loopback_only(cluster):
    cmds = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in cmds and re.search(r"mlflow server --host 127\.0\.0\.1 ", cmds)
    assert "0.0.0.0" not in yaml.safe_dump(cluster)


def test_the_tune_example_in_the_docs_is_a_valid_config():
    from er_ray.config import config_from_dict
    from er_ray.orchestration.study import objective_terms, search_space

    text = (ROOT / "docs" / "cluster.md").read_text()
    block = re.search(r"<!-- tune-quickstart -->\s*```yaml\n(.*?)```", text, re.S)
    assert block, "docs/cluster.md lost its tune-quickstart example"
    cfg = config_from_dict(yaml.safe_load(block.group(1)))
    assert objective_terms(cfg.tune.objective) and search_space(cfg)
