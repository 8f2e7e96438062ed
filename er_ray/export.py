"""A ticket as a folder other tools load without er-ray: Hugging Face transformers (`hf`) or ONNX (`onnx`).

hf:   `config.json` + `model.safetensors` + tokenizer. Heads are pruned through the config's own `pruned_heads`;
      a BERT/RoBERTa config has one `intermediate_size`, so every FFN is zero-padded to the widest layer (zero
      W1 rows and biases, zero W2 columns: the padded neurons add exactly nothing; see er_ray/ticket.py).
      `AutoModelForSequenceClassification.from_pretrained(DIR)` and `pipeline("text-classification", DIR)`.
onnx: `model.onnx` (inputs as the tokenizer names them, output `logits`, batch and sequence dynamic) at the
      ticket's real per-layer widths, + tokenizer; id2label / label2id in the model's metadata_props.
Both carry the data's label names and a model card (`README.md`: what the ticket is, how it was made, what it
scored). The folder is written beside its place and moved in when complete, readable by others as the umask
allows (a temporary folder is private).
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
from er_ray.layout import ATTACK_DIR, SUMMARY_FILE
from er_ray.ticket import TICKET_FILE, load_ticket, read_ticket_info, write_hf

Format = Literal["hf", "onnx"]
ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"  # where the Hugging Face layout keeps a model card


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
        _public(tmp)
        os.replace(tmp, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _public(folder: Path) -> None:
    """The modes a plain `mkdir` and `open` give under this process's umask (mkdtemp's are 0700 / 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


HOW = {  # how each method made its model, for the card
    "finetune": "the full pre-trained model, fine-tuned (no pruning, no adversary)",
    "freelb": "the full pre-trained model, adversarially fine-tuned with FreeLB (no pruning)",
    "pgd": "the full pre-trained model, adversarially fine-tuned with PGD (no pruning)",
    "earlybert": "a ticket searched without an adversary (EarlyBERT): importance coefficients on every attention "
    "head and FFN neuron trained with L1 until the masks they imply stopped changing (γ); the smallest heads and "
    "neurons removed, the rest rewound to the pre-trained weights and fine-tuned",
}
EARLYROBUST_HOW = (
    "a robust early-bird ticket (EarlyRobust): importance coefficients on every attention head and FFN neuron "
    "trained with adversarial training plus L1 until the masks they imply stopped changing (γ); the smallest "
    "heads and neurons removed, the rest rewound to the pre-trained weights and fine-tuned"
)


def _pruned(kept: list, layers: int, per_layer: int) -> str:
    total = layers * per_layer
    gone = total - sum(map(len, kept))
    return f"{gone} of {total} ({gone / total:.1%})" if total else ""


def model_card(ticket_dir: str | Path) -> str:
    """The ticket's model card: base model, method, γ, seed, what was pruned, clean accuracy and Aua with their
    n, training data, er-ray version and how it was made, from `ticket.json` and the ticket's attack summary
    (what a ticket does not record is left out)."""
    from importlib.metadata import version

    info = read_ticket_info(ticket_dir)
    meta, shape = info.get("meta", {}), info.get("shape", {})
    layers, base = shape.get("layers", 0), info.get("base_model", "a BERT model")
    method, data = meta.get("method", ""), meta.get("dataset", "")
    summary_file = Path(ticket_dir) / ATTACK_DIR / SUMMARY_FILE
    attack = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    clean = float(meta["clean_acc"]) if meta.get("clean_acc") is not None else None
    rows = [
        ("base model", base),
        ("method", method),
        ("γ (the stop rule's threshold)", meta.get("gamma", "")),
        ("pruned heads", _pruned(info.get("kept_heads", []), layers, shape.get("heads", 0))),
        ("pruned FFN neurons", _pruned(info.get("kept_neurons", []), layers, shape.get("neurons", 0))),
        ("seed", meta.get("seed", "")),
        ("training data", data),
        ("parameters", f"{int(meta['param_count']):,}" if meta.get("param_count") is not None else ""),
        ("clean accuracy", f"{clean:.1%} on the run's evaluation split" if clean is not None else ""),
    ]
    if meta.get("stop_epoch") is not None:
        rows.insert(
            3, ("ticket drawn at", f"epoch {float(meta['stop_epoch']):.2f} ({meta.get('stop_rule')} rule)")
        )
    for recipe, aua in attack.get("aua", {}).items():
        n = sum(attack.get("counts", {}).get(recipe, {}).values())
        rows.append(
            (
                f"Aua under {recipe}",
                f"{aua:.1%} of {n} attacked examples, {attack.get('resources')} attack resources",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in ("", None))
    tags = "".join(f"\n- {t}" for t in ("er-ray", method, "text-classification") if t)
    how = HOW.get(method, EARLYROBUST_HOW if method.startswith("earlyrobust") else "a ticket")
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: text-classification\ntags:{tags}\n---\n\n"
        f"# {method or 'er-ray'} model of {base}{f' on {data}' if data else ''}\n\n"
        f"Made with er-ray {version('er-ray')}, a reproduction of EarlyRobust (Xi et al., EMNLP 2022, "
        f'"Efficient Adversarial Training with Robust Early-Bird Tickets"): {how}. Pruned heads are listed in '
        "the config's `pruned_heads`; FFN layers are zero-padded to the widest layer (a padded neuron adds "
        f"exactly nothing).\n\n| | |\n|---|---|\n{table}\n\n"
        '```python\nfrom transformers import pipeline\n\nclassify = pipeline("text-classification", "<this folder>")'
        "\n```\n"
    )


def export_hf(ticket_dir: str | Path, out_dir: str | Path) -> Path:
    """A stock transformers folder with the ticket's exact logits (e.g. for MLflow's transformers flavour)."""
    model, tokenizer = load_ticket(ticket_dir)

    def write(tmp: Path) -> None:
        write_hf(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD_FILE).write_text(model_card(ticket_dir))

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
        (tmp / CARD_FILE).write_text(model_card(ticket_dir))

    return _write_atomically(out_dir, write)


def export_ticket(ticket_dir: str | Path, out_dir: str | Path, fmt: Format = "hf") -> Path:
    if not (Path(ticket_dir) / TICKET_FILE).is_file():
        raise UserError(f"{ticket_dir} is not a ticket folder (no {TICKET_FILE})")
    return (export_hf if fmt == "hf" else export_onnx)(ticket_dir, out_dir)
