"""What the zero-padded FFN of an `hf` export costs, and how close ONNX is to torch (figures in docs/export.md).

A MiniLM ticket drawn from random coefficients (1/6 of the heads and 30% of the neurons pruned globally, the
neuron scores scaled per layer so that the layers keep uneven widths, as real tickets do), saved, then:
  * inference of the ticket at its real widths (er_ray's loader) against the exported folder loaded by stock
    transformers (every FFN padded to the widest layer): medians of interleaved repeats, one SST-2 batch;
  * the largest |logit difference| of both, and of the ONNX export under onnxruntime, against the ticket.

    python benchmarks/export_padding.py [--threads 2] [--repeats 7] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--no-onnx", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification

    from er_ray.config import DataConfig, settings
    from er_ray.data import load_split
    from er_ray.export import export_hf, export_onnx
    from er_ray.model import load_backbone, load_tokenizer, neurons_per_layer
    from er_ray.ticket import build_ticket, draw_masks, load_ticket, save_ticket

    gen = torch.Generator().manual_seed(0)
    base = load_backbone("minilm", 2, seed=0)
    config = base.config
    layers, heads, neurons = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    spread = torch.linspace(0.6, 1.4, layers)[torch.randperm(layers, generator=gen)][:, None]
    head_scores = torch.rand(layers, heads, generator=gen)
    masks = draw_masks(head_scores, torch.rand(layers, neurons, generator=gen) * spread, 1 / 6, 0.3)
    ticket = build_ticket("minilm", 2, masks, seed=0)
    tokenizer = load_tokenizer("minilm")
    rows = load_split(
        DataConfig(name="sst2", source="local"), "validation", 0, args.batch_size, settings().data_dir
    )
    batch = tokenizer(
        rows.texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"
    )

    with tempfile.TemporaryDirectory() as tmp:
        tdir = save_ticket(
            ticket, masks, "minilm", Path(tmp) / "ticket", tokenizer, labels=["negative", "positive"]
        )
        real, _ = load_ticket(tdir)
        padded = AutoModelForSequenceClassification.from_pretrained(export_hf(tdir, Path(tmp) / "hf")).eval()
        widths = neurons_per_layer(real)
        kept = f"{int(masks.head.sum())}/{masks.head.numel()}"
        print(f"MiniLM ticket: FFN widths {widths} (padded to {max(widths)}), {kept} heads")
        shape = f"{args.batch_size} x {batch['input_ids'].shape[1]} tokens"
        print(f"batch {shape}, {args.threads} threads, {args.repeats} interleaved repeats")
        real_params = sum(p.numel() for p in real.parameters())
        padded_params = sum(p.numel() for p in padded.parameters())
        print(
            f"parameters: real {real_params:,}, padded {padded_params:,} (+{padded_params / real_params - 1:.1%})"
        )

        with torch.no_grad():
            reference = real(**batch).logits
            print(
                f"max |logit diff| hf padded vs ticket: {(padded(**batch).logits - reference).abs().max():.2e}"
            )
            # wall time, and this process's CPU time (less sensitive to other jobs on a shared machine)
            times: dict[tuple[str, str], list[float]] = {}
            for _ in range(2):  # warm-up
                real(**batch), padded(**batch)
            for _ in range(args.repeats):
                for name, model in (("real", real), ("padded", padded)):
                    w0, c0 = time.perf_counter(), time.process_time()
                    model(**batch)
                    times.setdefault((name, "wall"), []).append(1000 * (time.perf_counter() - w0))
                    times.setdefault((name, "cpu"), []).append(1000 * (time.process_time() - c0))
        med = {k: statistics.median(v) for k, v in times.items()}
        for clock in ("wall", "cpu"):
            real_ms, padded_ms = med["real", clock], med["padded", clock]
            print(
                f"inference ms/batch, {clock} time (median): real {real_ms:.1f}, padded {padded_ms:.1f}, "
                f"padded/real {padded_ms / real_ms:.3f}"
            )

        if not args.no_onnx:
            import onnxruntime

            t0 = time.perf_counter()
            onnx_dir = export_onnx(tdir, Path(tmp) / "onnx")
            print(f"onnx export: {time.perf_counter() - t0:.1f} s")
            session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"))
            feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
            logits = torch.from_numpy(session.run(["logits"], feed)[0])
            print(f"max |logit diff| onnxruntime vs torch ticket: {(logits - reference).abs().max():.2e}")


if __name__ == "__main__":
    main()
