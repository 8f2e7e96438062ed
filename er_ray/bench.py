"""Benchmark: a plain training step, FreeLB and PGD steps, a pruned ticket's step and inference, per
precision, interleaved (not a test); a real model, or a BERT shape with random weights (`--geometry`).

Interleaving (A, B, C, ... for every precision, then again) spreads machine noise evenly over all variants;
medians are reported, with each precision's ratio to the first one listed.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from er_ray import adversary
from er_ray.config import AdversaryConfig, DataConfig, UserError, settings
from er_ray.data import encode, load_split
from er_ray.model import count_parameters, load_backbone, load_tokenizer
from er_ray.precision import Amp, resolve
from er_ray.ticket import draw_masks, prune_model
from er_ray.train import Batches, make_optimizer, pick_device, to_device

# BERT shapes built from their configuration with random weights: the paper's arithmetic per step without
# downloading weights (timing only; the accuracy of such a model means nothing). The vocabulary is
# bert-base-uncased's, which the packaged MiniLM's tokenizer shares, so real SST-2 batches feed them.
GEOMETRIES = {
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "bert-large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96},
}
VOCAB = 30522  # bert-base-uncased


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, opt, batch, adv: AdversaryConfig | None, amp: Amp) -> float:
    """ms of one training step (adv) or one inference forward (adv None)."""
    model.train(adv is not None)  # dropout on in a training step, as training runs it (off for inference)
    _sync(batch["input_ids"].device)
    t0 = time.perf_counter()
    if adv is None:
        with torch.no_grad(), amp.autocast():
            model(**batch)
    else:
        adversary.backward(model, batch, adv, amp)
        amp.step(opt, [], None)  # as before: no clipping in the timed step
        opt.zero_grad(set_to_none=True)
    _sync(batch["input_ids"].device)
    return (time.perf_counter() - t0) * 1000


def geometry_model(geometry: str, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    """A BERT classifier of a named shape (`GEOMETRIES`) with random weights: for timing only."""
    from transformers import BertConfig, BertForSequenceClassification

    if geometry not in GEOMETRIES:
        raise UserError(f"unknown geometry '{geometry}' (known: {', '.join(GEOMETRIES)})")
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(vocab_size=VOCAB, num_labels=num_labels, **GEOMETRIES[geometry])
    )


def _padded(batch: dict, length: int) -> dict:
    """The batch padded (pad id 0, attention 0) to `length` tokens: the fixed-length upper bound."""
    out = {}
    for k, v in batch.items():
        if v.dim() == 2 and v.shape[1] < length:
            v = torch.nn.functional.pad(v, (0, length - v.shape[1]), value=0)
        out[k] = v
    return out


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU's model name as lscpu says it."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_benchmark(
    model_name: str = "minilm",
    batch_size: int = 32,
    max_length: int = 64,
    repeats: int = 5,
    threads: int | None = None,
    head_ratio: float = 1 / 6,
    ffn_ratio: float = 0.3,
    steps: int = 3,
    precisions: tuple[str, ...] = ("fp32",),
    device: str = "auto",
    geometry: str | None = None,
    json_path: Path | None = None,
    tokenizer: str | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Median ms per length row, precision and variant: {row: {precision: {variant: ms}}}.

    Rows: `sst2` (real SST-2 rows padded to the batch's longest, as training pads them) and, with a
    `geometry`, `fixed` (padded to `max_length`: the upper bound). Variants: a plain step, FreeLB and PGD steps
    with `steps` ascent steps, a plain step of a ticket pruned at the ratios, and inference. With `json_path`,
    every figure so far is written there after each round (a run cut short keeps what it measured).
    `tokenizer`: a tokenizer folder (default: the model's; with a geometry, MiniLM's, bert-base-uncased's
    vocabulary)."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    if geometry == "bert-large" and dev.type != "cuda":
        raise UserError("--geometry bert-large needs --device cuda (a step on a CPU takes minutes)")
    resolved = list(dict.fromkeys(resolve(p, dev) for p in precisions))
    tok = load_tokenizer(tokenizer or ("minilm" if geometry else model_name))
    rows = load_split(
        DataConfig(name="sst2", max_length=max_length), "train", 0, batch_size, settings().data_dir
    )
    # one batch per row: every variant sees exactly the same tokens
    batch = next(Batches(encode(rows, tok, max_length), tok, batch_size, 0, shuffle=False).epoch(0))
    batches = {"sst2": to_device(batch, dev)}
    if geometry:
        batches["fixed"] = to_device(_padded(batch, max_length), dev)

    def build() -> torch.nn.Module:
        return geometry_model(geometry) if geometry else load_backbone(model_name, 2, 0)

    full = build().to(dev)
    gen = torch.Generator().manual_seed(0)
    c = full.config
    masks = draw_masks(
        torch.rand(c.num_hidden_layers, c.num_attention_heads, generator=gen),
        torch.rand(c.num_hidden_layers, c.intermediate_size, generator=gen),
        head_ratio,
        ffn_ratio,
    )
    pruned = prune_model(build(), masks).to(dev)
    variants = {
        "plain": (full, AdversaryConfig(kind="none")),
        f"freelb_k{steps}": (full, AdversaryConfig(kind="freelb", steps=steps)),
        f"pgd_k{steps}": (full, AdversaryConfig(kind="pgd", steps=steps)),
        "ticket": (pruned, AdversaryConfig(kind="none")),
        "inference": (full, None),
    }
    # one optimizer per model, not per variant and precision: at BERT-base each holds ~0.9 GB of state
    opts = {id(m): make_optimizer(m, 2e-5, 0.01) for m in (full, pruned)}
    amps = {p: Amp(p, dev.type) for p in resolved}
    runs = [(row, p, name) for row in batches for name in variants for p in resolved]
    times: dict[tuple[str, str, str], list[float]] = {run: [] for run in runs}
    meta = {
        "model": geometry or model_name,
        "weights": "random (timing only)" if geometry else "pre-trained",
        "device": dev.type,
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": int(batch["input_ids"].shape[0]),
        "tokens": {row: int(b["input_ids"].shape[1]) for row, b in batches.items()},
        "ascent_steps": steps,
        "ratios": {"head": head_ratio, "ffn": ffn_ratio},
        "parameters": {"full": count_parameters(full), "ticket": count_parameters(pruned)},
        "precisions": resolved,
    }

    def one(run: tuple[str, str, str]) -> float:
        row, p, name = run
        m, adv = variants[name]
        return _step(m, opts[id(m)], batches[row], adv, amps[p])

    for run in runs:  # warm-up (and a first loss scale for fp16)
        one(run)
    med: dict[str, dict[str, dict[str, float]]] = {}
    for _ in range(repeats):
        for run in runs:
            times[run].append(one(run))
        med = {
            row: {p: {n: statistics.median(times[(row, p, n)]) for n in variants} for p in resolved}
            for row in batches
        }
        if json_path is not None:
            figures = {f"{r}/{p}/{n}": v for (r, p, n), v in times.items()}
            json_path.write_text(json.dumps({**meta, "median_ms": med, "ms": figures}, indent=1))
    for row, by_precision in med.items():
        _print(by_precision, meta, row, repeats, steps)
    return med


def _print(med: dict[str, dict[str, float]], meta: dict, row: str, repeats: int, steps: int) -> None:
    base, *others = list(med)
    tokens = meta["tokens"][row]
    what = "padded to the batch's longest row" if row == "sst2" else "fixed length (the upper bound)"
    print(
        f"model {meta['model']} ({meta['weights']}) on {meta['device']} ({meta['device_name']}): batch "
        f"{meta['batch_size']} x {tokens} tokens, SST-2 {what}, {meta['threads']} threads, {repeats} "
        "interleaved repeats, medians"
    )
    p = meta["parameters"]
    print(
        f"ticket: heads {meta['ratios']['head']:.3g} and neurons {meta['ratios']['ffn']:.3g} pruned, "
        f"{p['ticket']:,} vs {p['full']:,} parameters"
    )
    head = (
        f"  {'ms/step':>10}"
        + "".join(f" {p:>9}" for p in med)
        + "".join(f" {base + '/' + p:>10}" for p in others)
    )
    print(head)
    for name in med[base]:
        cells = "".join(f" {med[p][name]:9.1f}" for p in med)
        speed = "".join(f" {med[base][name] / med[p][name]:9.2f}x" for p in others)
        print(f"  {name:>10}{cells}{speed}")
    freelb, pgd = f"freelb_k{steps}", f"pgd_k{steps}"
    for p, m in med.items():
        print(
            f"  {p}: freelb / plain = {m[freelb] / m['plain']:.2f}x, pgd / plain = {m[pgd] / m['plain']:.2f}x, "
            f"plain / ticket = {m['plain'] / m['ticket']:.2f}x (ticket speedup), "
            f"freelb / ticket = {m[freelb] / m['ticket']:.2f}x"
        )


def sweep_cost(trajectory: str, gammas: list[float], patience: int | None = None) -> dict[str, float]:
    """What a gamma sweep served by one search costs against a single gamma, read off a recorded trajectory.

    The sweep's search runs until its slowest gamma converges; a single-gamma search stops at its own point;
    separate searches would each run to their own point.
    """
    from er_ray.convergence import Combo, stop_points
    from er_ray.search import Trajectory

    traj = Trajectory.load(trajectory)
    own = next(iter(traj.stops))  # the config's own combo leads the grid
    combos = [Combo(g, own.head_ratio, own.ffn_ratio) for g in gammas]
    rule, scope = traj.stop_rule, traj.scope
    stops = stop_points(traj.coefficients(), combos, patience or traj.patience, scope, rule)  # type: ignore[arg-type]
    # a search runs to where its rule decides (under `authors`, patience mini-epochs after the draw)
    seconds = {c.gamma: traj.mini_epochs[stops[c].decision].seconds for c in combos}
    capped = [c.gamma for c in combos if not stops[c].converged]
    single = traj.mini_epochs[traj.stops[own].decision].seconds
    out = {
        "sweep_over_single": max(seconds.values()) / single,
        "separate_over_sweep": sum(seconds.values()) / max(seconds.values()),
    }
    print(
        "search seconds at each gamma's stop point: "
        + ", ".join(f"{g:g}: {s:.1f}" for g, s in seconds.items())
    )
    if capped:
        print(f"  not converged within the recorded trajectory (its last point used): {capped}")
    print(
        f"  {len(gammas)}-value sweep / single gamma {own.gamma:g} = {out['sweep_over_single']:.2f}x search time"
    )
    print(f"  {len(gammas)} separate searches / one sweep search = {out['separate_over_sweep']:.2f}x")
    return out


def quantile_masks(head: torch.Tensor, ffn: torch.Tensor, head_ratio: float, ffn_ratio: float):
    """The authors' drawing (`pruning` in their second_stage.py), for comparison only: keep the coefficients
    strictly above the `ratio` quantile of the *signed* values (numpy's linear interpolation); for heads,
    while a layer keeps none, that layer's largest coefficient is set to +inf and the quantile recomputed.
    Every coefficient tied with the threshold is pruned, so the counts are not exact."""
    import numpy as np

    from er_ray.ticket import Masks

    h, f = head.float().numpy().copy(), ffn.float().numpy()
    thr = np.quantile(h, head_ratio)
    while not (h > thr).any(axis=1).all():
        i = int(np.flatnonzero(~(h > thr).any(axis=1))[0])
        h[i, int(h[i].argmax())] = np.inf
        thr = np.quantile(h, head_ratio)
    return Masks(torch.from_numpy(h > thr), torch.from_numpy(f > np.quantile(f, ffn_ratio)))


def _differ(a, b) -> tuple[int, int]:
    return int((a.head != b.head).sum()), int((a.ffn != b.ffn).sum())


def compare_stop_rules(trajectory: str) -> list[dict]:
    """Both stop rules on a recorded trajectory, per combo: where each draws and decides, how many heads and
    neurons change between the start and the end of the window that made it fire, and how far the
    authors' signed-quantile drawing is from the exact-count |c| drawing."""
    from er_ray.convergence import replay
    from er_ray.search import Trajectory
    from er_ray.ticket import draw_masks

    traj = Trajectory.load(trajectory)
    combos, k, at = list(traj.stops), traj.patience, traj.mini_epochs
    live = replay(traj.coefficients(), combos, k, traj.scope, traj.stop_rule)  # type: ignore[arg-type]
    print(
        f"{len(at)} mini-epochs (up to epoch {at[-1].epoch:.2f}), patience {k}, configured rule "
        f"{traj.stop_rule}; heads / neurons in the masks: {at[0].head.numel()} / {at[0].ffn.numel()}"
    )
    rows = []
    for c in combos:
        masks = [draw_masks(m.head, m.ffn, *c.ratios, traj.scope) for m in at]  # type: ignore[arg-type]
        row: dict = {"combo": c}
        for rule in ("paper", "authors"):
            p = live.fired[rule].get(c)
            row[rule] = p
            if p is not None:  # the window is (decision - patience .. decision) under both rules
                row[f"{rule}_window_differ"] = _differ(masks[p.decision - k], masks[p.decision])
        if row["paper"] is not None and row["authors"] is not None:  # the two rules' tickets
            row["tickets_differ"] = _differ(masks[row["paper"].mini_epoch], masks[row["authors"].mini_epoch])
        quantile = [quantile_masks(m.head, m.ffn, *c.ratios) for m in at]
        diffs = [_differ(q, m) for q, m in zip(quantile, masks, strict=True)]
        extra = [
            (int((~q.head).sum() - (~m.head).sum()), int((~q.ffn).sum() - (~m.ffn).sum()))
            for q, m in zip(quantile, masks, strict=True)
        ]
        row["quantile_differ"], row["quantile_extra_pruned"] = diffs, extra
        rows.append(row)

        def where(p) -> str:
            return (
                "not reached"
                if p is None
                else f"draw {p.mini_epoch} (epoch {at[p.mini_epoch].epoch:.2f}), "
                f"decided {p.decision} (epoch {at[p.decision].epoch:.2f}, {at[p.decision].seconds:.1f} s)"
            )

        print(f"γ {c.gamma:g}, heads {c.head_ratio:.4g}, ffn {c.ffn_ratio:.4g}:")
        for rule in ("paper", "authors"):
            window = row.get(f"{rule}_window_differ")
            tail = (
                ""
                if window is None
                else f"; window start vs end: {window[0]} heads, {window[1]} neurons differ"
            )
            print(f"  {rule:>7}: {where(row[rule])}{tail}")
        if "tickets_differ" in row:
            print(
                f"  the two rules' tickets: {row['tickets_differ'][0]} heads, {row['tickets_differ'][1]} neurons differ"
            )
        worst = max(diffs, key=sum)
        print(
            f"  signed quantile vs |c| exact count: {sum(h for h, _ in diffs)} heads, "
            f"{sum(n for _, n in diffs)} neurons differ over {len(at)} mini-epochs (worst: {worst[0]} heads, "
            f"{worst[1]} neurons; extra units pruned by ties: max {max(e[0] for e in extra)} heads, "
            f"{max(e[1] for e in extra)} neurons)"
        )
    return rows
