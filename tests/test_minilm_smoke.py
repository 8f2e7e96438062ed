"""End to end on the real all-MiniLM-L6-v2 and a few dozen real SST-2 rows (the offline default)."""

from __future__ import annotations

import pytest
import torch

from er_ray.config import config_from_dict
from er_ray.methods import prepare, run_experiment
from er_ray.model import count_parameters, heads_per_layer, load_backbone, neurons_per_layer
from er_ray.ticket import load_ticket
from er_ray.train import accuracy


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a real model uses both cores
    yield
    torch.set_num_threads(before)


def test_earlyrobust_on_minilm_end_to_end(tmp_path, two_threads):
    cfg = config_from_dict(
        {
            "name": "smoke",
            "seed": 1,
            "data": {"name": "sst2", "max_train_examples": 48, "max_eval_examples": 32, "max_length": 32},
            "model": {"name_or_path": "minilm"},
            "search": {
                "batch_size": 16,
                "max_epochs": 1,
                "mini_epoch_steps": 1,
                "patience": 1,
                "gamma": 0.5,
                "adversary": {"kind": "freelb", "steps": 2},
            },
            "finetune": {"epochs": 1, "batch_size": 16},
            "runtime": {"output_dir": str(tmp_path)},
        }
    )
    traj, (result,) = run_experiment(cfg)
    (stop,) = traj.stops.values()
    assert stop.mini_epoch == len(traj.mini_epochs) - 1 and traj.mini_epochs[0].head.shape == (6, 12)
    assert result.search_seconds == traj.mini_epochs[stop.mini_epoch].seconds > 0
    # 1/6 of 72 heads and 30% of 6 x 1536 neurons, removed physically
    assert sum(map(len, result.kept_heads)) == 60 and sum(map(len, result.kept_neurons)) == 6451
    full = load_backbone("minilm", 2, 1)
    assert result.param_count < count_parameters(full) - 1_000_000
    model, tok = load_ticket(result.ticket_dir)
    assert heads_per_layer(model) == [len(h) for h in result.kept_heads]
    assert neurons_per_layer(model) == [len(n) for n in result.kept_neurons]
    batch = tok(
        ["a gripping, beautifully acted film", "dull and lifeless"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = model(**batch).logits.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    prep = prepare(cfg)  # the saved ticket scores what the run reported on the evaluation split
    eval_batches = prep.batches(cfg.finetune.eval_batch_size, train=False)
    assert result.clean_acc == accuracy(model, eval_batches, prep.eval.labels, prep.device)
    assert result.size_mb > 10
