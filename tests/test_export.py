"""A ticket outside er-ray: its folder and `er-ray export` (hf, onnx) load in a process that never imports
er_ray, with the ticket's predictions and logits (within 1e-5) and the data's label names."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from er_ray.cli import main
from er_ray.export import export_hf, export_onnx
from er_ray.model import heads_per_layer, neurons_per_layer
from er_ray.ticket import Masks, load_ticket, prune_model, save_ticket

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "fine", "not bad at all, really"]
LABELS = ["negative", "positive"]

# run in a fresh interpreter: er_ray cannot be imported there (it is installed here, so block it outright)
LOADER = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoErRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "er_ray" or name.startswith("er_ray."):
                raise ImportError("er_ray must not be imported here")

    sys.meta_path.insert(0, NoErRay())
    from transformers import AutoTokenizer

    texts, out = json.loads(sys.argv[1]), {}
    for kind, folder in json.loads(sys.argv[2]):
        enc = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="np")
        if kind == "hf":
            import torch
            from transformers import AutoModelForSequenceClassification, pipeline

            model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            with torch.no_grad():
                logits = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.tolist()
            labels = [p["label"] for p in pipeline("text-classification", model=folder)(texts)]
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(folder + "/model.onnx")
            logits = session.run(["logits"], {i.name: enc[i.name] for i in session.get_inputs()})[0].tolist()
            id2label = json.loads(session.get_modelmeta().custom_metadata_map["id2label"])
            labels = [id2label[str(max(range(len(row)), key=row.__getitem__))] for row in logits]
        out[folder] = {"logits": logits, "labels": labels}
    assert "er_ray" not in sys.modules
    print(json.dumps(out))
""")


def load_elsewhere(folders: list[tuple[str, Path]]) -> dict:
    """{folder: {"logits", "labels"}} as a process without er_ray computes them."""
    argv = [sys.executable, "-c", LOADER, json.dumps(TEXTS), json.dumps([(k, str(f)) for k, f in folders])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ticket_dir(tiny_model_dir, tmp_path_factory):
    """A tiny BERT ticket (2 layers, 4 heads, 40 neurons) with heads pruned and uneven FFN widths."""
    from transformers import AutoModelForSequenceClassification

    from er_ray.model import load_tokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    masks = Masks.full(2, 4, 40)
    masks.head[0, [1, 2]] = False
    masks.ffn[0, ::3] = False  # 26 kept
    masks.ffn[1, 5:37] = False  # 8 kept
    prune_model(model, masks)
    out = tmp_path_factory.mktemp("tickets") / "ticket"
    return save_ticket(
        model, masks, str(tiny_model_dir), out, load_tokenizer(str(tiny_model_dir)), labels=LABELS
    )


def ticket_logits(ticket_dir) -> torch.Tensor:
    model, tok = load_ticket(ticket_dir)
    with torch.no_grad():
        return model(**tok(TEXTS, padding=True, return_tensors="pt")).logits


def assert_same_predictions(result: dict, expected: torch.Tensor) -> None:
    got = torch.tensor(result["logits"])
    assert got.shape == expected.shape
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max().item() <= 1e-5
    assert result["labels"] == [LABELS[i] for i in expected.argmax(-1).tolist()]


def test_er_rays_own_loader_keeps_the_real_widths(ticket_dir):
    model, _ = load_ticket(ticket_dir)
    assert heads_per_layer(model) == [2, 4] and neurons_per_layer(model) == [26, 8]
    assert model.config.id2label == {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def outside(ticket_dir, tmp_path_factory) -> dict[str, dict]:
    """The ticket folder, its hf export and (with onnxruntime) its onnx export, loaded in one fresh process."""
    folders = {
        "ticket": ("hf", ticket_dir),
        "hf": ("hf", export_hf(ticket_dir, tmp_path_factory.mktemp("x") / "hf")),
    }
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        folders["onnx"] = ("onnx", export_onnx(ticket_dir, tmp_path_factory.mktemp("x") / "onnx"))
    results = load_elsewhere(list(folders.values()))
    return {name: {**results[str(folder)], "dir": folder} for name, (_, folder) in folders.items()}


def test_the_ticket_folder_itself_loads_with_stock_transformers(ticket_dir, outside):
    config = json.loads((ticket_dir / "config.json").read_text())
    assert config["intermediate_size"] == 26 and config["pruned_heads"] == {"0": [1, 2], "1": []}
    assert_same_predictions(outside["ticket"], ticket_logits(ticket_dir))


def test_hf_export_round_trip_without_er_ray(ticket_dir, outside):
    out = outside["hf"]["dir"]
    assert not (out / "ticket.json").exists() and (out / "config.json").is_file()
    assert_same_predictions(outside["hf"], ticket_logits(ticket_dir))


def test_onnx_export_keeps_real_shapes_and_logits(ticket_dir, outside):
    if "onnx" not in outside:
        pytest.skip("needs onnxruntime and onnxscript (pip install -e '.[export]')")
    import onnx

    graph = onnx.load(str(outside["onnx"]["dir"] / "model.onnx"))
    shapes = {tuple(t.dims) for t in graph.graph.initializer}
    assert (8, 32) in shapes or (32, 8) in shapes  # layer 1's W1 or W2 at its real width: nothing padded
    assert_same_predictions(outside["onnx"], ticket_logits(ticket_dir))


def test_tickets_saved_before_padding_still_load(ticket_dir, tmp_path):
    """Format 1 tickets hold unpadded weights and no config.json."""
    import shutil

    from safetensors.torch import save_model

    model, _ = load_ticket(ticket_dir)
    old = tmp_path / "old"
    shutil.copytree(ticket_dir, old)
    (old / "config.json").unlink()
    save_model(model, str(old / "model.safetensors"))
    info = json.loads((old / "ticket.json").read_text())
    (old / "ticket.json").write_text(json.dumps({**info, "format": 1}))
    assert torch.equal(ticket_logits(old), ticket_logits(ticket_dir))


def test_export_command_and_its_bad_input(ticket_dir, tmp_path, capsys):
    assert main(["export", str(ticket_dir), "--to", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    for argv, needle in [
        (["export", str(ticket_dir), "--to", str(tmp_path / "out")], "not empty"),
        (["export", str(tmp_path), "--to", str(tmp_path / "x")], "not a ticket folder"),
        (["export", str(ticket_dir), "--to", str(tmp_path / "y"), "--format", "tflite"], "invalid choice"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_an_export_is_readable_by_others_and_carries_a_model_card(ticket_dir, tmp_path):
    import shutil
    import stat

    from er_ray.export import CARD_FILE

    ticket = tmp_path / "ticket"
    shutil.copytree(ticket_dir, ticket)
    info = json.loads((ticket / "ticket.json").read_text())
    meta = {"method": "earlyrobust", "dataset": "sst2", "gamma": "0.1", "seed": "2", "clean_acc": "0.8125"}
    meta |= {"stop_epoch": "0.45", "stop_rule": "paper", "param_count": "1000000"}
    (ticket / "ticket.json").write_text(json.dumps({**info, "meta": meta}))
    attack = {
        "aua": {"textbugger": 0.25},
        "counts": {"textbugger": {"successful": 6, "failed": 2, "skipped": 0}},
    }
    (ticket / "attack").mkdir()
    (ticket / "attack" / "summary.json").write_text(json.dumps({**attack, "resources": "offline"}))
    old = os.umask(0o022)
    try:
        out = export_hf(ticket, tmp_path / "exported")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes.pop("exported") == 0o755 and set(modes.values()) == {0o644}, modes
    card = (out / CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for field in (
        f"| base model | {info['base_model']} |",
        "| method | earlyrobust |",
        "| γ (the stop rule's threshold) | 0.1 |",
        "| ticket drawn at | epoch 0.45 (paper rule) |",
        "| pruned heads | 2 of 8 (25.0%) |",  # the fixture's ticket: heads 1 and 2 of layer 0
        "| pruned FFN neurons | 46 of 80 (57.5%) |",  # 26 + 8 kept
        "| seed | 2 |",
        "| training data | sst2 |",
        "| clean accuracy | 81.2% on the run's evaluation split |",
        "| Aua under textbugger | 25.0% of 8 attacked examples, offline attack resources |",
        f"er-ray {importlib.metadata.version('er-ray')}",
    ):
        assert field in card, field
