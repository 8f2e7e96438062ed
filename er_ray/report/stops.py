"""The two stop rules side by side, from the `stop_points.json` rows each search run logs
(`er_ray.search.stop_point_rows`): per search and combo, where each rule draws and where it decides.
"""

from __future__ import annotations

import json
from pathlib import Path

from er_ray import tracking
from er_ray.layout import STOP_POINTS_FILE
from er_ray.report.store import RunView, Scope, download, seed_order
from er_ray.report.table import METHOD_ORDER, rank

RULE_LABEL = {"paper": "paper rule", "authors": "authors' rule"}


Found = list[tuple[RunView, list[dict]]]


def read(scope: Scope, searches: list[RunView], tmp: Path) -> tuple[Found, list[str]]:
    """(search run, its rows) for every search that logged both rules; notes for those that did not."""
    found, notes = [], []
    for search in searches:
        dst = tmp / f"stops-{search.run_id}"
        file = download(scope, search.run_id, STOP_POINTS_FILE, STOP_POINTS_FILE, dst)
        if file is None:
            continue
        try:
            rows = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            notes.append(f"{STOP_POINTS_FILE} of search {search.run_id} unreadable ({type(err).__name__})")
            continue
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "rule" in r for r in rows):
            old = "has one rule only (an older version logged it): no side-by-side stop points"
            notes.append(f"{STOP_POINTS_FILE} of search {search.run_id} {old}")
            continue
        found.append((search, rows))
    return found, notes


def _cell(row: dict | None) -> str:
    if row is None or row.get("draw_mini_epoch") is None:
        return "not reached"
    epochs = f"epoch {row['draw_epoch']:.2f} → {row['decision_epoch']:.2f}"
    text = f"{row['draw_mini_epoch']} → {row['decision_mini_epoch']} ({epochs})"
    return text if row.get("converged") else f"{text}, cap"


def _seed(search: RunView) -> str:
    return search.params.get(tracking.PARAM_SEED, "")


def _order(item: tuple[RunView, list[dict]]) -> tuple:
    search = item[0]
    return rank(METHOD_ORDER, search.method), search.dataset, seed_order(_seed(search))


def to_markdown(found: Found) -> str:
    """One line per (search, combo), in the table's method order then by seed: each rule's draw → decision
    mini-epoch (and epochs); * = configured."""
    rules = list(RULE_LABEL)
    head = ["search", "seed", "γ", "heads pruned", "FFN pruned", *(RULE_LABEL[r] for r in rules)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for search, rows in sorted(found, key=_order):
        by_combo: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            c = r["combo"]
            by_combo.setdefault((c["gamma"], c["head_ratio"], c["ffn_ratio"]), {})[r["rule"]] = r
        name = " ".join(x for x in (search.method, search.dataset) if x) or search.run_id
        seed = _seed(search)
        for (g, h, f), per_rule in by_combo.items():
            mark = {r: " *" if per_rule.get(r, {}).get("configured") else "" for r in rules}
            cells = [_cell(per_rule.get(r)) + mark[r] for r in rules]
            lines.append(f"| {name} | {seed} | {g:g} | {h:.4g} | {f:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
