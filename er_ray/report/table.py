"""Table 1 of the paper from the rows' tickets (one per seed): a DataFrame, Markdown, CSV and a rich table.

Every number is the mean over seeds, with its sample standard deviation and n beside it (columns "<col> std",
"<col> n"); Aua% also carries the 95% Wilson interval over the attacked examples of all seeds ("<col> lo/hi",
out of "<attack> examples"), speedups the 95% interval of a ratio of mean times. Missing metrics are NaN in the
DataFrame and blank in every rendering, never zero; a spread needs two seeds, so one seed leaves it blank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pandas as pd

from er_ray import tracking
from er_ray.config import DatasetName, Method
from er_ray.report import stats
from er_ray.report.store import Cell, seed_order

# the paper's row order: baselines, then EarlyRobust, then the ablations in the config's order
_LEAD = ("finetune", "earlybert", "pgd", "freelb", "earlyrobust")
METHOD_ORDER = _LEAD + tuple(m for m in get_args(Method) if m not in _LEAD)
ROBUST_BASELINES = ("freelb", "pgd")  # adversarial training of the full model
FREELB = "freelb"
DATASET_ORDER = get_args(DatasetName)

METHOD_LABEL = {
    "finetune": "Fine-tune",
    "earlybert": "EarlyBERT",
    "pgd": "PGD",
    "freelb": "FreeLB",
    "earlyrobust": "EarlyRobust",
    "earlyrobust-no-l1": "EarlyRobust w/o L1",
    "earlyrobust-random": "EarlyRobust (random ticket)",
    "earlyrobust-reinit": "EarlyRobust (re-init)",
    "earlyrobust-random-layerwise": "EarlyRobust (random ticket, per-layer sizes)",
    "earlyrobust-no-structure": "EarlyRobust w/o structure",
}
DATASET_LABEL = {"sst2": "SST-2", "imdb": "IMDB", "ag_news": "AG News", "qnli": "QNLI", "qqp": "QQP"}
ATTACK_LABEL = {"textfooler": "TextFooler", "textbugger": "TextBugger", "bertattack": "BERT-Attack"}
ATTACK_SHORT = {"textfooler": "TF", "textbugger": "TB", "bertattack": "BA"}  # where columns are narrow

COL_DATASET = "Dataset"
COL_METHOD = "Method"
COL_SEEDS = "Seeds"
COL_CLEAN = "Clean%"
COL_TIME = "Time (s)"
COL_SPEEDUP_SLOWEST = "Speedup vs slowest robust"
COL_SPEEDUP_FREELB = "Speedup vs FreeLB"
SPEEDUPS = (COL_SPEEDUP_SLOWEST, COL_SPEEDUP_FREELB)
COL_RUN = "run_id"  # in the DataFrame and CSV, for tracing a row back to its runs (";"-separated, by seed)


def aua_col(attack: str) -> str:
    return f"{ATTACK_LABEL.get(attack, attack)} Aua%"


def query_col(attack: str) -> str:
    return f"{ATTACK_LABEL.get(attack, attack)} #Query"


def examples_col(attack: str) -> str:
    return f"{ATTACK_LABEL.get(attack, attack)} examples"


def std_col(col: str) -> str:
    return f"{col} std"


def n_col(col: str) -> str:
    return f"{col} n"


def lo_col(col: str) -> str:
    return f"{col} lo"


def hi_col(col: str) -> str:
    return f"{col} hi"


def shown_columns() -> list[str]:
    """The columns a reader sees (Markdown, terminal); each is one formatted cell."""
    cols = [COL_DATASET, COL_METHOD, COL_SEEDS, COL_CLEAN]
    for a in tracking.ATTACKS:
        cols += [aua_col(a), query_col(a)]
    return cols + [COL_TIME, *SPEEDUPS]


def columns() -> list[str]:
    """The DataFrame's and the CSV's columns: every shown number with its spread, n and interval."""
    cols = [COL_DATASET, COL_METHOD, COL_SEEDS]
    for c in shown_columns()[3:]:
        if c in SPEEDUPS:
            cols += [c, lo_col(c), hi_col(c)]
            continue
        cols += [c, std_col(c), n_col(c)]
        if c.endswith(" Aua%"):
            attack = next(a for a in tracking.ATTACKS if aua_col(a) == c)
            cols += [lo_col(c), hi_col(c), examples_col(attack)]
    return cols + [COL_RUN]


def rank(order: tuple[str, ...], key: str) -> tuple[int, str]:
    return (order.index(key) if key in order else len(order), key)


def _pct(metrics: dict[str, float], name: str) -> float | None:
    v = metrics.get(name)
    return None if v is None else 100.0 * v


def _put(row: dict[str, object], col: str, values: list[float | None]) -> None:
    s = stats.summarize(values)
    row[col], row[std_col(col)], row[n_col(col)] = s.mean, s.std, s.n or math.nan  # blank, not 0


def build_table(
    cells: dict[tuple[str, str], Cell], pooled: dict[tuple[str, str, str], tuple[int, int]]
) -> pd.DataFrame:
    """One row per (dataset, method): mean, std and n over seeds of every number; `pooled[dataset, method,
    attack]` = (examples that survived, examples attacked) over all seeds, for the Aua interval."""
    rows = []
    for dataset, method in sorted(cells, key=lambda k: (rank(DATASET_ORDER, k[0]), rank(METHOD_ORDER, k[1]))):
        cell = cells[dataset, method]
        seeds = list(cell.metrics.values())
        row: dict[str, object] = {COL_DATASET: dataset, COL_METHOD: method, COL_SEEDS: len(seeds)}
        _put(row, COL_CLEAN, [_pct(m, tracking.CLEAN_ACC) for m in seeds])
        for a in tracking.ATTACKS:
            _put(row, aua_col(a), [_pct(m, tracking.aua(a)) for m in seeds])
            k, n = pooled.get((dataset, method, a), (0, 0))
            lo, hi = stats.wilson(k, n)
            row[lo_col(aua_col(a))], row[hi_col(aua_col(a))] = 100 * lo, 100 * hi
            row[examples_col(a)] = n or math.nan
            _put(row, query_col(a), [m.get(tracking.queries(a)) for m in seeds])
        _put(row, COL_TIME, [m.get(tracking.TRAIN_SECONDS) for m in seeds])
        row[COL_RUN] = ";".join(cell.tickets[s].run_id for s in sorted(cell.tickets, key=seed_order))
        rows.append(row)
    df = pd.DataFrame(rows, columns=columns())
    df = df.astype({c: float for c in columns() if c not in (COL_DATASET, COL_METHOD, COL_RUN)})
    # speedup = the baseline's mean time / the method's mean time, both on the same dataset
    for ds, block in df.groupby(COL_DATASET, sort=False):
        times = {m: _times(cells[ds, m]) for m in block[COL_METHOD]}
        robust = [m for m in ROBUST_BASELINES if m in times and times[m]]
        slowest = max(robust, key=lambda m: stats.summarize(times[m]).mean) if robust else None
        for col, base in ((COL_SPEEDUP_SLOWEST, slowest), (COL_SPEEDUP_FREELB, FREELB)):
            for i, m in zip(block.index, block[COL_METHOD], strict=True):
                iv = stats.ratio_of_means(times.get(base, []) if base else [], times[m])
                df.loc[i, [col, lo_col(col), hi_col(col)]] = [iv.estimate, iv.lo, iv.hi]
    return df


def _times(cell: Cell) -> list[float]:
    return [m[tracking.TRAIN_SECONDS] for m in cell.metrics.values() if tracking.TRAIN_SECONDS in m]


def _num(value: float, col: str) -> str:
    return f"{value:.2f}x" if col in SPEEDUPS else f"{value:.1f}"


def _cell(rec: dict[str, object], col: str, seeds: int) -> str:
    """ "mean ± std [lo, hi] (n=k)": the std with two seeds or more, the interval where there is one, n where
    it differs from the row's number of seeds."""
    value = rec[col]
    if not isinstance(value, float) or math.isnan(value):
        return ""
    text = _num(value, col)
    std = rec.get(std_col(col))
    if isinstance(std, float) and not math.isnan(std):
        text += f" ± {_num(std, col).rstrip('x')}"
    lo, hi = rec.get(lo_col(col)), rec.get(hi_col(col))
    if isinstance(lo, float) and isinstance(hi, float) and not (math.isnan(lo) or math.isnan(hi)):
        text += f" [{_num(lo, col).rstrip('x')}, {_num(hi, col).rstrip('x')}]"
    n = rec.get(n_col(col))
    if isinstance(n, float) and not math.isnan(n) and int(n) != seeds:
        text += f" (n={int(n)})"
    return text


def display_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows (no run ids; the dataset only on the first row of its block)."""
    cols = shown_columns()
    rows, last = [], None
    for rec in df.to_dict("records"):
        seeds = int(rec[COL_SEEDS])
        cells = [
            DATASET_LABEL.get(rec[COL_DATASET], rec[COL_DATASET]) if rec[COL_DATASET] != last else "",
            METHOD_LABEL.get(rec[COL_METHOD], rec[COL_METHOD]),
            str(seeds),
        ]
        cells += [_cell(rec, c, seeds) for c in cols[3:]]
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
