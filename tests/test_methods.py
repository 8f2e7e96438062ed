"""Every method and ablation through the same machinery, on a tiny backbone and real SST-2 rows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_experiment

from er_ray.methods import resolve_method, run_experiment
from er_ray.model import heads_per_layer, neurons_per_layer
from er_ray.ticket import load_ticket, read_ticket_info


def test_methods_imply_their_settings(tiny_model_dir, tmp_path):
    base = tiny_experiment(tiny_model_dir, tmp_path)
    r = lambda m: resolve_method(base.model_copy(update={"method": m}))  # noqa: E731
    assert r("earlybert").search.adversary.kind == "none"
    assert r("earlyrobust").search.adversary.kind == "freelb"
    assert r("earlyrobust-no-l1").search.lambda_head == 0 == r("earlyrobust-no-l1").search.lambda_ffn
    assert r("earlyrobust-random").prune.ticket == "random"
    assert r("earlyrobust-reinit").prune.weights == "reinit"
    assert r("pgd").search.adversary.kind == "pgd"


@pytest.mark.parametrize(
    "method",
    ["earlyrobust", "earlybert", "earlyrobust-no-l1", "earlyrobust-random", "earlyrobust-reinit"],
)
def test_ticket_methods_draw_prune_and_fine_tune(tiny_model_dir, tmp_path, method):
    cfg = tiny_experiment(tiny_model_dir, tmp_path, method=method)
    traj, (result,) = run_experiment(cfg)
    assert result.method == method and result.gamma == 0.2
    # 2 layers x 4 heads, 1/4 pruned globally; 30% of 2 x 40 neurons
    assert sum(len(h) for h in result.kept_heads) == 6 and sum(len(n) for n in result.kept_neurons) == 56
    assert 0.0 <= result.clean_acc <= 1.0
    assert result.search_seconds > 0 and result.finetune_seconds > 0
    assert result.train_seconds == pytest.approx(result.search_seconds + result.finetune_seconds)
    assert result.search_seconds == traj.mini_epochs[result.stop_mini_epoch].seconds
    model, _ = load_ticket(result.ticket_dir)
    assert heads_per_layer(model) == [len(h) for h in result.kept_heads]
    assert neurons_per_layer(model) == [len(n) for n in result.kept_neurons]
    saved = json.loads((tmp_path / "tiny" / method / "g0.2-h0.25-f0.3" / "result.json").read_text())
    assert saved["clean_acc"] == result.clean_acc
    assert read_ticket_info(result.ticket_dir)["meta"]["params"] == result.params


def test_rewind_keeps_pretrained_weights_and_reinit_does_not(tiny_model_dir, tmp_path):
    from er_ray.model import load_backbone
    from er_ray.ticket import Masks, build_ticket

    masks = Masks.full(2, 4, 40)
    masks.ffn[:, :10] = False
    pre = load_backbone(str(tiny_model_dir), 2, seed=3)
    rewound = build_ticket(str(tiny_model_dir), 2, masks, seed=3, weights="rewind")
    reinit = build_ticket(str(tiny_model_dir), 2, masks, seed=3, weights="reinit")
    w_pre = pre.bert.encoder.layer[0].intermediate.dense.weight[10:]
    assert torch.equal(rewound.bert.encoder.layer[0].intermediate.dense.weight, w_pre)
    assert torch.equal(rewound.classifier.weight, pre.classifier.weight)  # same seeded head for every method
    assert not torch.equal(reinit.bert.encoder.layer[0].intermediate.dense.weight, w_pre)


@pytest.mark.parametrize("method", ["finetune", "freelb", "pgd"])
def test_full_model_baselines(tiny_model_dir, tmp_path, method):
    cfg = tiny_experiment(tiny_model_dir, tmp_path, method=method)
    traj, (result,) = run_experiment(cfg)
    assert traj is None and result.search_seconds == 0 and result.gamma is None
    assert sum(len(h) for h in result.kept_heads) == 8  # nothing pruned
    assert result.finetune_seconds > 0 and 0 <= result.clean_acc <= 1
