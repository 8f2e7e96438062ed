"""Drawing a ticket from coefficients (or at random), physical pruning, rewind / re-init / re-init of
what lies outside the ticket (the ablations of Sec. 5.2 and 5.4), save and load.

A mask set is two plain boolean tensors, `head` (layers, heads) and `ffn` (layers, neurons), True = kept.
`prune_model` is the one function that turns any mask set into a physically smaller model; `load_ticket`
re-derives the shapes from the saved kept indices.

A ticket folder is also a stock Hugging Face model folder: `config.json` prunes the heads through the config's
own `pruned_heads`, and since a BERT/RoBERTa config has one `intermediate_size`, `model.safetensors` holds every
FFN zero-padded to the widest layer (zero W1 rows and biases, zero W2 columns: the padded neurons add exactly
nothing). `load_ticket` cuts them off again, so er-ray's own model keeps the real widths.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
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


def random_masks(
    layers: int,
    heads: int,
    neurons: int,
    head_ratio: float,
    ffn_ratio: float,
    seed: int,
    scope: Literal["global", "layerwise"] = "global",
) -> Masks:
    """The authors' random ticket: uniform random coefficients, drawn like the real ones (same counts)."""
    gen = torch.Generator().manual_seed(seed)
    head, ffn = torch.rand(layers, heads, generator=gen), torch.rand(layers, neurons, generator=gen)
    return draw_masks(head, ffn, head_ratio, ffn_ratio, scope)


def random_masks_like(masks: Masks, seed: int) -> Masks:
    """A random ticket with the same number of kept heads and neurons in every layer (layer-wise ablation)."""
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


# The linear layers the authors' `--random_reinit` re-initialises (second_stage.py), per encoder layer, plus
# the pooler's dense layer: attention Q, K, V and output, and the FFN. Embeddings, LayerNorms and the
# classifier head keep their values.
REINIT_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def _linears(model: nn.Module) -> list[nn.Linear]:
    found = [layer.get_submodule(name) for layer in encoder_layers(model) for name in REINIT_LINEARS]
    pooler = getattr(model.base_model, "pooler", None)  # RoBERTa classifiers have none
    return found + ([pooler.dense] if pooler is not None else [])


def _fresh(weight: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty_like(weight).normal_(0.0, std, generator=gen)


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise the encoder's attention and FFN linears and the pooler as BERT initialises them
    (weights N(0, initializer_range), biases 0) from `seed` (the w/o-initialization ablation)."""
    gen, std = torch.Generator().manual_seed(seed), model.config.initializer_range
    with torch.no_grad():
        for lin in _linears(model):
            lin.weight.copy_(_fresh(lin.weight, std, gen))
            if lin.bias is not None:
                lin.bias.zero_()
    return model


def reinitialize_outside(model: nn.Module, masks: Masks, seed: int) -> nn.Module:
    """Re-initialise the weights of the units a ticket does not contain, in the full model (w/o structure):
    a pruned head's rows of Q, K, V (and their biases) and its columns of the attention output; a pruned
    neuron's row of W1 (and bias) and its column of W2. The ticket's weights and everything shared
    (embeddings, LayerNorms, output biases, pooler, classifier) keep their values."""
    gen, std = torch.Generator().manual_seed(seed), model.config.initializer_range
    with torch.no_grad():
        for layer, head_keep, ffn_keep in zip(encoder_layers(model), masks.head, masks.ffn, strict=True):
            att = layer.attention
            d = att.self.attention_head_size
            rows = (~head_keep).repeat_interleave(d)  # (hidden,): the pruned heads' slice
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.weight[rows] = _fresh(lin.weight, std, gen)[rows]
                lin.bias[rows] = 0.0
            att.output.dense.weight[:, rows] = _fresh(att.output.dense.weight, std, gen)[:, rows]
            gone = ~ffn_keep
            layer.intermediate.dense.weight[gone] = _fresh(layer.intermediate.dense.weight, std, gen)[gone]
            layer.intermediate.dense.bias[gone] = 0.0
            layer.output.dense.weight[:, gone] = _fresh(layer.output.dense.weight, std, gen)[:, gone]
    return model


def build_ticket(
    base: str,
    num_labels: int,
    masks: Masks,
    seed: int,
    weights: Literal["rewind", "reinit"] = "rewind",
    structure: Literal["pruned", "full"] = "pruned",
) -> nn.Module:
    """Rewind: the kept weights are the pre-trained ones (coefficients dropped), the classifier head is the
    seed's initialisation that every method shares; or re-initialise them (ablation). `structure="full"`
    keeps the whole model and re-initialises the weights outside the ticket instead of removing them."""
    model = load_backbone(base, num_labels, seed)
    if weights == "reinit":
        reinitialize(model, seed)
    if structure == "full":
        return reinitialize_outside(model, masks, seed)
    return prune_model(model, masks)


# ---------------------------------------------------------------- save and load


def _ffn_keys(model: nn.Module) -> list[tuple[str, ...]]:
    """Per encoder layer, the state-dict keys of W1's weight and bias and of W2's weight."""
    names = {id(m): n for n, m in model.named_modules()}
    keys = ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight")
    return [tuple(f"{names[id(layer)]}.{k}" for k in keys) for layer in encoder_layers(model)]


def _ffn_width(model: nn.Module) -> int:
    """The widest layer's FFN: the one `intermediate_size` of the padded (stock) form."""
    return max(layer.intermediate.dense.out_features for layer in encoder_layers(model))


def padded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights with every FFN zero-padded to the widest layer (the stock config's one intermediate_size)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    width = _ffn_width(model)
    for w1, b1, w2 in _ffn_keys(model):
        extra = width - state[b1].numel()
        state[w1] = nn.functional.pad(state[w1], (0, 0, 0, extra))
        state[b1] = nn.functional.pad(state[b1], (0, extra))
        state[w2] = nn.functional.pad(state[w2], (0, extra))
    return state


def _unpadded(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Cut padded FFN weights back to the model's real widths (tickets saved unpadded pass unchanged)."""
    state, real = dict(state), model.state_dict()
    for w1, b1, w2 in _ffn_keys(model):
        if b1 in state:
            n = real[b1].numel()
            state[w1], state[b1], state[w2] = state[w1][:n], state[b1][:n], state[w2][:, :n]
    return state


def set_labels(model: nn.Module, labels: list[str] | None) -> None:
    """id2label / label2id from the data's label names (kept as LABEL_i when the names don't fit)."""
    if labels and len(labels) == model.config.num_labels and len(set(labels)) == len(labels):
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}


def write_hf(model: nn.Module, out: Path) -> None:
    """`config.json` and padded `model.safetensors`: the folder loads with `from_pretrained`, exact logits."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    config.intermediate_size = _ffn_width(model)
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    save_file(padded_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def save_ticket(
    model: nn.Module,
    masks: Masks,
    base: str,
    out_dir: str | Path,
    tokenizer: Any = None,
    meta: dict | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Weights (a Hugging Face folder, see the module doc), the kept indices, base model reference and config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_labels(model, labels)
    write_hf(model, out)
    info = {
        "format": 2,  # 1: unpadded weights, no config.json (still read)
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


def _error_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_weights(path: str | Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    """A ticket's `model.safetensors` (with `header_only`, just validated: nothing is read into memory);
    a missing, truncated or corrupted file is a one-line `UserError`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS_FILE
    try:
        if not header_only:
            return load_file(str(file))
        with safe_open(str(file), framework="pt"):
            return {}  # opening checks the header and that the file holds every byte it announces
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read the ticket weights {file}: {_error_line(err)}") from None


def check_ticket(path: str | Path) -> None:
    """Cheap checks before handing a ticket to workers: its info parses and its weights' header is whole."""
    info = read_ticket_info(path)
    if not {"config", "kept_heads", "kept_neurons", "shape"} <= info.keys():
        raise UserError(f"{Path(path) / TICKET_FILE} is not an er-ray ticket (keys missing)")
    read_weights(path, header_only=True)


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
    try:
        model.load_state_dict(_unpadded(read_weights(path), model), strict=True)
    except RuntimeError as err:  # shapes or names that don't fit the ticket's structure
        raise UserError(
            f"the weights in {path / WEIGHTS_FILE} do not fit its {TICKET_FILE}: {_error_line(err)}"
        ) from None
    model.eval()
    tok_source = path if (path / "tokenizer_config.json").exists() else info["base_model"]
    return model, load_tokenizer(str(tok_source))
