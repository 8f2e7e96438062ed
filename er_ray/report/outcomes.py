"""The per-example outcomes behind Table 1's Aua and the claims' paired tests: one row per (ticket, attack,
example) for every ticket of the report (each row of Table 1 and every setting of its sweep), written beside
table1.csv so that every interval and verdict can be recomputed without MLflow."""

from __future__ import annotations

import pandas as pd

from er_ray.report.store import FFN_RATIO, GAMMA, HEAD_RATIO, SURVIVED, Cell, Scope

OUTCOMES_CSV = "outcomes.csv"
COLUMNS = [
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


def frame(scope: Scope, cells: dict[tuple[str, str], Cell]) -> pd.DataFrame:
    """Every attacked example of every ticket in `cells` whose attack logged its records."""
    rows = []
    for (ds, method), cell in sorted(cells.items()):
        for ticket in sorted(cell.group, key=lambda t: ([-1 if v is None else v for v in t.setting], t.seed)):
            setting = ticket.setting
            for r in scope.records(ticket) or []:
                rows.append(
                    {
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
