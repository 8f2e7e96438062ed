"""`er-ray report` (declared in er_ray.cli): imports nothing heavy until it runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from er_ray import layout
from er_ray import tracking as T
from er_ray.config import load_config


@dataclass(frozen=True)
class ReportTarget:
    """Which runs a report covers: exactly one of `experiment`, `run` (parent run ids), `config` (with its
    `overrides`) or `run_dir`; the store is `tracking_uri` or the rule `er-ray run` follows. Or `from_files`:
    report folders (one, or the parts of a comparison run in separate sessions), recomputed without MLflow."""

    experiment: str | None = None
    run: list[str] | None = None
    config: Path | None = None
    overrides: Sequence[str] = ()
    run_dir: Path | None = None
    tracking_uri: str | None = None
    from_files: list[Path] | None = None


def target(args: ReportTarget) -> tuple[str | None, list[str] | None, str]:
    """(experiment, parent run ids, store): named outright, or found from a config or a run folder the way
    `er-ray run` chose them (`layout`)."""
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        uri = T.existing_store(args.tracking_uri or layout.tracking_uri(cfg))
        return layout.experiment_name(cfg), None, uri
    if args.run_dir is not None:
        folder = layout.RunFolder.at(args.run_dir)
        store = layout.store_uri(folder.output_dir, args.tracking_uri)
        return None, [folder.parent_id_file.read_text().strip()], T.existing_store(store)
    return args.experiment, args.run, T.existing_store(layout.store_uri("outputs", args.tracking_uri))


def run(args: ReportTarget, out: Path, log: bool = True) -> int:
    from er_ray.report import build_report, report_from_files
    from er_ray.report.table import print_table

    # MLflow's per-download progress bars would bury the table
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.from_files is not None:
        result = report_from_files(args.from_files, out)
    else:
        experiment, runs, uri = target(args)
        result = build_report(experiment, runs, out, uri, log_to_mlflow=log)
    if result.partial:
        print(result.partial)
    print_table(result.table)
    for note in result.notes:
        print(f"note: {note}")
    for d in result.claims:
        if d.verdict:
            print(f"claim ({d.dataset}, {d.claim.source}): {d.claim.text}: {d.verdict}")
    print(
        f"wrote {result.table_md}, {result.claims_md}, their CSVs, {result.outcomes_csv.name} (per attacked "
        f"example), {result.tickets_csv.name} (per ticket) and {len(result.figures)} figure(s) to {out}"
    )
    for path in result.pareto:
        if path.suffix == ".md":
            print(path.read_text().split("\n\n")[1])  # "k of n finished trials are on the front of ..."
            print(f"wrote {path} and its .csv and .png")
    if result.logged_run_id:
        print(f"logged under artifacts 'report/' of run {result.logged_run_id}")
    return 0
