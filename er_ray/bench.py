"""Benchmark: a plain training step, a FreeLB step, a pruned ticket's step and inference, per precision,
interleaved (not a test).

Interleaving (A, B, C, ... for every precision, then again) spreads machine noise evenly over all variants;
medians are reported, with each precision's ratio to the first one listed.
"""

from __future__ import annotations

import statistics
import time

import torch

from er_ray import adversary
from er_ray.config import AdversaryConfig, DataConfig, settings
from er_ray.data import encode, load_split
from er_ray.model import count_parameters, load_backbone, load_tokenizer
from er_ray.precision import Amp, resolve
from er_ray.ticket import draw_masks, prune_model
from er_ray.train import Batches, make_optimizer, pick_device, to_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, opt, batch, adv: AdversaryConfig | None, amp: Amp) -> float:
    """ms of one training step (adv) or one inference forward (adv None)."""
    _sync(batch["input_ids"].device)
    t0 = time.perf_counter()
    if adv is None:
        model.eval()
        with torch.no_grad(), amp.autocast():
            model(**batch)
        model.train()
    else:
        adversary.backward(model, batch, adv, amp)
        amp.step(opt, [], None)  # as before: no clipping in the timed step
        opt.zero_grad(set_to_none=True)
    _sync(batch["input_ids"].device)
    return (time.perf_counter() - t0) * 1000


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
) -> dict[str, dict[str, float]]:
    """Median ms per variant per precision: {precision: {variant: ms}} (precisions as resolved on the device)."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    resolved = list(dict.fromkeys(resolve(p, dev) for p in precisions))
    tok = load_tokenizer(model_name)
    rows = load_split(
        DataConfig(name="sst2", max_length=max_length), "train", 0, batch_size, settings().data_dir
    )
    # fixed-length batch: every variant sees exactly the same tokens
    enc = encode(rows, tok, max_length)
    batch = to_device(next(Batches(enc, tok, batch_size, 0, shuffle=False).epoch(0)), dev)
    full = load_backbone(model_name, 2, 0).to(dev)
    gen = torch.Generator().manual_seed(0)
    n_layers, n_heads, n_ffn = (
        full.config.num_hidden_layers,
        full.config.num_attention_heads,
        full.config.intermediate_size,
    )
    masks = draw_masks(
        torch.rand(n_layers, n_heads, generator=gen),
        torch.rand(n_layers, n_ffn, generator=gen),
        head_ratio,
        ffn_ratio,
    )
    pruned = prune_model(load_backbone(model_name, 2, 0), masks).to(dev)
    variants = {
        "plain": (full, AdversaryConfig(kind="none")),
        f"freelb_k{steps}": (full, AdversaryConfig(kind="freelb", steps=steps)),
        "ticket": (pruned, AdversaryConfig(kind="none")),
        "inference": (full, None),
    }
    runs = [(p, name) for name in variants for p in resolved]
    opts = {run: make_optimizer(variants[run[1]][0], 2e-5, 0.01) for run in runs}
    amps = {p: Amp(p, dev.type) for p in resolved}
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for p, name in runs:  # warm-up (and a first loss scale for fp16)
        m, adv = variants[name]
        m.train()
        _step(m, opts[(p, name)], batch, adv, amps[p])
    for _ in range(repeats):
        for p, name in runs:
            m, adv = variants[name]
            times[(p, name)].append(_step(m, opts[(p, name)], batch, adv, amps[p]))
    med = {p: {name: statistics.median(times[(p, name)]) for name in variants} for p in resolved}
    _print(
        med,
        model_name,
        batch,
        repeats,
        dev,
        steps,
        (head_ratio, ffn_ratio),
        (count_parameters(pruned), count_parameters(full)),
    )
    return med


def _print(
    med: dict[str, dict[str, float]],
    model_name: str,
    batch: dict,
    repeats: int,
    dev: torch.device,
    steps: int,
    ratios: tuple[float, float],
    params: tuple[int, int],
) -> None:
    base, *others = list(med)
    print(
        f"model {model_name} on {dev.type}: batch {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} "
        f"tokens, {torch.get_num_threads()} threads, {repeats} interleaved repeats, medians"
    )
    print(
        f"ticket: heads {ratios[0]:.3g} and neurons {ratios[1]:.3g} pruned, {params[0]:,} vs {params[1]:,} parameters"
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
    freelb = f"freelb_k{steps}"
    for p, m in med.items():
        print(
            f"  {p}: freelb / plain = {m[freelb] / m['plain']:.2f}x, plain / ticket = {m['plain'] / m['ticket']:.2f}x "
            f"(ticket speedup), freelb / ticket = {m[freelb] / m['ticket']:.2f}x"
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
