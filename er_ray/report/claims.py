"""The paper's claims, each decided from the runs by the rule of docs/results.md ("How verdicts are decided").

A claim compares two sets of tickets (one per seed) on one measure:
  aua      paired on the same attacked examples, pooled over seeds (pairs keyed by (seed, example index)):
           difference in Aua points, a cluster bootstrap over sentences (a sentence's seeds together, never
           narrower than Newcombe's on the pooled pairs) and the exact McNemar test, per attack;
  clean    clean accuracy, paired by seed: mean difference in points, t interval over seeds;
  speedup  the reference's mean training time / the ticket's, interval of the ratio over seeds;
  stop     the stop point in epochs, t interval of the mean over seeds.
`stats.decide` turns each interval into a verdict and `stats.combine` makes the claim's: a claim made for every
attack holds only if it holds for each. A claim whose runs are missing is listed as not evaluated, with why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from er_ray import tracking
from er_ray.report import stats
from er_ray.report.store import FFN_RATIO, GAMMA, Cell, Scope, Seeded, survived
from er_ray.report.table import ATTACK_LABEL, DATASET_LABEL, METHOD_LABEL, ROBUST_BASELINES

# what "close", "above" and the paper's figures mean here (docs/results.md, "How verdicts are decided")
AUA_MARGIN = (
    5.0  # Aua points: "close to" allows a loss up to this; "above" must not rule out a gain this large
)
CLEAN_MARGIN = 2.0  # clean-accuracy points: the paper's "a little sacrifice in accuracy"
PAPER_SPEEDUP = 7.0  # the low end of the abstract's 7-13x
EARLY_EPOCH = 0.3  # the paper's tickets emerge within 0.15-0.3 epoch
PAPER_GAMMA = 0.1
FFN_RANGE = (0.2, 0.4)  # §5.5's suitable share of pruned neurons
EARLYROBUST = "earlyrobust"

Measure = Literal["aua", "clean", "speedup", "stop"]
Comparison = tuple[str, Seeded, Seeded | None]  # (label, tickets A, tickets B) per seed
Selector = Callable[[dict[tuple[str, str], Cell], str], list[Comparison] | str]  # a str says why not


@dataclass(frozen=True)
class Claim:
    source: str  # where the paper says it
    text: str  # what is tested, in the paper's words where possible
    measure: Measure
    rule: stats.Rule
    bound: float
    select: Selector


@dataclass
class Evidence:
    label: str  # the attack and/or setting compared; "" for a single comparison
    interval: stats.Interval
    verdict: str


@dataclass
class Decision:
    claim: Claim
    dataset: str
    compared: str
    evidence: list[Evidence] = field(default_factory=list)
    why_not: str = ""  # set when the claim could not be evaluated

    @property
    def verdict(self) -> str | None:
        """The claim's verdict, naming the evidence that could not decide anything (uninformative attacks)."""
        if self.why_not:
            return None
        verdict = stats.combine(e.verdict for e in self.evidence)
        idle = [e.label for e in self.evidence if e.verdict == stats.UNINFORMATIVE]
        return (
            f"{verdict} ({stats.UNINFORMATIVE}: {', '.join(idle)})"
            if idle and verdict != stats.UNINFORMATIVE
            else verdict
        )


# ---------------------------------------------------------------- what each claim compares


def _label(method: str) -> str:
    return METHOD_LABEL.get(method, method)


def _methods(a: str, b: str) -> Selector:
    def select(cells: dict[tuple[str, str], Cell], ds: str) -> list[Comparison] | str:
        missing = [m for m in (a, b) if (ds, m) not in cells]
        if missing:
            return f"no {' or '.join(missing)} tickets"
        return [(f"{_label(a)} vs {_label(b)}", cells[ds, a].tickets, cells[ds, b].tickets)]

    return select


def _mean_time(cell: Cell) -> float:
    return stats.summarize(t.metrics.get(tracking.TRAIN_SECONDS) for t in cell.tickets.values()).mean


def _slowest_robust(cells: dict[tuple[str, str], Cell], ds: str) -> list[Comparison] | str:
    robust = [
        cells[ds, m]
        for m in ROBUST_BASELINES
        if (ds, m) in cells and not math.isnan(_mean_time(cells[ds, m]))
    ]
    if (ds, EARLYROBUST) not in cells or not robust:
        return (
            f"needs {EARLYROBUST} and {' or '.join(ROBUST_BASELINES)} tickets with {tracking.TRAIN_SECONDS}"
        )
    slowest = max(robust, key=_mean_time)
    return [
        (f"{_label(slowest.method)} / {_label(EARLYROBUST)}", cells[ds, EARLYROBUST].tickets, slowest.tickets)
    ]


def _gamma(cells: dict[tuple[str, str], Cell], ds: str) -> list[Comparison] | str:
    er = cells.get((ds, EARLYROBUST))
    sweep = er.sweep(GAMMA) if er else {}
    smaller = [g for g in sweep if g < PAPER_GAMMA]
    if PAPER_GAMMA not in sweep or not smaller:
        return f"needs {EARLYROBUST} tickets at γ = {PAPER_GAMMA:g} and a smaller γ (sweep.gammas)"
    g = min(smaller)
    return [(f"γ {PAPER_GAMMA:g} vs γ {g:g}", sweep[PAPER_GAMMA], sweep[g])]


def _ffn_range(cells: dict[tuple[str, str], Cell], ds: str) -> list[Comparison] | str:
    er = cells.get((ds, EARLYROBUST))
    sweep = er.sweep(FFN_RATIO) if er else {}
    row = er.setting[FFN_RATIO] if er else None
    inside = sorted(r for r in sweep if FFN_RANGE[0] <= r <= FFN_RANGE[1] and r != row)
    if row is None or not inside:
        return f"needs {EARLYROBUST} tickets at other FFN ratios in 20-40% (sweep.ffn_ratios)"
    return [(f"FFN {100 * r:g}% vs {100 * row:g}%", sweep[r], er.tickets) for r in inside]


def _stop(cells: dict[tuple[str, str], Cell], ds: str) -> list[Comparison] | str:
    if (ds, EARLYROBUST) not in cells:
        return f"no {EARLYROBUST} tickets"
    return [(_label(EARLYROBUST), cells[ds, EARLYROBUST].tickets, None)]


def _ablation(method: str, what: str, source: str) -> Claim:
    return Claim(
        source,
        f"{what}: EarlyRobust's Aua is above {_label(method)}'s",
        "aua",
        "above",
        AUA_MARGIN,
        _methods(EARLYROBUST, method),
    )


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "§3.2, Fig. 2",
        f"the ticket emerges early: the stop rule fires within {EARLY_EPOCH:g} epoch",
        "stop",
        "at_most",
        EARLY_EPOCH,
        _stop,
    ),
    Claim(
        "§5.1",
        f"EarlyRobust's Aua is close to FreeLB's (not below it by more than {AUA_MARGIN:g} points)",
        "aua",
        "close",
        AUA_MARGIN,
        _methods(EARLYROBUST, "freelb"),
    ),
    Claim(
        "§5.1",
        "EarlyRobust's Aua is above Fine-tune's (Fine-tune has weak defensive capability)",
        "aua",
        "above",
        AUA_MARGIN,
        _methods(EARLYROBUST, "finetune"),
    ),
    Claim(
        "§5.1",
        "adversarial training makes a model more robust: FreeLB's Aua is above Fine-tune's",
        "aua",
        "above",
        AUA_MARGIN,
        _methods("freelb", "finetune"),
    ),
    Claim(
        "§5.1",
        f"a little sacrifice in clean accuracy against FreeLB (at most {CLEAN_MARGIN:g} points)",
        "clean",
        "close",
        CLEAN_MARGIN,
        _methods(EARLYROBUST, "freelb"),
    ),
    Claim(
        "abstract, §5.1",
        f"{PAPER_SPEEDUP:g}×-13× training speedup over the slowest robust baseline",
        "speedup",
        "at_least",
        PAPER_SPEEDUP,
        _slowest_robust,
    ),
    Claim(
        "§5.1",
        "sizable training acceleration: EarlyRobust trains faster than the slowest robust baseline",
        "speedup",
        "at_least",
        1.0,
        _slowest_robust,
    ),
    _ablation("earlybert", "the adversarial loss is important for robustness", "§5.2"),
    _ablation("earlyrobust-no-l1", "removing the regularizer degrades robustness", "§5.2"),
    Claim(
        "§5.2",
        "removing the regularizer degrades clean accuracy: EarlyRobust's Clean% is above w/o L1's",
        "clean",
        "above",
        CLEAN_MARGIN,
        _methods(EARLYROBUST, "earlyrobust-no-l1"),
    ),
    _ablation("earlyrobust-random", "random tickets suffer a large drop in robustness", "§5.2"),
    _ablation("earlyrobust-reinit", "the pre-trained initialization is fundamental", "§5.4"),
    _ablation("earlyrobust-no-structure", "the ticket's structure is fundamental", "§5.4"),
    Claim(
        "§5.3",
        f"robustness converges near γ = {PAPER_GAMMA:g}: a smaller γ gains at most {AUA_MARGIN:g} Aua points",
        "aua",
        "close",
        AUA_MARGIN,
        _gamma,
    ),
    Claim(
        "§5.5",
        f"20-40% of FFN neurons is a suitable range: at no ratio in it does Aua fall more than {AUA_MARGIN:g} "
        "points below the row's ratio",
        "aua",
        "close",
        AUA_MARGIN,
        _ffn_range,
    ),
)


# ---------------------------------------------------------------- measuring


def _values(tickets: Seeded, metric: str, scale: float = 1.0) -> dict[str, float]:
    return {s: scale * t.metrics[metric] for s, t in tickets.items() if metric in t.metrics}


def _measure(
    scope: Scope, claim: Claim, a: Seeded, b: Seeded | None
) -> list[tuple[str, stats.Interval, str]]:
    """(what, interval, verdict) per attack, or one for a seed-level measure."""
    measure = claim.measure
    if measure == "aua":
        out = []
        for attack in tracking.ATTACKS:
            sa, sb = survived(scope, a, attack), survived(scope, b or {}, attack)
            counts = stats.PairedCounts.of(sa, sb)
            if counts.n:
                iv = stats.cluster_difference(sa, sb).scaled(100)
                floor = stats.at_floor(counts, claim.bound)
                verdict = stats.UNINFORMATIVE if floor else stats.decide(claim.rule, iv, claim.bound)
                out.append((ATTACK_LABEL.get(attack, attack), iv, verdict))
        return out
    if measure == "clean":
        iv = stats.seed_difference(
            _values(a, tracking.CLEAN_ACC, 100), _values(b or {}, tracking.CLEAN_ACC, 100)
        )
    elif measure == "speedup":
        times = [list(_values(t or {}, tracking.TRAIN_SECONDS).values()) for t in (b, a)]
        iv = stats.ratio_of_means(*times)
    else:
        iv = stats.mean_interval(list(_values(a, tracking.STOP_EPOCH).values()))
    return [] if math.isnan(iv.estimate) else [("", iv, stats.decide(claim.rule, iv, claim.bound))]


_MISSING = {
    "aua": "no paired per-example attack records (attack/examples.jsonl) on the same examples",
    "clean": f"no {tracking.CLEAN_ACC} on common seeds",
    "speedup": f"no {tracking.TRAIN_SECONDS}",
    "stop": f"no {tracking.STOP_EPOCH}",
}


def evaluate(scope: Scope, cells: dict[tuple[str, str], Cell]) -> list[Decision]:
    """Every claim on every dataset that has tickets."""
    out = []
    for ds in sorted({d for d, _ in cells}):
        for claim in CLAIMS:
            selected = claim.select(cells, ds)
            if isinstance(selected, str):
                out.append(Decision(claim, ds, "", why_not=selected))
                continue
            decision = Decision(claim, ds, "; ".join(label for label, _, _ in selected))
            for label, a, b in selected:
                for what, iv, verdict in _measure(scope, claim, a, b):
                    name = ": ".join(x for x in (label if len(selected) > 1 else "", what) if x)
                    decision.evidence.append(Evidence(name, iv, verdict))
            if not decision.evidence:
                decision.why_not = _MISSING[claim.measure]
            out.append(decision)
    return out


# ---------------------------------------------------------------- rendering


def _fmt(measure: Measure, iv: stats.Interval) -> str:
    if measure == "speedup":
        body = f"{iv.estimate:.2f}×"
        bounds = f" [{iv.lo:.2f}, {iv.hi:.2f}]" if iv.defined else ""
        return f"{body}{bounds} ({iv.n} seed{'s' * (iv.n != 1)} a side)"
    if measure == "stop":
        bounds = f" [{iv.lo:.2f}, {iv.hi:.2f}]" if iv.defined else ""
        return f"{iv.estimate:.2f}{bounds} epoch ({iv.detail})"
    bounds = f" [{iv.lo:+.1f}, {iv.hi:+.1f}]" if iv.defined else ""
    test = "McNemar" if measure == "aua" else "paired t"
    p = f", {test} p = {iv.p:.3g}" if not math.isnan(iv.p) else ""
    return f"{iv.estimate:+.1f}{bounds} points{p} ({iv.detail})"


def to_frame(decisions: list[Decision]) -> pd.DataFrame:
    """One row per piece of evidence (or per claim not evaluated), for the CSV."""
    rows = []
    for d in decisions:
        base = {
            "dataset": d.dataset,
            "source": d.claim.source,
            "claim": d.claim.text,
            "measure": d.claim.measure,
            "rule": d.claim.rule,
            "bound": d.claim.bound,
            "compared": d.compared,
            "claim_verdict": d.verdict or "not evaluated",
        }
        for e in d.evidence or [None]:
            iv = e.interval if e else stats.Interval(math.nan, math.nan, math.nan)
            rows.append(
                {
                    **base,
                    "evidence": e.label if e else d.why_not,
                    "estimate": iv.estimate,
                    "lo": iv.lo,
                    "hi": iv.hi,
                    "p": iv.p,
                    "n": iv.n,
                    "verdict": e.verdict if e else "",
                }
            )
    return pd.DataFrame(rows)


def to_markdown(decisions: list[Decision]) -> str:
    lines = [
        "| dataset | claim (paper) | compared | evidence: estimate [95% interval] | verdict |",
        "|---|---|---|---|---|",
    ]
    skipped = []
    for d in decisions:
        if d.why_not:
            skipped.append(
                f"- {DATASET_LABEL.get(d.dataset, d.dataset)}, {d.claim.source} {d.claim.text}: "
                f"not evaluated, {d.why_not}"
            )
            continue
        evidence = "<br>".join(
            f"{e.label + ': ' if e.label else ''}{_fmt(d.claim.measure, e.interval)} → {e.verdict}"
            for e in d.evidence
        )
        lines.append(
            f"| {DATASET_LABEL.get(d.dataset, d.dataset)} | {d.claim.text} ({d.claim.source}) | "
            f"{d.compared} | {evidence} | **{d.verdict}** |"
        )
    return "\n".join(lines + ([""] + skipped if skipped else [])) + "\n"
