"""Coefficients, masks, drawing, physical pruning and the ticket's save/load round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

from er_ray.model import Coefficients, attach_scales, heads_per_layer, neurons_per_layer
from er_ray.ticket import (
    Masks,
    build_ticket,
    draw_masks,
    load_ticket,
    prune_model,
    random_masks,
    random_masks_like,
    reinitialize,
    save_ticket,
)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_coefficients_at_one_change_nothing(any_tiny_model):
    batch = tiny_batch()
    before = logits(any_tiny_model, batch)
    coefs = Coefficients.for_model(any_tiny_model)
    handle = coefs.attach(any_tiny_model)
    assert torch.equal(logits(any_tiny_model, batch), before)
    handle.remove()
    # and the hooks really act: halving one head changes the output
    with torch.no_grad():
        coefs.head[1, 2] = 0.5
    handle = coefs.attach(any_tiny_model)
    assert not torch.allclose(logits(any_tiny_model, batch), before)
    handle.remove()


def test_zeroed_coefficient_equals_removed_head_and_neuron(any_tiny_model):
    batch = tiny_batch(1)
    masks = Masks.full(3, 4, 37)
    masks.head[0, 1] = masks.head[2, 0] = masks.head[2, 3] = False
    masks.ffn[1, [0, 5, 36]] = False
    masks.ffn[2, 10] = False
    handle = attach_scales(any_tiny_model, *masks.as_float())
    masked = logits(any_tiny_model, batch)
    handle.remove()
    pruned = prune_model(any_tiny_model, masks)
    assert heads_per_layer(pruned) == [3, 4, 2]
    assert neurons_per_layer(pruned) == [37, 34, 36]
    torch.testing.assert_close(logits(pruned, batch), masked, rtol=1e-5, atol=1e-6)


def test_global_draw_keeps_exact_counts_and_one_head_per_layer():
    head = torch.tensor([[0.01, 0.02, 0.03, 0.04], [0.9, 0.8, 0.7, 0.6], [0.05, 0.06, 0.5, 0.4]])
    ffn = torch.arange(3 * 37, dtype=torch.float).view(3, 37)
    masks = draw_masks(head, ffn, head_ratio=0.5, ffn_ratio=0.3)
    assert int((~masks.head).sum()) == 6 and int((~masks.ffn).sum()) == round(0.3 * 111)
    # layer 0 holds the 4 smallest, but one head must survive: its largest
    assert masks.head[0].tolist() == [False, False, False, True]
    assert masks.head.sum(dim=1).min() >= 1
    # global ranking: the smallest neurons are all in layer 0
    assert int(masks.ffn[0].sum()) == 37 - 33 and bool(masks.ffn[1:].all())


def test_draw_uses_magnitude_and_breaks_ties_by_index():
    head = torch.tensor([[-0.9, 0.1, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    ffn = torch.ones(2, 10)
    masks = draw_masks(head, ffn, head_ratio=0.375, ffn_ratio=0.2)
    assert masks.head[0].tolist() == [False, False, True, True]  # |-0.9| < 1: magnitude, not sign
    assert masks.head[1].tolist() == [False, True, True, True]  # tie: lowest index goes first
    assert masks.ffn[0, :2].tolist() == [False, False] and bool(masks.ffn[1].all())


def test_layerwise_draw_prunes_every_layer_equally():
    gen = torch.Generator().manual_seed(0)
    masks = draw_masks(
        torch.rand(3, 12, generator=gen), torch.rand(3, 50, generator=gen), 0.25, 0.2, "layerwise"
    )
    assert masks.head.sum(dim=1).tolist() == [9, 9, 9]
    assert masks.ffn.sum(dim=1).tolist() == [40, 40, 40]


def test_random_ticket_keeps_the_configured_global_counts():
    """The authors' random ticket: random global coefficients through the same drawing."""
    masks = random_masks(6, 12, 200, 1 / 6, 0.3, seed=7)
    assert int((~masks.head).sum()) == 12 and int((~masks.ffn).sum()) == round(0.3 * 1200)
    assert masks.head.sum(dim=1).min() >= 1
    assert len(set(masks.ffn.sum(dim=1).tolist())) > 1  # global, not the same count in every layer
    assert torch.equal(random_masks(6, 12, 200, 1 / 6, 0.3, seed=7).ffn, masks.ffn)
    assert not torch.equal(random_masks(6, 12, 200, 1 / 6, 0.3, seed=8).ffn, masks.ffn)


def test_random_layerwise_ticket_has_the_same_sizes_but_other_units():
    gen = torch.Generator().manual_seed(0)
    drawn = draw_masks(torch.rand(3, 12, generator=gen), torch.rand(3, 200, generator=gen), 1 / 6, 0.3)
    rand = random_masks_like(drawn, seed=1)
    assert rand.head.sum(dim=1).tolist() == drawn.head.sum(dim=1).tolist()
    assert rand.ffn.sum(dim=1).tolist() == drawn.ffn.sum(dim=1).tolist()
    assert not torch.equal(rand.ffn, drawn.ffn)
    assert torch.equal(random_masks_like(drawn, seed=1).ffn, rand.ffn)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_ticket_save_load_round_trip(tmp_path, kind):
    from transformers import BertTokenizerFast

    model = tiny_model(kind)
    masks = Masks.full(3, 4, 37)
    masks.head[1, :3] = False
    masks.ffn[0, ::2] = False
    pruned = prune_model(model, masks)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)])
    )
    tok = BertTokenizerFast(vocab_file=str(vocab))
    out = save_ticket(pruned, masks, "tiny", tmp_path / "ticket", tok, meta={"stage": "rewound"})
    loaded, loaded_tok = load_ticket(out)
    batch = tiny_batch(2)
    assert torch.equal(logits(loaded, batch), logits(pruned, batch))
    assert heads_per_layer(loaded) == [4, 1, 4] and neurons_per_layer(loaded)[0] == 18
    assert loaded_tok.vocab_size == tok.vocab_size
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in tiny_model(kind).parameters())


# ---------------------------------------------------------------- re-initialisation (Sec. 5.4)


def _scramble(model):
    """Stand-in pre-trained values: every parameter, biases and LayerNorms included, away from any init."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


LINEARS = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_reinit_touches_exactly_the_encoder_linears_and_the_pooler(kind):
    model = _scramble(tiny_model(kind))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialize(model, seed=5)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    base = model.base_model_prefix
    layers = [f"{base}.encoder.layer.{i}.{lin}" for i in range(3) for lin in LINEARS]
    expected = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    if kind == "bert":  # RoBERTa's classifier has no pooler
        expected |= {f"{base}.pooler.dense.weight", f"{base}.pooler.dense.bias"}
    assert changed == expected
    # BERT's own initialisation: N(0, initializer_range) weights, zero biases; the seed fixes the values
    std = model.config.initializer_range
    w, b = (after[f"{base}.encoder.layer.0.intermediate.dense.{p}"] for p in ("weight", "bias"))
    assert abs(float(w.std()) - std) < 0.2 * std and not b.any()
    again = reinitialize(_scramble(tiny_model(kind)), seed=5).state_dict()
    assert all(torch.equal(again[k], after[k]) for k in expected)


@pytest.fixture(scope="module")
def pretrained_dir(tiny_model_dir, tmp_path_factory):
    """The tiny backbone with every weight and bias non-zero (a freshly initialised bias is 0, like a re-init)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("scrambled")
    _scramble(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def _outside(name: str, shape: torch.Size, masks: Masks, head_size: int) -> torch.Tensor:
    """Expected: which entries of parameter `name` belong to units outside the ticket."""
    out = torch.zeros(shape, dtype=torch.bool)
    parts = name.split(".")
    if "layer" not in parts:
        return out  # embeddings, pooler, classifier: shared by every unit
    at = parts.index("layer") + 1
    module, kind, i = ".".join(parts[at + 1 : -1]), parts[-1], int(parts[at])
    heads, neurons = (~masks.head[i]).repeat_interleave(head_size), ~masks.ffn[i]
    if module in ("attention.self.query", "attention.self.key", "attention.self.value"):
        out[heads] = True  # the head's rows, and its bias entries
    elif module == "intermediate.dense":
        out[neurons] = True
    elif module == "attention.output.dense" and kind == "weight":
        out[:, heads] = True  # the head's columns; the bias is shared
    elif module == "output.dense" and kind == "weight":
        out[:, neurons] = True
    return out


def test_no_structure_reinitialises_exactly_the_weights_outside_the_ticket(pretrained_dir):
    from er_ray.model import load_backbone

    masks = Masks.full(2, 4, 40)
    masks.head[0, 1] = masks.head[1, [0, 3]] = False
    masks.ffn[0, [2, 7, 39]] = False
    masks.ffn[1, :12] = False
    pre = load_backbone(str(pretrained_dir), 2, seed=3).state_dict()
    full = build_ticket(str(pretrained_dir), 2, masks, seed=3, structure="full")
    assert heads_per_layer(full) == [4, 4] and neurons_per_layer(full) == [40, 40]  # nothing removed
    d = full.config.hidden_size // full.config.num_attention_heads
    post = full.state_dict()
    for name, before in pre.items():
        changed = before != post[name]
        assert torch.equal(changed, _outside(name, before.shape, masks, d)), name
    assert any(_outside(n, p.shape, masks, d).any() for n, p in pre.items() if n.endswith("bias"))


def test_the_authors_signed_quantile_drawing_prunes_every_tie():
    """What docs/method.md states about the authors' drawing (compared in `er-ray bench --stop-rules`)."""
    from er_ray.bench import quantile_masks

    head = torch.tensor([[-0.9, 0.1, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    q = quantile_masks(head, torch.ones(2, 10), head_ratio=0.375, ffn_ratio=0.2)
    # signed, not magnitude: -0.9 ranks lowest; every 1.0 ties with the threshold and goes, except the one
    # the keep-a-head-per-layer loop saves: 5 heads pruned where the ratio asks for 3
    assert q.head.tolist() == [[False, False, True, True], [True, False, False, False]]
    assert not q.ffn.any()  # equal coefficients: every neuron pruned where 20% were asked for
    exact = draw_masks(head, torch.ones(2, 10), 0.375, 0.2)
    assert int((~exact.head).sum()) == 3 and int((~exact.ffn).sum()) == 4
