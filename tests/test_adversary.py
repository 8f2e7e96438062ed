"""FreeLB and PGD perturbations: bounded as configured, padding untouched, loss raised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_model

from er_ray.adversary import backward, freelb_step, pgd_perturbation, project
from er_ray.config import AdversaryConfig


def _loss(model, batch, delta=None):
    emb = model.get_input_embeddings()(batch["input_ids"])
    if delta is not None:
        emb = emb + delta
    with torch.no_grad():
        out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"]).item()


def _per_example_norm(delta):
    return delta.flatten(1).norm(dim=1)


def test_project_onto_frobenius_ball():
    d = torch.randn(3, 5, 7) * 10
    p = project(d, 2.0)
    assert torch.allclose(_per_example_norm(p), torch.full((3,), 2.0), atol=1e-5)
    small = torch.randn(3, 5, 7) * 1e-3
    assert torch.equal(project(small, 2.0), small)


def test_pgd_respects_epsilon_leaves_padding_and_raises_loss():
    model = tiny_model("bert")
    batch = tiny_batch(3)
    cfg = AdversaryConfig(kind="pgd", steps=5, lr=0.5, epsilon=1.0, init_mag=0.0)
    delta = pgd_perturbation(model, batch, cfg)
    assert (_per_example_norm(delta) <= 1.0 + 1e-5).all()
    assert _per_example_norm(delta).min() > 0.9  # it reaches the boundary
    assert delta[0, 6:].abs().sum() == 0  # padded positions of example 0
    assert _loss(model, batch, delta) > _loss(model, batch) + 1e-4
    assert all(p.grad is None for p in model.parameters())  # the inner max leaves parameters alone


def test_freelb_accumulates_gradients_respects_max_norm_and_ascends():
    model = tiny_model("roberta")
    batch = tiny_batch(4)
    batch["input_ids"][0, 6:] = 1  # roberta pad id
    cfg = AdversaryConfig(kind="freelb", steps=4, lr=0.3, init_mag=0.1, max_norm=0.5)
    result = freelb_step(model, batch, cfg)
    assert len(result.losses) == 4
    assert result.losses[-1] > result.losses[0]  # each ascent step raises the loss
    assert (_per_example_norm(result.delta) <= 0.5 + 1e-5).all()
    assert result.delta[0, 6:].abs().sum() == 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_freelb_gradient_is_the_mean_over_ascent_steps():
    """K passes of loss/K: with a vanishing step the accumulated gradient equals one clean step's."""
    batch = tiny_batch(5)
    clean = tiny_model("bert")
    clean(**batch).loss.backward()
    adv = tiny_model("bert")
    freelb_step(adv, batch, AdversaryConfig(kind="freelb", steps=3, lr=1e-12, init_mag=0.0))
    for (name, p), q in zip(clean.named_parameters(), adv.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_dispatch_runs_the_configured_number_of_passes():
    """FreeLB K=3: three forward passes; PGD K=3: three for the inner max and one to train; none: one."""
    for kind, passes in [("freelb", 3), ("pgd", 4), ("none", 1)]:
        model = tiny_model("bert")
        calls = []
        model.bert.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        backward(model, tiny_batch(6), AdversaryConfig(kind=kind, steps=3))
        assert len(calls) == passes, kind
        assert model.classifier.weight.grad is not None


def test_freelb_ascent_step_is_tau_times_the_per_example_normalised_gradient():
    """delta_{k+1} = delta_k + tau * g_k / ||g_k||, g_k the loss gradient at delta_k with padding zeroed, the
    norm per example over tokens x hidden: an un-normalised, sign or batch-normalised step fails this."""
    model = tiny_model("bert")
    batch = tiny_batch(7)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    tau = 0.3
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()

    def grad_at(delta):
        delta = delta.clone().requires_grad_()
        out = model(inputs_embeds=embeds + delta, attention_mask=batch["attention_mask"])
        (g,) = torch.autograd.grad(F.cross_entropy(out.logits, batch["labels"]), delta)
        return g * mask

    expected = torch.zeros_like(embeds)
    for _ in range(2):  # K = 3: two ascent steps between three passes
        g = grad_at(expected)
        expected = expected + tau * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    result = freelb_step(model, batch, AdversaryConfig(kind="freelb", steps=3, lr=tau, init_mag=0.0))
    torch.testing.assert_close(result.delta, expected, rtol=1e-4, atol=1e-6)
    assert _per_example_norm(result.delta).max() <= 2 * tau + 1e-5  # two unit steps of length tau each
