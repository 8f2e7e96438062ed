"""Loading the model under attack from a saved directory: a ticket or a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from er_ray.config import UserError
from er_ray.model import check_model_dir
from er_ray.ticket import TICKET_FILE, check_ticket, load_ticket


def check_victim(path: str | Path) -> None:
    """Cheap checks in the driver before workers load the model: bad input is then one line, not a dead actor."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist")
    if (path / TICKET_FILE).exists():
        check_ticket(path)
    elif not (path / "config.json").exists():
        raise UserError(
            f"{path} is neither a ticket (no {TICKET_FILE}) nor a Hugging Face model (no config.json)"
        )
    else:
        check_model_dir(path)


def load_victim(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a ticket directory (has ticket.json) or a plain Hugging Face directory."""
    path = Path(path)
    check_victim(path)
    if (path / TICKET_FILE).exists():
        model, tokenizer = load_ticket(path)
    else:
        from safetensors import SafetensorError
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, SafetensorError) as err:
            raise UserError(f"cannot load the model in {path}: {str(err).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer
