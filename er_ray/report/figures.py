"""Figures 2-5 of the paper as PNGs (matplotlib's Agg canvas through `Figure`, no pyplot global state).

Each function takes plain data and a path; deciding what data exists is `build.py`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure


def pairwise_distance(masks: torch.Tensor) -> torch.Tensor:
    """(N, entries) bool masks -> (N, N) fraction of differing entries (convergence.mask_distance for all pairs).

    For 0/1 vectors the Hamming count is |a| + |b| - 2 a.b, so one matrix product serves every pair.
    """
    m = masks.flatten(1).double()
    size = m.sum(1)
    diff = size[:, None] + size[None, :] - 2 * m @ m.T
    return (diff / m.shape[1]).float()


def figure2_heatmap(head: torch.Tensor, ffn: torch.Tensor, title: str, path: Path) -> Path:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    for ax, dist, name in zip(
        fig.subplots(1, 2), (head, ffn), ("attention heads", "FFN neurons"), strict=True
    ):
        im = ax.imshow(dist.numpy(), cmap="viridis", vmin=0, origin="upper")
        ax.set_title(f"{name}")
        ax.set_xlabel("mini-epoch")
        ax.set_ylabel("mini-epoch")
        fig.colorbar(im, ax=ax, shrink=0.85, label="normalized mask distance")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def figure2_curves(
    head: Sequence[tuple[int, float]],
    ffn: Sequence[tuple[int, float]],
    gamma: float | None,
    title: str,
    path: Path,
) -> Path:
    """Fallback without the trajectory: distance to the previous mini-epoch, as logged."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for points, name in ((head, "attention heads"), (ffn, "FFN neurons")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=name)
    if gamma is not None:
        ax.axhline(gamma, color="grey", ls="--", lw=1, label=f"γ = {gamma:g}")
    ax.set_xlabel("mini-epoch")
    ax.set_ylabel("mask distance to the previous mini-epoch")
    ax.legend()
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    return path


Series = dict[str, list[tuple[float, float, float]]]  # line label -> [(x, mean, std over seeds), ...]


def _lines(ax, series: Series, xlabel: str) -> None:
    for label, points in series.items():
        if points:
            xs, ys, errs = zip(*sorted(points), strict=True)
            # a point from one seed has no spread (NaN): no bar rather than a zero-length one
            yerr = [0.0 if math.isnan(e) else e for e in errs]
            ax.errorbar(xs, ys, yerr=yerr if any(yerr) else None, marker="o", capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def figure3(series: Series, title: str, path: Path) -> Path:
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    _lines(ax, series, "early-stopping threshold γ")
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    return path


def figure4(panels: list[tuple[str, Series]], title: str, path: Path) -> Path:
    """One panel per swept ratio: (x label, series)."""
    fig = Figure(figsize=(6 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xlabel, series) in zip(axes, panels, strict=True):
        _lines(ax, series, xlabel)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def figure5(
    kept_heads: list[int], heads: int, kept_neurons: list[int], neurons: int, title: str, path: Path
) -> Path:
    """Per layer, the share of heads and of FFN neurons the ticket prunes."""
    layers = list(range(1, len(kept_heads) + 1))
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, kept, total, name in zip(
        fig.subplots(1, 2),
        (kept_heads, kept_neurons),
        (heads, neurons),
        ("attention heads", "FFN neurons"),
        strict=True,
    ):
        pruned = [100.0 * (total - k) / total for k in kept]
        ax.bar(layers, pruned, color="tab:red" if name.startswith("att") else "tab:blue")
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"pruned {name} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name}: {sum(kept)}/{total * len(kept)} kept")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
