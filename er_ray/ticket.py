"""Drawing a ticket from coefficients, physical pruning, rewind / re-init, save and load.

A mask set is two plain boolean tensors, `head` (layers, heads) and `ffn` (layers, neurons), True = kept.
`prune_model` is the one function that turns any mask set into a physically smaller model; `load_ticket`
re-derives the shapes from the saved kept indices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from er_ray.config import UserError
from er_ray.model import encoder_layers, load_backbone, load_tokenizer

TICKET_FILE = "ticket.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Masks:
    head: torch.Tensor  # bool (layers, heads)
    ffn: torch.Tensor  # bool (layers, neurons)

    def kept_heads(self) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in self.head]

    def kept_neurons(self) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in self.ffn]

    def as_float(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.float(), self.ffn.float()

    @classmethod
    def full(cls, layers: int, heads: int, neurons: int) -> Masks:
        return cls(torch.ones(layers, heads, dtype=torch.bool), torch.ones(layers, neurons, dtype=torch.bool))


# ---------------------------------------------------------------- drawing


def _prune_smallest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask that prunes the `n_prune` smallest |scores| over the whole matrix, keeping >= 1 per row.

    Ties break by index (stable sort), so equal coefficients always give the same ticket.
    """
    rows, cols = scores.shape
    order = torch.sort(scores.abs().flatten(), stable=True).indices.tolist()
    keep = torch.ones(rows * cols, dtype=torch.bool)
    left = [cols] * rows
    pruned = 0
    for idx in order:
        if pruned >= n_prune:
            break
        r = idx // cols
        if left[r] > 1:
            keep[idx] = False
            left[r] -= 1
            pruned += 1
    return keep.view(rows, cols)


def _prune_count(ratio: float, n: int) -> int:
    return int(round(ratio * n))


def _draw(scores: torch.Tensor, ratio: float, scope: Literal["global", "layerwise"]) -> torch.Tensor:
    if scope == "global":
        return _prune_smallest(scores, _prune_count(ratio, scores.numel()))
    per_row = min(_prune_count(ratio, scores.shape[1]), scores.shape[1] - 1)
    return torch.stack([_prune_smallest(row[None], per_row)[0] for row in scores])


def draw_masks(
    head_coef: torch.Tensor,
    ffn_coef: torch.Tensor,
    head_ratio: float,
    ffn_ratio: float,
    scope: Literal["global", "layerwise"] = "global",
) -> Masks:
    """The ticket the coefficients imply: prune the smallest-magnitude heads and neurons.

    Global (the paper's choice) ranks across layers and keeps >= 1 head (and neuron) per layer;
    `layerwise` (the ablation) prunes the same ratio in every layer.
    """
    return Masks(_draw(head_coef, head_ratio, scope), _draw(ffn_coef, ffn_ratio, scope))


def random_masks_like(masks: Masks, seed: int) -> Masks:
    """A random ticket with the same number of kept heads and neurons in every layer (the ablation)."""
    gen = torch.Generator().manual_seed(seed)

    def shuffle(m: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(m)
        for i, row in enumerate(m):
            out[i, torch.randperm(row.numel(), generator=gen)[: int(row.sum())]] = True
        return out

    return Masks(shuffle(masks.head), shuffle(masks.ffn))


# ---------------------------------------------------------------- physical pruning


def prune_model(model: nn.Module, masks: Masks) -> nn.Module:
    """Remove pruned heads (with their W_O rows) and FFN neurons in place; returns the model."""
    from transformers.pytorch_utils import prune_linear_layer

    kept_heads = masks.kept_heads()
    n_heads = masks.head.shape[1]
    model.prune_heads({i: sorted(set(range(n_heads)) - set(k)) for i, k in enumerate(kept_heads)})
    for layer, kept in zip(encoder_layers(model), masks.kept_neurons(), strict=True):
        if len(kept) == layer.intermediate.dense.out_features:
            continue
        index = torch.tensor(kept, dtype=torch.long, device=layer.output.dense.weight.device)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)
    return model


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every weight from `seed` (the re-initialised-ticket ablation)."""
    torch.manual_seed(seed)
    model.apply(model._init_weights)
    return model


def build_ticket(
    base: str, num_labels: int, masks: Masks, seed: int, weights: Literal["rewind", "reinit"] = "rewind"
) -> nn.Module:
    """Rewind: the kept weights are the pre-trained ones (coefficients dropped), the classifier head is the
    seed's initialisation that every method shares; or re-initialise them (ablation)."""
    model = load_backbone(base, num_labels, seed)
    if weights == "reinit":
        reinitialize(model, seed)
    return prune_model(model, masks)


# ---------------------------------------------------------------- save and load


def save_ticket(
    model: nn.Module, masks: Masks, base: str, out_dir: str | Path, tokenizer: Any = None, meta: dict | None = None
) -> Path:
    """Weights as safetensors, plus the kept indices, base model reference and config to rebuild it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_FILE))
    info = {
        "format": 1,
        "base_model": base,
        "config": model.config.to_dict(),
        "kept_heads": masks.kept_heads(),
        "kept_neurons": masks.kept_neurons(),
        "shape": {"layers": masks.head.shape[0], "heads": masks.head.shape[1], "neurons": masks.ffn.shape[1]},
        "meta": meta or {},
    }
    (out / TICKET_FILE).write_text(json.dumps(info, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def read_ticket_info(path: str | Path) -> dict:
    file = Path(path) / TICKET_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not a readable ticket: {err}") from None


def masks_from_info(info: dict) -> Masks:
    shape = info["shape"]
    masks = Masks.full(shape["layers"], shape["heads"], shape["neurons"])
    masks.head.zero_()
    masks.ffn.zero_()
    for i, (h, f) in enumerate(zip(info["kept_heads"], info["kept_neurons"], strict=True)):
        masks.head[i, h] = True
        masks.ffn[i, f] = True
    return masks


def load_ticket(path: str | Path) -> tuple[nn.Module, Any]:
    """Rebuild a saved ticket: the same architecture from the config and kept indices, then its weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    info = read_ticket_info(path)
    cfg_dict = dict(info["config"])
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    # from_config re-applies config.pruned_heads itself; the FFN slicing is ours
    config.pruned_heads = {}
    model = AutoModelForSequenceClassification.from_config(config)
    prune_model(model, masks_from_info(info))
    load_model(model, str(path / WEIGHTS_FILE))
    model.eval()
    tok_source = path if (path / "tokenizer_config.json").exists() else info["base_model"]
    return model, load_tokenizer(str(tok_source))
