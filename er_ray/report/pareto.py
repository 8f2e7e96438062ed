"""Multi-objective `er-ray tune` studies in the report: every finished trial run of a study (over all of its
invocations in the scope), its Pareto front, a table and a figure of the first two objectives.

The objectives come from the study's parent runs (param `objectives`); each trial run logs `objective_<i>`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from er_ray import tracking
from er_ray.report.store import FINISHED, RunView, Scope


@dataclass
class Front:
    study: str
    objectives: list[dict]  # {name, metric, mode}
    trials: pd.DataFrame  # one row per finished trial: trial number, run id, objectives, params, on_front


def dominated(values: list[list[float]], modes: list[str]) -> list[bool]:
    """For each point: does another point do at least as well on every objective and better on one?"""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    pts = [[s * v for s, v in zip(signs, row, strict=True)] for row in values]
    return [
        any(all(o >= p for o, p in zip(other, point, strict=True)) and other != point for other in pts)
        for point in pts
    ]


def fronts(scope: Scope) -> list[Front]:
    """One Front per multi-objective study among the scope's parents."""
    by_study: dict[str, list[RunView]] = {}
    for root in scope.roots:
        if (
            tracking.PARAM_OBJECTIVES in root.params
            and len(json.loads(root.params[tracking.PARAM_OBJECTIVES])) > 1
        ):
            by_study.setdefault(root.tags.get(tracking.TAG_STUDY, ""), []).append(root)
    out = []
    for study, parents in sorted(by_study.items()):
        newest = max(parents, key=lambda r: r.start_time)
        objectives = json.loads(newest.params[tracking.PARAM_OBJECTIVES])
        names = [o["name"] for o in objectives]
        trials = [
            t
            for p in parents
            for t in scope.of_kind(scope.children(p.run_id), "trial")
            if t.status == FINISHED and all(n in t.metrics for n in names)
        ]
        if not trials:
            continue
        rows = []
        for t in trials:
            row = {"trial": int(t.tags.get(tracking.TAG_OPTUNA_TRIAL, -1)), "run_id": t.run_id}
            row |= {o["metric"]: t.metrics[o["name"]] for o in objectives}
            row |= {k: v for k, v in t.params.items() if "." in k and k.split(".")[0] != "runtime"}
            rows.append(row)
        df = pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)
        metrics = [o["metric"] for o in objectives]
        df["on_front"] = [
            not d for d in dominated(df[metrics].values.tolist(), [o["mode"] for o in objectives])
        ]
        out.append(Front(study, objectives, df))
    return out


def _markdown_rows(df: pd.DataFrame) -> list[str]:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return [
        "| " + " | ".join(df.columns) + " |",
        "|" + "|".join("---:" for _ in df.columns) + "|",
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)),
    ]


def write(front: Front, out_dir: Path) -> list[Path]:
    """`pareto_<study>.csv` (every trial), `.md` (the front) and `.png` (the first two objectives)."""
    stem = "pareto_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", front.study)
    csv, md, png = (out_dir / f"{stem}{ext}" for ext in (".csv", ".md", ".png"))
    front.trials.to_csv(csv, index=False, float_format="%.10g")
    on = front.trials[front.trials["on_front"]]
    goals = ", ".join(f"{o['metric']} ({o['mode']})" for o in front.objectives)
    lines = [
        f"# Pareto front of study {front.study}",
        "",
        f"{len(on)} of {len(front.trials)} finished trials are on the front of {goals}.",
        "",
        *_markdown_rows(on.drop(columns=["on_front", "run_id"])),
        "",
    ]
    md.write_text("\n".join(lines))
    x, y = front.objectives[0], front.objectives[1]
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(front.trials[x["metric"]], front.trials[y["metric"]], color="lightgrey", label="trials")
    on_sorted = on.sort_values(x["metric"])
    ax.plot(on_sorted[x["metric"]], on_sorted[y["metric"]], marker="o", color="tab:red", label="Pareto front")
    for _, r in on.iterrows():
        ax.annotate(
            str(r["trial"]), (r[x["metric"]], r[y["metric"]]), textcoords="offset points", xytext=(4, 4)
        )
    ax.set_xlabel(f"{x['metric']} ({x['mode']})")
    ax.set_ylabel(f"{y['metric']} ({y['mode']})")
    ax.set_title(f"study {front.study}: {len(on)} of {len(front.trials)} trials on the front")
    ax.legend()
    fig.savefig(png, dpi=110)
    return [csv, md, png]
