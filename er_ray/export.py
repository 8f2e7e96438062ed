"""A ticket as a folder other tools load without er-ray: Hugging Face transformers (`hf`) or ONNX (`onnx`).

hf:   `config.json` + `model.safetensors` + tokenizer. Heads are pruned through the config's own `pruned_heads`;
      a BERT/RoBERTa config has one `intermediate_size`, so every FFN is zero-padded to the widest layer (zero
      W1 rows and biases, zero W2 columns: the padded neurons add exactly nothing; see er_ray/ticket.py).
      `AutoModelForSequenceClassification.from_pretrained(DIR)` and `pipeline("text-classification", DIR)`.
onnx: `model.onnx` (inputs as the tokenizer names them, output `logits`, batch and sequence dynamic) at the
      ticket's real per-layer widths, + tokenizer; id2label / label2id in the model's metadata_props.
Both carry the data's label names. The folder is written beside its place and moved in when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from er_ray.config import UserError
from er_ray.ticket import TICKET_FILE, load_ticket, write_hf

Format = Literal["hf", "onnx"]
ONNX_FILE = "model.onnx"


def _write_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder {out} already exists and is not empty: choose a new one")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as err:
        raise UserError(f"cannot create the export folder {out}: {err.strerror}") from None
    try:
        write(tmp)
        os.replace(tmp, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf(ticket_dir: str | Path, out_dir: str | Path) -> Path:
    """A stock transformers folder with the ticket's exact logits (e.g. for MLflow's transformers flavour)."""
    model, tokenizer = load_ticket(ticket_dir)

    def write(tmp: Path) -> None:
        write_hf(model, tmp)
        tokenizer.save_pretrained(tmp)

    return _write_atomically(out_dir, write)


class _Logits(nn.Module):
    """The classifier with tensor inputs and one output, `logits`, as the ONNX graph sees it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


def _onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("--format onnx needs onnx and onnxscript: pip install 'er-ray[export]'") from None
    return onnx


def export_onnx(ticket_dir: str | Path, out_dir: str | Path) -> Path:
    """`model.onnx` at the ticket's real shapes, its tokenizer, and the label names as metadata."""
    onnx = _onnx()
    model, tokenizer = load_ticket(ticket_dir)
    sample = tokenizer(["a short example", "and a second, longer example"], padding=True, return_tensors="pt")
    inputs = {k: sample[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")

    def write(tmp: Path) -> None:
        file = tmp / ONNX_FILE
        with torch.no_grad():
            torch.onnx.export(
                _Logits(model).eval(),
                (),
                str(file),
                kwargs=inputs,
                input_names=list(inputs),
                output_names=["logits"],
                dynamic_shapes={k: {0: batch, 1: sequence} for k in inputs},
                dynamo=True,
                verbose=False,
            )
        graph = onnx.load(str(file))
        labels = {
            "id2label": json.dumps(model.config.id2label),
            "label2id": json.dumps(model.config.label2id),
        }
        onnx.helper.set_model_props(graph, labels)
        onnx.save(graph, str(file))
        tokenizer.save_pretrained(tmp)

    return _write_atomically(out_dir, write)


def export_ticket(ticket_dir: str | Path, out_dir: str | Path, fmt: Format = "hf") -> Path:
    if not (Path(ticket_dir) / TICKET_FILE).is_file():
        raise UserError(f"{ticket_dir} is not a ticket folder (no {TICKET_FILE})")
    return (export_hf if fmt == "hf" else export_onnx)(ticket_dir, out_dir)
