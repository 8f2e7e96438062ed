"""Coefficients, masks, drawing, physical pruning and the ticket's save/load round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

from er_ray.model import Coefficients, attach_scales, heads_per_layer, neurons_per_layer
from er_ray.ticket import (
    Masks,
    draw_masks,
    load_ticket,
    prune_model,
    random_masks_like,
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
    masks = draw_masks(torch.rand(3, 12, generator=gen), torch.rand(3, 50, generator=gen), 0.25, 0.2, "layerwise")
    assert masks.head.sum(dim=1).tolist() == [9, 9, 9]
    assert masks.ffn.sum(dim=1).tolist() == [40, 40, 40]


def test_random_ticket_has_the_same_sizes_but_other_units():
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
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    out = save_ticket(pruned, masks, "tiny", tmp_path / "ticket", tok, meta={"stage": "rewound"})
    loaded, loaded_tok = load_ticket(out)
    batch = tiny_batch(2)
    assert torch.equal(logits(loaded, batch), logits(pruned, batch))
    assert heads_per_layer(loaded) == [4, 1, 4] and neurons_per_layer(loaded)[0] == 18
    assert loaded_tok.vocab_size == tok.vocab_size
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in tiny_model(kind).parameters())
