"""`er-ray report` (declared in er_ray.cli): imports nothing heavy until it runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from er_ray.config import UserError, settings

DEFAULT_STORE = Path("outputs") / "mlflow.db"


def tracking_uri(arg: str | None) -> str:
    # the same variable MLflow itself reads, so `er-ray report` finds the store `er-ray run` wrote to
    uri = arg or settings().mlflow_uri
    if uri:
        return uri
    if not DEFAULT_STORE.is_file():  # opening a missing sqlite file would create an empty store
        raise UserError(f"no MLflow store at {DEFAULT_STORE}; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def run(args: argparse.Namespace) -> int:
    from er_ray.report import build_report
    from er_ray.report.table import print_table

    # MLflow's per-download progress bars would bury the table
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    result = build_report(args.experiment, args.run, args.out, tracking_uri(args.tracking_uri),
                          log_to_mlflow=not args.no_log)  # fmt: skip
    print_table(result.table)
    for note in result.notes:
        print(f"note: {note}")
    for d in result.claims:
        if d.verdict:
            print(f"claim ({d.dataset}, {d.claim.source}): {d.claim.text}: {d.verdict}")
    print(f"wrote {result.table_md}, {result.claims_md}, their CSVs and {len(result.figures)} figure(s) to {args.out}")
    if result.logged_run_id:
        print(f"logged under artifacts 'report/' of run {result.logged_run_id}")
    return 0
