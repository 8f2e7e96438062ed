"""The files behind Table 1 and the claims, written beside table1.csv so that every interval and verdict can be
recomputed without MLflow: the per-example outcomes (one row per ticket, attack and example, for every ticket
of the report: each row of Table 1 and every setting of its sweep) and the tickets they belong to (one row per
ticket: its identity, params and metrics). `read_scope` turns the two back into the report's view of the runs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from er_ray import tracking
from er_ray.config import UserError
from er_ray.report.store import (
    FFN_RATIO,
    GAMMA,
    HEAD_RATIO,
    SURVIVED,
    TAG_PRIMARY,
    Cell,
    RunView,
    Scope,
    merged_metrics,
)

OUTCOMES_CSV = "outcomes.csv"
TICKETS_CSV = "tickets.csv"
COLUMNS = [
    "run_id",  # the ticket's MLflow run (tickets.csv's row)
    "dataset",
    "method",
    "seed",
    "gamma",
    "head_ratio",
    "ffn_ratio",
    "table_row",  # the ticket is its method's row in Table 1 (else another setting of the sweep)
    "attack",
    "index",  # the example's index in the attacked split: the pairing key across models and seeds
    "label",
    "survived",  # still classified correctly after the attack (Aua counts these)
    "outcome",  # textattack's: successful, failed (survived), skipped (misclassified to begin with)
    "queries",
    "words_changed",
]
PARAM, METRIC = "param.", "metric."  # tickets.csv: a ticket's params and (attack-merged) metrics, by name
_RECORD = {"attack": "recipe", "index": "index", "label": "label", "outcome": "outcome", "queries": "queries"}


def _ordered(cell: Cell) -> list[RunView]:
    return sorted(cell.group, key=lambda t: ([-1 if v is None else v for v in t.setting], t.seed))


def frame(scope: Scope, cells: dict[tuple[str, str], Cell]) -> pd.DataFrame:
    """Every attacked example of every ticket in `cells` whose attack logged its records."""
    rows = []
    for (ds, method), cell in sorted(cells.items()):
        for ticket in _ordered(cell):
            setting = ticket.setting
            for r in scope.records(ticket) or []:
                rows.append(
                    {
                        "run_id": ticket.run_id,
                        "dataset": ds,
                        "method": method,
                        "seed": ticket.seed,
                        "gamma": setting[GAMMA],
                        "head_ratio": setting[HEAD_RATIO],
                        "ffn_ratio": setting[FFN_RATIO],
                        "table_row": setting == cell.setting,
                        "attack": r["recipe"],
                        "index": int(r["index"]),
                        "label": r.get("label"),
                        "survived": r["outcome"] == SURVIVED,
                        "outcome": r["outcome"],
                        "queries": r.get("queries"),
                        "words_changed": r.get("words_changed"),
                    }
                )
    return pd.DataFrame(rows, columns=COLUMNS)


def tickets_frame(scope: Scope, cells: dict[tuple[str, str], Cell]) -> pd.DataFrame:
    """Every ticket in `cells`: run id, seed, start time, primary tag, its params and its merged metrics."""
    rows = []
    for _, cell in sorted(cells.items()):
        for t in _ordered(cell):
            row = {"run_id": t.run_id, "seed": t.seed, "start_time": t.start_time, "primary": t.primary}
            # the seed it counts under (its own param, else its parent's) is part of its identity here
            params = t.params | ({tracking.PARAM_SEED: t.seed} if t.seed else {})
            row |= {PARAM + k: v for k, v in sorted(params.items())}
            row |= {METRIC + k: v for k, v in sorted(merged_metrics(scope, t).items())}
            rows.append(row)
    return pd.DataFrame(rows)


def _read(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = [Path(folder) / name for name in (TICKETS_CSV, OUTCOMES_CSV)]
    for p in paths:
        if not p.is_file():
            raise UserError(f"--from {folder}: no {p.name} (written by `er-ray report` beside table1.csv)")
    tickets = pd.read_csv(paths[0], dtype=str, keep_default_na=False)  # params as MLflow holds them: text
    return tickets, pd.read_csv(paths[1], dtype={"run_id": str, "seed": str, "label": object})


def read_scope(*folders: Path) -> Scope:
    """The tickets and per-example records of the folders' tickets.csv and outcomes.csv as one report scope
    with no MLflow behind it: each ticket its own root, its records those of its rows in outcomes.csv. A
    ticket in several folders (parts that overlap) counts once; which seed run counts where two tickets share
    a method, seed and setting follows the store's rule (the newest)."""
    parts = [_read(f) for f in folders]
    # parts may log different params or metrics: a column one part lacks reads as not logged ("")
    tickets = pd.concat([t for t, _ in parts], ignore_index=True).fillna("").drop_duplicates("run_id")
    examples = pd.concat([e for _, e in parts], ignore_index=True)
    examples = examples.drop_duplicates(["run_id", "attack", "index"])
    runs: dict[str, RunView] = {}
    for row in tickets.to_dict("records"):
        params = {k[len(PARAM) :]: str(v) for k, v in row.items() if k.startswith(PARAM) and v != ""}
        metrics = {k[len(METRIC) :]: float(v) for k, v in row.items() if k.startswith(METRIC) and v != ""}
        tags = {
            tracking.TAG_KIND: "ticket",
            **({TAG_PRIMARY: "1"} if row["primary"] == "True" else {}),
        }
        rid = row["run_id"]
        runs[rid] = RunView(
            rid, "ticket", None, int(row["start_time"]), params, metrics, tags, seed=row["seed"]
        )
    roots = sorted(runs.values(), key=lambda r: (r.start_time, r.run_id), reverse=True)
    scope = Scope(None, ", ".join(map(str, folders)), "", runs, roots)
    by_run = dict(iter(examples.groupby("run_id")))
    for rid in runs:
        rows = by_run.get(rid)
        if rows is None:  # as a ticket whose attack logged no records
            scope.known_records(rid, None)
            continue
        records = rows.rename(columns=_RECORD)[[*_RECORD.values(), "words_changed"]].astype(object)
        scope.known_records(rid, records.where(records.notna(), None).to_dict("records"))
    return scope
