"""`build_report`: Table 1, the claims table and Figures 2-5 from what an experiment logged to MLflow.

Works on whatever subset exists: a missing metric is a blank cell, a figure without its data is skipped, a claim
without its runs is listed as not evaluated, and the reason is listed in `ReportResult.notes` (and under the
Markdown table).
"""

from __future__ import annotations

import json
import math
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from er_ray import tracking
from er_ray.config import UserError
from er_ray.layout import TRAJECTORY_FILE
from er_ray.report import claims, figures, outcomes, pareto, stats, stops, table
from er_ray.report.store import (
    FFN_RATIO,
    GAMMA,
    HEAD_RATIO,
    SETTING_PARAMS,
    TAG_PRIMARY,
    TICKET_ARTIFACT,
    Cell,
    RunView,
    Scope,
    Seeded,
    download,
    merged_metrics,
    open_scope,
    progress,
    seed_order,
    survived,
    table_cells,
)

EARLYROBUST = claims.EARLYROBUST
TABLE_CSV = "table1.csv"
TABLE_MD = "table1.md"
CLAIMS_CSV = "claims.csv"
CLAIMS_MD = "claims.md"
ARTIFACT_DIR = "report"  # where the files go on the logged run
# TicketResult fields that say how times were measured; read when the orchestration logs them as params
_TIMING_PARAMS = ("device", "threads")


@dataclass
class ReportResult:
    table: pd.DataFrame  # one row per (dataset, method); NaN = not logged
    table_csv: Path
    table_md: Path
    claims: list[claims.Decision] = field(default_factory=list)
    claims_csv: Path | None = None
    outcomes_csv: Path | None = None  # every attacked example of every ticket (outcomes.py)
    tickets_csv: Path | None = None  # every ticket: params and metrics (outcomes.py)
    claims_md: Path | None = None
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped, and why
    stop_points: str | None = None  # Markdown: the two stop rules side by side, per search and combo
    source_run_ids: list[str] = field(default_factory=list)  # the parents the table was drawn from
    logged_run_id: str | None = None  # the run the files were logged to
    pareto: list[Path] = field(default_factory=list)  # multi-objective studies: front tables and figures
    partial: str | None = None  # "partial: N of M tickets finished (...)" while a parent is still running


def build_report(
    experiment: str | None,
    run_ids: str | list[str] | None,
    out_dir: Path,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> ReportResult:
    """Read MLflow (never rerun anything) and write Table 1 and the claims (CSV, Markdown) and Figures 2-5 to
    `out_dir`. `run_ids`: one or more parent runs (`--run`), else every finished parent of `experiment`."""
    import mlflow

    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids or [])
    uri = tracking_uri or mlflow.get_tracking_uri()
    scope = open_scope(experiment, run_ids, uri)
    cells = table_cells(scope)
    searches = [s for root in scope.roots for s in scope.of_kind(scope.subtree(root.run_id), "search")]
    studies = pareto.fronts(scope)
    if not cells and not searches and not studies:
        where = f"run(s) {', '.join(run_ids)}" if run_ids else f"experiment '{experiment}'"
        left = (
            f"; {len(scope.skipped)} unfinished parent run(s) left out: pass them with --run"
            if scope.skipped
            else ""
        )
        raise UserError(
            f"nothing to report: no ticket or search runs (tag {tracking.TAG_KIND}) and no "
            f"multi-objective study in {where}{left}"
        )

    return _write(scope, cells, Path(out_dir), experiment, searches, studies, log_to_mlflow)


def report_from_files(folders: Sequence[Path], out_dir: Path) -> ReportResult:
    """Table 1 and the claims again from reports' own tickets.csv and outcomes.csv (`folders`: one report, or
    the parts of one comparison run apart, read as one), without MLflow: what a reader of published results can
    recompute. Figures and stop points need the runs' files and are left out (said in the notes)."""
    scope = outcomes.read_scope(*folders)
    cells = table_cells(scope)
    names = ", ".join(map(str, folders))
    if not cells:
        raise UserError(f"nothing to report: the {outcomes.TICKETS_CSV} of {names} list no ticket")
    result = _write(scope, cells, Path(out_dir), None, [], [], log_to_mlflow=False)
    result.notes.append(f"recomputed from {names} without MLflow: no figures, no stop points")
    return result


def _write(
    scope: Scope,
    cells: dict[tuple[str, str], Cell],
    out_dir: Path,
    experiment: str | None,
    searches: list[RunView],
    studies: list,
    log_to_mlflow: bool,
) -> ReportResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="er-ray-report-") as tmp:
        scope.download_dir = Path(tmp)
        df = table.build_table(cells, _pooled(scope, cells))
        roots = {scope.root_of(t).run_id for c in cells.values() for t in c.tickets.values()}
        sources = sorted(roots, key=lambda r: scope.runs[r].start_time, reverse=True)
        result = ReportResult(df, out_dir / TABLE_CSV, out_dir / TABLE_MD, source_run_ids=sources)
        result.notes += [f"parent run {r.run_id} left out: {r.status}" for r in scope.skipped]
        result.partial = progress(scope)
        result.claims = claims.evaluate(scope, cells)
        result.outcomes_csv = out_dir / outcomes.OUTCOMES_CSV
        outcomes.frame(scope, cells).to_csv(result.outcomes_csv, index=False)
        result.tickets_csv = out_dir / outcomes.TICKETS_CSV
        outcomes.tickets_frame(scope, cells).to_csv(result.tickets_csv, index=False)
        if scope.client is not None:  # figures and stop points read the runs' artifacts
            datasets = {d for d, _ in cells} | {s.dataset for s in searches}
            if len(datasets) > 1:
                datasets.discard("")  # a search without a dataset param serves the named ones
            for ds in sorted(datasets, key=lambda d: table.rank(table.DATASET_ORDER, d)):
                _dataset_figures(scope, ds, cells.get((ds, EARLYROBUST)), out_dir, Path(tmp), result)
            found, notes = stops.read(scope, searches, Path(tmp))
            result.notes += notes
            result.stop_points = stops.to_markdown(found) if found else None
        for front in studies:
            result.pareto += pareto.write(front, out_dir)

    table.write_csv(df, result.table_csv)
    result.table_md.write_text(_markdown(scope, experiment, cells, result))
    result.claims_csv, result.claims_md = out_dir / CLAIMS_CSV, out_dir / CLAIMS_MD
    claims.to_frame(result.claims).to_csv(result.claims_csv, index=False, na_rep="", float_format="%.10g")
    result.claims_md.write_text(_claims_markdown(result))
    if log_to_mlflow:
        _log(scope, result)
    return result


def _pooled(scope: Scope, cells: dict[tuple[str, str], Cell]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(dataset, method, attack) -> (examples that survived, examples attacked), pooled over the row's seeds;
    only where every seed has its per-example records (else the interval would cover other seeds than the mean)."""
    out = {}
    for (ds, method), cell in cells.items():
        if any(scope.records(t) is None for t in cell.tickets.values()):
            continue
        for attack in tracking.ATTACKS:
            outcomes = survived(scope, cell.tickets, attack)
            if outcomes:
                out[ds, method, attack] = (sum(outcomes.values()), len(outcomes))
    return out


# ---------------------------------------------------------------- figures


def _label(ds: str) -> str:
    return table.DATASET_LABEL.get(ds, ds or "unknown dataset")


def _dataset_figures(
    scope: Scope, ds: str, er: Cell | None, out: Path, tmp: Path, result: ReportResult
) -> None:
    stem = ds or "unknown"
    if er is None and _search_for(scope, ds, er) is None:  # one note instead of four
        result.notes.append(f"no figures for {_label(ds)}: no earlyrobust ticket or search run")
        return
    steps = [
        (_figure2, out / f"figure2_mask_distance_{stem}.png"),
        (_figure3, out / f"figure3_gamma_{stem}.png"),
        (_figure4, out / f"figure4_sparsity_{stem}.png"),
        (_figure5, out / f"figure5_sparsity_pattern_{stem}.png"),
    ]
    for make, path in steps:
        why = make(scope, ds, er, path, tmp, result.notes)
        if why is None:
            result.figures.append(path)
        else:
            result.notes.append(f"{path.name} not written: {why}")


def _search_for(scope: Scope, ds: str, er: Cell | None) -> RunView | None:
    """The search behind the EarlyRobust ticket: its ancestor, else one under the same parent."""
    if er is not None:
        for run in scope.ancestors(er.ticket):
            if run.kind == "search":
                return run
    roots = [scope.root_of(er.ticket)] if er is not None else scope.roots
    for root in roots:
        found = [s for s in scope.of_kind(scope.subtree(root.run_id), "search") if s.dataset in (ds, "")]
        if found:
            # the EarlyRobust search first, then one whose method is not logged
            return min(found, key=lambda s: ({EARLYROBUST: 0, "": 1}.get(s.method, 2), s.start_time))
    return None


def _figure2(scope: Scope, ds: str, er: Cell | None, path: Path, tmp: Path, notes: list[str]) -> str | None:
    search = _search_for(scope, ds, er)
    if search is None:
        return "no search run"
    method = table.METHOD_LABEL.get(search.method, search.method or "search")
    seed = search.params.get(tracking.PARAM_SEED)
    stops = _stops(scope, search, er)
    where = ", ".join(filter(None, [_label(ds), method, seed and f"seed {seed}"]))
    drawn = f"; red: where its {len(stops)} ticket(s) were drawn" if stops else ""
    title = f"Figure 2: mask distance between mini-epochs ({where}){drawn}"
    why = _figure2_pairwise(scope, search, er, stops, title, path, tmp)
    if why is None:
        return None
    client = scope.client
    head = [(m.step, m.value) for m in client.get_metric_history(search.run_id, tracking.MASK_DISTANCE_HEADS)]
    ffn = [(m.step, m.value) for m in client.get_metric_history(search.run_id, tracking.MASK_DISTANCE_FFN)]
    if not head and not ffn:
        return f"{why}, and no {tracking.MASK_DISTANCE_HEADS}/{tracking.MASK_DISTANCE_FFN} curves"
    notes.append(f"{path.name}: consecutive distances as logged, not pairwise ({why})")
    figures.figure2_curves(
        sorted(head),
        sorted(ffn),
        search.param_float(tracking.PARAM_GAMMA),
        stops,
        title.replace("between mini-epochs", "to the previous mini-epoch"),
        path,
    )
    return None


def _stops(scope: Scope, search: RunView, er: Cell | None) -> list[int]:
    """The mini-epochs where the tickets of `search` (its method and seed, under its parent run) were drawn:
    one per combo of its sweep."""
    seed, root = search.params.get(tracking.PARAM_SEED), scope.root_of(search).run_id
    found = set()
    for t in er.group if er is not None else []:
        stop = t.metrics.get(tracking.STOP_MINI_EPOCH)
        mine = t.method == search.method and (seed is None or t.seed == seed)
        if stop is not None and mine and scope.root_of(t).run_id == root:
            found.add(int(stop))
    return sorted(found)


def _figure2_pairwise(
    scope: Scope, search: RunView, er: Cell | None, stops: list[int], title: str, path: Path, tmp: Path
) -> str | None:
    """Pairwise heat maps from the trajectory's coefficients, drawn at the search's own ratios."""
    import torch

    from er_ray.search import Trajectory
    from er_ray.ticket import draw_masks

    file = download(scope, search.run_id, TRAJECTORY_FILE, TRAJECTORY_FILE, tmp / search.run_id)
    if file is None:
        return f"no {TRAJECTORY_FILE} artifact"
    ratios = [search.param_float(p) for p in (tracking.PARAM_HEAD_RATIO, tracking.PARAM_FFN_RATIO)]
    if None in ratios and er is not None:
        ratios = [er.ticket.param_float(p) for p in (tracking.PARAM_HEAD_RATIO, tracking.PARAM_FFN_RATIO)]
    if None in ratios:
        return "no head_ratio/ffn_ratio params to draw the masks at"
    try:
        traj = Trajectory.load(file)  # safetensors + JSON: a store's artifact cannot run code here
    except UserError as err:  # a damaged or foreign file (an old pickle is refused): fall back to the curves
        return f"{TRAJECTORY_FILE} unreadable ({err})"
    if len(traj.mini_epochs) < 2:
        return "fewer than 2 mini-epochs in the trajectory"
    masks = [draw_masks(m.head, m.ffn, ratios[0], ratios[1], traj.scope) for m in traj.mini_epochs]
    head = figures.pairwise_distance(torch.stack([m.head for m in masks]))
    ffn = figures.pairwise_distance(torch.stack([m.ffn for m in masks]))
    position = {m.index: i for i, m in enumerate(traj.mini_epochs)}
    figures.figure2_heatmap(head, ffn, [position[s] for s in stops if s in position], title, path)
    return None


def _series(scope: Scope, by_x: dict[float, Seeded], scale: float = 1.0) -> tuple[figures.Series, str]:
    """(label -> points in percent, for the metrics logged at some x; what the bars are). Aua's interval is the
    95% Wilson interval over the attacked examples of all seeds where every seed's records are there; else,
    and for clean accuracy, mean ± std over seeds, clipped to 0-100%. Each point keeps its seeds' values."""
    names = {"Clean%": (tracking.CLEAN_ACC, None)}
    names.update({f"Aua% {table.ATTACK_LABEL.get(a, a)}": (tracking.aua(a), a) for a in tracking.ATTACKS})
    merged = {x: [merged_metrics(scope, t[k]) for k in sorted(t, key=seed_order)] for x, t in by_x.items()}
    series: figures.Series = {}
    bars: set[str] = set()
    for label, (key, attack) in names.items():
        line = []
        for x, runs in merged.items():
            values = tuple(100 * m[key] for m in runs if key in m)
            s = stats.summarize(values)
            if not s.n:
                continue
            records = attack is not None and all(scope.records(t) is not None for t in by_x[x].values())
            outcomes = survived(scope, by_x[x], attack) if records else {}
            if outcomes:
                low, high = stats.wilson(sum(outcomes.values()), len(outcomes))
                low, high = 100 * low, 100 * high
                bars.add("Aua: 95% Wilson interval over the attacked examples")
            else:
                spread = 0.0 if math.isnan(s.std) else s.std
                low, high = max(0.0, s.mean - spread), min(100.0, s.mean + spread)
                bars.add("± std over seeds" if s.n > 1 else "no spread with one seed")
            line.append(figures.Point(x * scale, s.mean, low, high, values))
        if line:
            series[label] = line
    return series, "; ".join(sorted(bars))


def _seeds_caption(by_x: dict[float, Seeded], bars: str) -> str:
    counts = sorted({len(seeded) for seeded in by_x.values()})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    head = f"mean over seeds (hollow: each seed), n = {n}" if counts[-1] > 1 else "one seed"
    return "\n".join(textwrap.wrap(f"{head}; bars: {bars}", 64))  # fits the figure's width


def _figure3(scope: Scope, ds: str, er: Cell | None, path: Path, tmp: Path, notes: list[str]) -> str | None:
    if er is None:
        return "no earlyrobust ticket"
    by_x = er.sweep(GAMMA)
    series, bars = _series(scope, by_x)
    if len(by_x) < 2 or not series:
        return "needs earlyrobust tickets at >= 2 values of gamma (a sweep.gammas list)"
    title = f"Figure 3: accuracy against γ ({_label(ds)}, EarlyRobust)\n{_seeds_caption(by_x, bars)}"
    figures.figure3(series, title, path)
    return None


def _figure4(scope: Scope, ds: str, er: Cell | None, path: Path, tmp: Path, notes: list[str]) -> str | None:
    if er is None:
        return "no earlyrobust ticket"
    panels, captions = [], set()
    for index, xlabel in ((FFN_RATIO, "FFN neurons pruned (%)"), (HEAD_RATIO, "attention heads pruned (%)")):
        by_x = er.sweep(index)
        series, bars = _series(scope, by_x, scale=100)
        if len(by_x) >= 2 and series:
            panels.append((xlabel, series))
            captions.add(_seeds_caption(by_x, bars))
    if not panels:
        return "needs earlyrobust tickets at >= 2 values of ffn_ratio or head_ratio (sweep ratio lists)"
    title = f"Figure 4: accuracy against sparsity ({_label(ds)}, EarlyRobust)\n{'; '.join(sorted(captions))}"
    figures.figure4(panels, title, path)
    return None


def _figure5(scope: Scope, ds: str, er: Cell | None, path: Path, tmp: Path, notes: list[str]) -> str | None:
    if er is None:
        return "no earlyrobust ticket"
    file = download(
        scope, er.ticket.run_id, Path(TICKET_ARTIFACT).name, TICKET_ARTIFACT, tmp / er.ticket.run_id
    )
    if file is None:
        return f"no {TICKET_ARTIFACT} artifact on ticket run {er.ticket.run_id}"
    try:
        info = json.loads(file.read_text())
        heads, neurons = int(info["shape"]["heads"]), int(info["shape"]["neurons"])
        kept_heads = [len(k) for k in info["kept_heads"]]
        kept_neurons = [len(k) for k in info["kept_neurons"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{TICKET_ARTIFACT} unreadable ({type(err).__name__}: {err})"
    figures.figure5(
        kept_heads,
        heads,
        kept_neurons,
        neurons,
        f"Figure 5: sparsity pattern of the EarlyRobust ticket ({_label(ds)}, {_ticket_name(er.ticket)})",
        path,
    )
    return None


def _ticket_name(t: RunView) -> str:
    gamma, head, ffn = (t.param_float(p) for p in SETTING_PARAMS)
    parts = [f"seed {t.seed or t.params.get(tracking.PARAM_SEED, '?')}"]
    parts += [f"{name} {v:g}" for name, v in (("γ", gamma), ("heads", head), ("FFN", ffn)) if v is not None]
    return ", ".join(parts)


# ---------------------------------------------------------------- Markdown and logging


def _markdown(
    scope: Scope, experiment: str | None, cells: dict[tuple[str, str], Cell], result: ReportResult
) -> str:
    tickets = [t for c in cells.values() for t in c.tickets.values()]
    timing = sorted({f"{p}={t.params[p]}" for t in tickets for p in _TIMING_PARAMS if p in t.params})
    lines = [
        "# Table 1",
        "",
        *([f"**{result.partial}**: what has finished so far.", ""] if result.partial else []),
        f"MLflow `{scope.uri}`, experiment {experiment or scope.experiment_id}, "
        f"parent run(s) {', '.join(f'`{r}`' for r in result.source_run_ids) or '(none)'}."
        if scope.client is not None
        else f"Recomputed from `{scope.uri}` ({outcomes.TICKETS_CSV}, {outcomes.OUTCOMES_CSV}) without MLflow.",
        "",
        table.to_markdown(result.table),
        "- Each cell: mean ± sample standard deviation over the row's seeds (Seeds; a cell from fewer seeds says "
        "its n); one seed leaves the spread blank. Blank: not logged.",
        "- Clean% and Aua% in percent; #Query: mean model queries per attacked example. Aua% [lo, hi]: the 95% "
        "Wilson interval of the examples that survived the attack, pooled over the seeds' attacked examples "
        "(one sentence counts once per seed when the seeds share the attack sample).",
        f"- Time: `{tracking.TRAIN_SECONDS}` (search + fine-tuning for ticket methods; compute only, no data I/O)"
        + (f", measured with {', '.join(timing)}." if timing else "."),
        "- Speedup: the baseline's mean time / the method's mean time on the same dataset, [95% interval] by the "
        "delta method on the log ratio over seeds; the slowest robust baseline is the slower of "
        f"{' and '.join(table.METHOD_LABEL[m] for m in table.ROBUST_BASELINES)}.",
        f"- Row of a method: its tickets tagged `{TAG_PRIMARY}=1` (the config's own γ and ratios), one per "
        f"`{tracking.PARAM_SEED}`; a seed run under several parents counts once, from the newest parent.",
        f"- The paper's claims, decided from these runs: `{CLAIMS_MD}`.",
    ]
    lines += [f"- {n}" for n in result.notes]
    if result.stop_points:
        lines += [
            "",
            "## Stop points under both rules",
            "",
            "Mini-epoch where the ticket is drawn → where the rule decides (the search time counts up to the "
            "decision); * = the configured rule, which stopped the search; *not reached*: the other rule did "
            "not fire within the search; *cap*: the configured rule did not fire and the last mini-epoch was used.",
            "",
            result.stop_points.rstrip("\n"),
        ]
    return "\n".join(lines) + "\n"


def _claims_markdown(result: ReportResult) -> str:
    bounds = (
        f"margins: {claims.AUA_MARGIN:g} Aua points, {claims.CLEAN_MARGIN:g} clean-accuracy points; "
        f"thresholds: {claims.PAPER_SPEEDUP:g}× speedup, {claims.EARLY_EPOCH:g} epoch"
    )
    return "\n".join(
        [
            "# The paper's claims",
            "",
            f'Verdicts by the rule in docs/results.md, "How verdicts are decided" ({bounds}). Aua differences are '
            "paired on the same attacked examples, pooled over seeds: a 95% cluster bootstrap over sentences (a "
            "sentence's seeds together), widened to Newcombe's pooled-pair interval where that is wider, and the exact "
            "McNemar test; clean accuracy is paired by seed (t interval); a claim made for every attack is decided on its "
            "informative attacks (both models' Aua under the margin: uninformative, named): it holds only if it "
            "holds for each, and does not hold if it fails for one.",
            "",
            claims.to_markdown(result.claims),
        ]
    )


def _log(scope: Scope, result: ReportResult) -> None:
    """Attach the files to the report's parent run (the given run, else the experiment's newest parent)."""
    if not scope.roots:
        result.notes.append("not logged to MLflow: no parent run")
        return
    run_id = scope.roots[0].run_id
    try:
        files = [
            result.table_csv,
            result.table_md,
            result.claims_csv,
            result.claims_md,
            result.outcomes_csv,
            result.tickets_csv,
            *result.figures,
            *(f.with_suffix(".csv") for f in result.figures if f.with_suffix(".csv").exists()),
            *result.pareto,
        ]
        tracking.log_files(scope.client, run_id, files, ARTIFACT_DIR)
    except Exception as err:  # the files are on disk either way; say why the copy in MLflow is missing
        result.notes.append(f"not logged to MLflow: {type(err).__name__}: {err}")
        return
    result.logged_run_id = run_id
