"""Mixed precision: which precision a run uses on its device, and the autocast / loss scaling around forwards.

`resolve(requested, device)` turns `runtime.precision` (auto | fp32 | bf16 | fp16) into what runs, as a plain
string ("fp32", "bf16", "fp16") that results carry and the tracker can log. `auto` picks bf16 where the
hardware has it (CUDA capability >= 8; CPUs with AVX512-BF16 or AMX), fp16 with gradient scaling on older
GPUs, else fp32. An explicit bf16 is honoured everywhere (emulated, hence slow, on CPUs without bf16
instructions); fp16 on a CPU is a UserError (no loss-scaled fp16 training there worth having).

`Amp` is what a loop holds: `autocast()` around forwards only, `scale(loss)` before backward and
`unscale(grad)` for gradients that bypass the optimizer (FreeLB/PGD's perturbation). Model weights stay fp32
(autocast, never `.half()`); so do the importance coefficients, their gradients, the L1 term and the
perturbations with their norms: those are computed outside autocast or from fp32 tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from er_ray.config import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles): there bf16 autocast is fast."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes (private in 2.x)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve(requested: str, device: torch.device | str) -> str:
    """The precision that runs on `device` for `requested` (see the module docstring for the rules)."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision '{requested}': expected one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if requested == "fp16" and not cuda:
        raise UserError(
            f"precision fp16 needs a CUDA device (this run is on {device.type}): use bf16 or fp32"
        )
    if requested != "auto":
        return requested
    if cuda:
        return "bf16" if cuda_capability(device)[0] >= 8 else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


class Amp:
    """Autocast (and, for fp16 training, a GradScaler) for one loop on one device type."""

    def __init__(self, precision: str = "fp32", device_type: str = "cpu", training: bool = True) -> None:
        if precision not in ("fp32", *_DTYPES):
            raise ValueError(f"Amp needs a resolved precision (fp32, bf16, fp16), got '{precision}'")
        self.precision, self.device_type = precision, device_type
        # loss scaling keeps small fp16 gradients from flushing to zero; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" and training else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.precision])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient of a scaled loss that the optimizer never sees (the perturbation's), back to true size."""
        return grad / self.scaler.get_scale() if self.scaler is not None else grad

    def step(
        self, opt: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], max_grad_norm: float | None
    ) -> None:
        """Clip (on unscaled gradients; None: no clipping) and step; with fp16, an overflowed step is skipped."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


FP32 = Amp("fp32")


def amp_for(requested: str, device: torch.device | str, training: bool = True) -> Amp:
    device = torch.device(device)
    return Amp(resolve(requested, device), device.type, training)
