"""Table 1 of the paper from the chosen ticket runs: a DataFrame, Markdown, CSV and a rich table.

Missing metrics are NaN in the DataFrame and blank in every rendering, never zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pandas as pd

from er_ray import tracking
from er_ray.config import DatasetName, Method
from er_ray.report.store import Cell

# the paper's row order: baselines, then EarlyRobust, then the ablations in the config's order
_LEAD = ("finetune", "earlybert", "pgd", "freelb", "earlyrobust")
METHOD_ORDER = _LEAD + tuple(m for m in get_args(Method) if m not in _LEAD)
ROBUST_BASELINES = ("freelb", "pgd")  # adversarial training of the full model
FREELB = "freelb"
DATASET_ORDER = get_args(DatasetName)

METHOD_LABEL = {
    "finetune": "Fine-tune", "earlybert": "EarlyBERT", "pgd": "PGD", "freelb": "FreeLB",
    "earlyrobust": "EarlyRobust", "earlyrobust-no-l1": "EarlyRobust w/o L1",
    "earlyrobust-random": "EarlyRobust (random ticket)", "earlyrobust-reinit": "EarlyRobust (re-init)",
    "earlyrobust-random-layerwise": "EarlyRobust (random ticket, per-layer sizes)",
    "earlyrobust-no-structure": "EarlyRobust w/o structure",
}  # fmt: skip
DATASET_LABEL = {"sst2": "SST-2", "imdb": "IMDB", "ag_news": "AG News", "qnli": "QNLI", "qqp": "QQP"}
ATTACK_LABEL = {"textfooler": "TextFooler", "textbugger": "TextBugger", "bertattack": "BERT-Attack"}

COL_DATASET = "Dataset"
COL_METHOD = "Method"
COL_CLEAN = "Clean%"
COL_TIME = "Time (s)"
COL_SPEEDUP_SLOWEST = "Speedup vs slowest robust"
COL_SPEEDUP_FREELB = "Speedup vs FreeLB"
COL_RUN = "run_id"  # in the DataFrame and CSV, for tracing a cell back to its run


def aua_col(attack: str) -> str:
    return f"{ATTACK_LABEL.get(attack, attack)} Aua%"


def query_col(attack: str) -> str:
    return f"{ATTACK_LABEL.get(attack, attack)} #Query"


def columns() -> list[str]:
    cols = [COL_DATASET, COL_METHOD, COL_CLEAN]
    for a in tracking.ATTACKS:
        cols += [aua_col(a), query_col(a)]
    return cols + [COL_TIME, COL_SPEEDUP_SLOWEST, COL_SPEEDUP_FREELB, COL_RUN]


def rank(order: tuple[str, ...], key: str) -> tuple[int, str]:
    return (order.index(key) if key in order else len(order), key)


def _pct(metrics: dict[str, float], name: str) -> float:
    v = metrics.get(name)
    return math.nan if v is None else 100.0 * v


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den) or den <= 0:
        return math.nan
    return num / den


def build_table(cells: dict[tuple[str, str], Cell]) -> pd.DataFrame:
    rows = []
    for dataset, method in sorted(cells, key=lambda k: (rank(DATASET_ORDER, k[0]), rank(METHOD_ORDER, k[1]))):
        m = cells[dataset, method].metrics
        row: dict[str, object] = {
            COL_DATASET: dataset,
            COL_METHOD: method,
            COL_CLEAN: _pct(m, tracking.CLEAN_ACC),
        }
        for a in tracking.ATTACKS:
            row[aua_col(a)] = _pct(m, tracking.aua(a))
            row[query_col(a)] = m.get(tracking.queries(a), math.nan)
        row[COL_TIME] = m.get(tracking.TRAIN_SECONDS, math.nan)
        row[COL_RUN] = cells[dataset, method].ticket.run_id
        rows.append(row)
    df = pd.DataFrame(rows, columns=columns()).astype({c: float for c in columns()[2:-1]})
    # speedup = the baseline's time / the method's time, both on the same dataset
    for _, block in df.groupby(COL_DATASET, sort=False):
        times = dict(zip(block[COL_METHOD], block[COL_TIME], strict=True))
        robust = [t for m, t in times.items() if m in ROBUST_BASELINES and not math.isnan(t)]
        slowest = max(robust) if robust else math.nan
        freelb = times.get(FREELB, math.nan)
        df.loc[block.index, COL_SPEEDUP_SLOWEST] = [_ratio(slowest, t) for t in block[COL_TIME]]
        df.loc[block.index, COL_SPEEDUP_FREELB] = [_ratio(freelb, t) for t in block[COL_TIME]]
    return df


def _fmt(col: str, value: object) -> str:
    if col == COL_DATASET:
        return DATASET_LABEL.get(str(value), str(value))
    if col == COL_METHOD:
        return METHOD_LABEL.get(str(value), str(value))
    if not isinstance(value, float) or math.isnan(value):
        return "" if not isinstance(value, str) else value
    if col in (COL_SPEEDUP_SLOWEST, COL_SPEEDUP_FREELB):
        return f"{value:.2f}x"
    return f"{value:.1f}"


def display_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows (no run ids; the dataset only on the first row of its block)."""
    cols = [c for c in df.columns if c != COL_RUN]
    rows, last = [], None
    for rec in df[cols].to_dict("records"):
        cells = [_fmt(c, rec[c]) for c in cols]
        if rec[COL_DATASET] == last:
            cells[0] = ""
        last = rec[COL_DATASET]
        rows.append(cells)
    return cols, rows


def to_markdown(df: pd.DataFrame) -> str:
    cols, rows = display_rows(df)
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, na_rep="", float_format="%.10g")


def print_table(df: pd.DataFrame, title: str = "Table 1") -> None:
    from rich.console import Console
    from rich.table import Table

    cols, rows = display_rows(df)
    table = Table(title=title)
    for i, c in enumerate(cols):
        # two-line headers keep the twelve columns narrow enough for a terminal
        head = c.replace(" vs slowest robust", "\nvs slowest").replace(" vs ", "\nvs ")
        table.add_column(
            head.replace(" Aua%", "\nAua%").replace(" #Query", "\n#Query"),
            justify="left" if i < 2 else "right",
        )
    for r in rows:
        table.add_row(*r)
    console = Console()
    if not console.is_terminal:  # piped into a log: no terminal width to respect, do not wrap the cells
        console = Console(width=200)
    console.print(table)
