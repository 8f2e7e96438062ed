"""Embedding-space adversaries: FreeLB (Zhu et al. 2020) and K-step PGD with a Frobenius-ball projection
(Madry et al. 2018; the paper's Eqn 8).

The perturbation delta lives on the word embeddings; position and token-type embeddings are added by the
model. Norms are per example over (tokens x hidden); padding positions are never perturbed.

Under mixed precision (`amp`), only the forwards run in autocast: the word embeddings, delta, its gradient and
norms stay fp32, and with fp16 the perturbation's gradient (of a scaled loss) is unscaled before its
normalised ascent step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from er_ray.config import AdversaryConfig
from er_ray.precision import FP32, Amp

_EPS = 1e-12


@dataclass
class StepResult:
    loss: float  # the training loss of this step (mean over ascent steps for FreeLB)
    losses: list[float]  # loss at every forward pass, clean start first
    delta: torch.Tensor | None  # the last perturbation (detached), for inspection and tests


def _split(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    return batch["input_ids"], batch["labels"], rest


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Per-example Frobenius norm, shaped to broadcast over (batch, tokens, hidden)."""
    return x.flatten(1).norm(dim=1).clamp_min(_EPS).view(-1, 1, 1)


def project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Project each example's delta onto the Frobenius ball of `radius` (identity inside it)."""
    return delta * (radius / _norm(delta)).clamp(max=1.0)


def init_delta(embeds: torch.Tensor, mask: torch.Tensor, init_mag: float) -> torch.Tensor:
    """FreeLB's random start: uniform noise on real tokens, scaled so its magnitude is about init_mag."""
    if init_mag <= 0:
        return torch.zeros_like(embeds)
    noise = torch.empty_like(embeds).uniform_(-1, 1) * mask
    dims = mask.sum(dim=(1, 2)) * embeds.shape[-1]
    return noise * (init_mag / dims.sqrt().clamp_min(1.0)).view(-1, 1, 1)


def _loss(model: nn.Module, embeds: torch.Tensor, labels: torch.Tensor, rest: dict, amp: Amp) -> torch.Tensor:
    with amp.autocast():
        logits = model(inputs_embeds=embeds, **rest).logits
    return F.cross_entropy(logits.float(), labels)


def clean_step(model: nn.Module, batch: dict[str, torch.Tensor], amp: Amp = FP32) -> StepResult:
    with amp.autocast():
        out = model(**batch)
    amp.scale(out.loss).backward()
    return StepResult(out.loss.item(), [out.loss.item()], None)


def freelb_step(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: AdversaryConfig, amp: Amp = FP32
) -> StepResult:
    """K ascent steps; each forward/backward adds loss/K to the parameters' gradients (one optimizer step
    follows, taken by the caller)."""
    input_ids, labels, rest = _split(batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embed = model.get_input_embeddings()
    delta = init_delta(embed(input_ids), mask, cfg.init_mag)
    losses = []
    for k in range(cfg.steps):
        delta.requires_grad_()
        # recomputed each pass: the previous backward freed the lookup's graph
        loss = _loss(model, embed(input_ids) + delta, labels, rest, amp)
        amp.scale(loss / cfg.steps).backward()
        losses.append(loss.detach())  # read once at the end: on CUDA each .item() waits for the device
        if k == cfg.steps - 1:
            break
        grad = amp.unscale(delta.grad.detach()) * mask
        delta = delta.detach() + cfg.lr * grad / _norm(grad)
        if cfg.max_norm > 0:
            delta = project(delta, cfg.max_norm)
    values = torch.stack(losses).tolist()
    return StepResult(sum(values) / len(values), values, delta.detach())


def pgd_perturbation(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: AdversaryConfig, amp: Amp = FP32
) -> torch.Tensor:
    """K steps of delta <- Proj_eps(delta + tau * g / ||g||_F) (Eqn 8); no parameter gradients."""
    input_ids, labels, rest = _split(batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeds = model.get_input_embeddings()(input_ids).detach()
    delta = project(init_delta(embeds, mask, cfg.init_mag), cfg.epsilon)
    for _ in range(cfg.steps):
        delta.requires_grad_()
        (grad,) = torch.autograd.grad(amp.scale(_loss(model, embeds + delta, labels, rest, amp)), delta)
        grad = amp.unscale(grad) * mask
        delta = project(delta.detach() + cfg.lr * grad / _norm(grad), cfg.epsilon)
    return delta.detach()


def pgd_step(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: AdversaryConfig, amp: Amp = FP32
) -> StepResult:
    """Madry's objective: the parameters train on the loss at the worst-case perturbation found."""
    delta = pgd_perturbation(model, batch, cfg, amp)
    input_ids, labels, rest = _split(batch)
    loss = _loss(model, model.get_input_embeddings()(input_ids) + delta, labels, rest, amp)
    amp.scale(loss).backward()
    return StepResult(loss.item(), [loss.item()], delta)


def backward(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: AdversaryConfig, amp: Amp = FP32
) -> StepResult:
    """Compute one training step's gradients under the configured adversary (or none); with fp16 they are
    gradients of the scaled loss (`amp.step` unscales them)."""
    if cfg.kind == "freelb":
        return freelb_step(model, batch, cfg, amp)
    if cfg.kind == "pgd":
        return pgd_step(model, batch, cfg, amp)
    return clean_step(model, batch, amp)
