"""Benchmark: a plain training step, a FreeLB step and a pruned ticket's step, interleaved (not a test).

Interleaving (A, B, C, A, B, C, ...) spreads machine noise evenly over the three; medians are reported.
"""

from __future__ import annotations

import statistics
import time

import torch

from er_ray import adversary
from er_ray.config import AdversaryConfig, DataConfig, settings
from er_ray.data import encode, load_split
from er_ray.model import count_parameters, load_backbone, load_tokenizer
from er_ray.ticket import draw_masks, prune_model
from er_ray.train import Batches, make_optimizer


def _step(model, opt, batch, adv: AdversaryConfig) -> float:
    t0 = time.perf_counter()
    adversary.backward(model, batch, adv)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) * 1000


def run_benchmark(
    model_name: str = "minilm", batch_size: int = 32, max_length: int = 64, repeats: int = 5,
    threads: int | None = None, head_ratio: float = 1 / 6, ffn_ratio: float = 0.3, steps: int = 3,
) -> dict[str, float]:  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(model_name)
    rows = load_split(DataConfig(name="sst2", max_length=max_length), "train", 0, batch_size, settings().data_dir)
    # fixed-length batch: every variant sees exactly the same tokens
    enc = encode(rows, tok, max_length)
    batch = next(Batches(enc, tok, batch_size, 0, shuffle=False).epoch(0))
    full = load_backbone(model_name, 2, 0)
    gen = torch.Generator().manual_seed(0)
    n_layers, n_heads, n_ffn = full.config.num_hidden_layers, full.config.num_attention_heads, full.config.intermediate_size
    masks = draw_masks(torch.rand(n_layers, n_heads, generator=gen), torch.rand(n_layers, n_ffn, generator=gen),
                       head_ratio, ffn_ratio)  # fmt: skip
    pruned = prune_model(load_backbone(model_name, 2, 0), masks)
    variants = {
        "plain": (full, AdversaryConfig(kind="none")),
        f"freelb_k{steps}": (full, AdversaryConfig(kind="freelb", steps=steps)),
        "ticket": (pruned, AdversaryConfig(kind="none")),
    }
    opts = {name: make_optimizer(m, 2e-5, 0.01) for name, (m, _) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (m, adv) in variants.items():  # warm-up
        m.train()
        _step(m, opts[name], batch, adv)
    for _ in range(repeats):
        for name, (m, adv) in variants.items():
            times[name].append(_step(m, opts[name], batch, adv))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"model {model_name}: batch {batch_size} x {batch['input_ids'].shape[1]} tokens, "
          f"{torch.get_num_threads()} threads, {repeats} interleaved repeats, medians")  # fmt: skip
    print(f"ticket: heads {head_ratio:.3g} and neurons {ffn_ratio:.3g} pruned, "
          f"{count_parameters(pruned):,} vs {count_parameters(full):,} parameters")  # fmt: skip
    for name, ms in med.items():
        print(f"  {name:>10}: {ms:8.1f} ms/step")
    freelb = med[f"freelb_k{steps}"]
    print(f"  freelb / plain  = {freelb / med['plain']:.2f}x")
    print(f"  plain / ticket  = {med['plain'] / med['ticket']:.2f}x (ticket speedup)")
    print(f"  freelb / ticket = {freelb / med['ticket']:.2f}x")
    return med


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
    stops = stop_points(traj.coefficients(), combos, patience or traj.patience, traj.scope)  # type: ignore[arg-type]
    seconds = {c.gamma: traj.mini_epochs[stops[c].mini_epoch].seconds for c in combos}
    capped = [c.gamma for c in combos if not stops[c].converged]
    single = traj.mini_epochs[traj.stops[own].mini_epoch].seconds
    out = {"sweep_over_single": max(seconds.values()) / single,
           "separate_over_sweep": sum(seconds.values()) / max(seconds.values())}  # fmt: skip
    print("search seconds at each gamma's stop point: " + ", ".join(f"{g:g}: {s:.1f}" for g, s in seconds.items()))
    if capped:
        print(f"  not converged within the recorded trajectory (its last point used): {capped}")
    print(f"  {len(gammas)}-value sweep / single gamma {own.gamma:g} = {out['sweep_over_single']:.2f}x search time")
    print(f"  {len(gammas)} separate searches / one sweep search = {out['separate_over_sweep']:.2f}x")
    return out
