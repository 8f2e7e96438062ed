"""Files that travel (trajectories, search states) are safetensors + JSON: exact round trips, and a crafted
pickle is refused with one line before any of it runs."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
import torch

from er_ray.cli import main
from er_ray.config import UserError
from er_ray.layout import SEARCH_STATE_FILE, TRAJECTORY_FILE
from er_ray.search import Trajectory, load_search_state
from er_ray.tensorfile import load_tree, save_tree


class Payload:
    """Unpickling this creates `marker`: what a crafted trajectory could do instead."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_nested_state_round_trips_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    base = torch.arange(6.0)
    tree = {
        "opt": opt.state_dict(),  # int keys, tuple betas, None flags, 0-dim step tensors
        "rng": torch.get_rng_state(),  # uint8
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "views": [base[:3], base[3:]],  # one storage: stored as two tensors
        "empty": torch.zeros(0),
        "scalars": [1, 2.5, float("nan"), True, None, "text"],
        "$odd": {"$tensor": "not a marker"},
    }
    save_tree(tree, tmp_path / "state.safetensors", "test")
    assert_same(load_tree(tmp_path / "state.safetensors", "test"), tree)


def test_another_kind_or_a_missing_file_is_refused(tmp_path):
    save_tree({"a": 1}, tmp_path / "x.safetensors", "trajectory")
    with pytest.raises(UserError, match="not an er-ray search state"):
        load_tree(tmp_path / "x.safetensors", "search state")
    with pytest.raises(UserError, match="no trajectory file"):
        Trajectory.load(tmp_path / "missing")


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_pickle_trajectory_is_refused_before_it_runs(tmp_path, capsys, writer):
    marker = tmp_path / "pwned"
    file = tmp_path / "trajectory.pt"
    if writer == "torch.save":
        torch.save({"mini_epochs": Payload(marker)}, file)
    else:
        file.write_bytes(pickle.dumps(Payload(marker)))
    assert main(["bench", "--trajectory", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused" in err and "\n" not in err, err
    assert not marker.exists()
    # the search state and the report's loader take the same path
    (tmp_path / SEARCH_STATE_FILE).write_bytes(file.read_bytes())
    with pytest.raises(UserError, match="refused"):
        load_search_state(SimpleNamespace(load_state_dict=pytest.fail), tmp_path)  # type: ignore[arg-type]
    (tmp_path / TRAJECTORY_FILE).write_bytes(file.read_bytes())
    with pytest.raises(UserError, match="refused"):
        Trajectory.load(tmp_path / TRAJECTORY_FILE)
    assert not marker.exists()
    # the payload is real: an unrestricted unpickler would have run it
    if writer == "pickle":
        pickle.loads(file.read_bytes())
    else:
        torch.load(file, weights_only=False)
    assert marker.exists()
