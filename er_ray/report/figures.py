"""Figures 2-5 of the paper as PNGs (matplotlib's Agg canvas through `Figure`, no pyplot global state).

Each function takes plain data and a path; deciding what data exists is `build.py`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def figure2_heatmap(
    head: torch.Tensor, ffn: torch.Tensor, stops: Sequence[int], title: str, path: Path
) -> Path:
    """Pairwise distances; `stops`: the mini-epochs (positions) where tickets of this search were drawn."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    for ax, dist, name in zip(
        fig.subplots(1, 2), (head, ffn), ("attention heads", "FFN neurons"), strict=True
    ):
        im = ax.imshow(dist.numpy(), cmap="viridis", vmin=0, origin="upper")
        for i, stop in enumerate(stops):
            label = "ticket drawn" if i == 0 else None
            ax.axvline(stop, color="red", ls="--", lw=1, label=label)
            ax.axhline(stop, color="red", ls="--", lw=1)
        if stops:
            ax.legend(loc="lower left", fontsize=8)
        ax.set_title(f"{name}")
        ax.set_xlabel("mini-epoch")
        ax.set_ylabel("mini-epoch")
        fig.colorbar(im, ax=ax, shrink=0.85, label="normalized mask distance")
    fig.suptitle(title)
    return _save(fig, title, path)


def figure2_curves(
    head: Sequence[tuple[int, float]],
    ffn: Sequence[tuple[int, float]],
    gamma: float | None,
    stops: Sequence[int],
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
    for i, stop in enumerate(stops):
        ax.axvline(stop, color="red", ls=":", lw=1, label="ticket drawn" if i == 0 else None)
    ax.set_xlabel("mini-epoch")
    ax.set_ylabel("mask distance to the previous mini-epoch")
    ax.legend()
    ax.set_title(title)
    return _save(fig, title, path)


@dataclass(frozen=True)
class Point:
    """One point of a line: its mean, the interval drawn around it (already clipped to 0-100%) and each seed's
    own value (drawn as small hollow markers, so that a reader sees the spread the mean hides)."""

    x: float
    mean: float
    low: float
    high: float
    seeds: tuple[float, ...] = ()


Series = dict[str, list[Point]]  # line label -> points
MARKERS = ("o", "s", "^", "D", "v")


def _lines(ax, series: Series, xlabel: str) -> None:
    """Each line nudged sideways by a little of the x range and drawn with its own marker, so lines that meet
    (several attacks at 0%) stay visible; intervals as error bars."""
    xs_all = sorted({p.x for points in series.values() for p in points})
    span = (xs_all[-1] - xs_all[0]) if len(xs_all) > 1 else 1.0
    for i, (label, points) in enumerate(series.items()):
        if not points:
            continue
        shift = (i - (len(series) - 1) / 2) * 0.012 * span
        pts = sorted(points, key=lambda p: p.x)
        xs = [p.x + shift for p in pts]
        ys = [p.mean for p in pts]
        yerr = [[p.mean - p.low for p in pts], [p.high - p.mean for p in pts]]
        has_bars = any(v > 0 for side in yerr for v in side)
        marker = MARKERS[i % len(MARKERS)]
        bars = ax.errorbar(xs, ys, yerr=yerr if has_bars else None, marker=marker, capsize=3, label=label)
        # seeds just right of their mean, where its marker does not hide them
        seeds = [(x + 0.018 * span, v) for x, p in zip(xs, pts, strict=True) for v in p.seeds]
        if len(seeds) > len(pts):  # more than one seed somewhere
            color = bars.lines[0].get_color()
            ax.scatter(*zip(*seeds, strict=True), s=14, marker=marker, facecolors="none", edgecolors=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Figure, title: str, path: Path) -> Path:
    """The PNG, its title also in the file's metadata (what it shows, readable without opening it)."""
    fig.savefig(path, dpi=110, metadata={"Title": title})
    return path


def _points_csv(panels: list[tuple[str, Series]], path: Path) -> None:
    """The plotted numbers beside the figure (`.csv`): panel, line, x, mean, the interval drawn and the seeds'
    own values (`;`-separated, in seed order)."""
    rows = ["panel,line,x,mean,low,high,seeds"]
    for xlabel, series in panels:
        for label, points in series.items():
            rows += [
                f'"{xlabel}","{label}",{p.x:g},{p.mean:.6g},{p.low:.6g},{p.high:.6g},'
                + ";".join(f"{v:.6g}" for v in p.seeds)
                for p in points
            ]
    path.with_suffix(".csv").write_text("\n".join(rows) + "\n")


def figure3(series: Series, title: str, path: Path) -> Path:
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    xlabel = "early-stopping threshold γ"
    _lines(ax, series, xlabel)
    ax.set_title(title)
    _points_csv([(xlabel, series)], path)
    return _save(fig, title, path)


def figure4(panels: list[tuple[str, Series]], title: str, path: Path) -> Path:
    """One panel per swept ratio: (x label, series)."""
    fig = Figure(figsize=(6 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xlabel, series) in zip(axes, panels, strict=True):
        _lines(ax, series, xlabel)
    fig.suptitle(title)
    _points_csv(panels, path)
    return _save(fig, title, path)


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
    return _save(fig, title, path)
