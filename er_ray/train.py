"""The one training loop behind the search stage, fine-tuning and the adversarial baselines.

Batch order depends only on (seed, epoch), so a run can resume mid-epoch and a stopped search is a prefix
of a longer one. Time is measured around compute only (data collation and host->device copies excluded).
Mixed precision comes in as an `Amp` (er_ray/precision.py): autocast around forwards, fp16 loss scaling,
clipping on unscaled gradients; the regularizer (the L1 term) is computed in fp32 outside autocast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from er_ray import adversary
from er_ray.config import AdversaryConfig
from er_ray.precision import FP32, Amp


def pick_device(kind: str = "auto") -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(kind)


class Batches:
    """Seeded, resumable mini-batches over an encoded dataset with dynamic padding."""

    def __init__(
        self, encoded: list[dict], tokenizer, batch_size: int, seed: int, shuffle: bool = True
    ) -> None:
        from transformers import DataCollatorWithPadding

        self.encoded, self.batch_size, self.seed, self.shuffle = encoded, batch_size, seed, shuffle
        self.collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __len__(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.encoded)
        if self.shuffle:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            ).tolist()
        else:
            order = list(range(n))
        for b in range(start, len(self)):
            yield self.collate(
                [self.encoded[i] for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            )


class Clock:
    """Accumulates compute seconds; synchronises CUDA so the clock reads finished work."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._t0 = device, 0.0, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Clock:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, extra: list[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """AdamW; no decay on biases, LayerNorm and the importance coefficients (the L1 term regularises those)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay + list(extra), "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, int(warmup_ratio * total_steps), total_steps)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model weights."""

    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host -> device; to CUDA from pinned memory, so the copy is asynchronous and overlaps queued kernels."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def train(
    model: nn.Module,
    batches: Batches,
    total_steps: int,
    opt: torch.optim.Optimizer,
    sched,
    adv: AdversaryConfig,
    max_grad_norm: float,
    device: torch.device,
    regularizer: Callable[[], torch.Tensor] | None = None,
    every: int | None = None,
    on_every: Callable[[TrainState], bool] | None = None,
    state: TrainState | None = None,
    progress: str | None = None,
    amp: Amp = FP32,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainState:
    """Run optimizer steps until `total_steps` (or `on_every` returns True).

    `on_every(state)` runs after every `every` steps; its time is not training time unless it says so
    by adding to `state.seconds` itself. `on_step(step, total_steps)` after every step (keep it cheap).
    """
    state = state or TrainState()
    clip = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc=progress, disable=progress is None, mininterval=2)
    while state.step < total_steps:
        epoch, start = divmod(state.step, len(batches))
        for batch in batches.epoch(epoch, start):
            batch = to_device(batch, device)
            with Clock(device) as clock:
                result = adversary.backward(model, batch, adv, amp)
                if regularizer is not None:
                    amp.scale(
                        regularizer()
                    ).backward()  # scaled like the loss: unscale_ treats all grads alike
                amp.step(opt, clip, max_grad_norm)
                sched.step()
                opt.zero_grad(set_to_none=True)
            state.seconds += clock.seconds
            state.step += 1
            state.losses.append(result.loss)
            bar.update()
            bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
            if on_step is not None:
                on_step(state.step, total_steps)
            if every and on_every and state.step % every == 0 and on_every(state):
                bar.close()
                return state
            if state.step >= total_steps:
                break
    bar.close()
    return state


@torch.no_grad()
def predict(model: nn.Module, batches: Batches, device: torch.device, amp: Amp = FP32) -> torch.Tensor:
    model.eval()
    preds = []
    for b in batches.epoch(0):
        with amp.autocast():
            logits = model(**to_device(b, device)).logits
        preds.append(logits.float().argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(
    model: nn.Module, batches: Batches, labels: list[int], device: torch.device, amp: Amp = FP32
) -> float:
    preds = predict(model, batches, device, amp)
    return float((preds == torch.tensor(labels)).float().mean()) if len(labels) else float("nan")
