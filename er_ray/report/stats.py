"""The report's statistics: numbers in, numbers out (scipy for the distributions, nothing read from MLflow).

* Over seeds: mean, sample standard deviation (ddof=1; NaN for one seed) and n.
* A proportion over examples (Aua pooled over seeds): the Wilson score interval.
* Two models on the same attacked examples: the 2x2 counts of (survived A, survived B), the exact McNemar test
  (binomial on the discordant pairs) and, for the paired difference, a cluster bootstrap over sentences (a
  sentence's seeds resampled together), never narrower than Newcombe's interval on the pooled pairs.
* Per-seed quantities (clean accuracy, stop point): Student t intervals of a mean or of paired differences.
* Ratios of mean times: the delta method on the log ratio, Welch-Satterthwaite degrees of freedom.
* The verdict rule of docs/results.md ("How verdicts are decided"): `decide` and `combine`.

Every interval is two-sided at LEVEL; NaN bounds mean "not enough data" and decide nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
ALPHA = 1 - LEVEL
NAN = math.nan

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
BELOW_MARGIN = f"{FAILS} (significant, below the margin)"  # "above": real but smaller than the margin
UNINFORMATIVE = "uninformative"  # the attack leaves (almost) nothing standing in either model
Rule = Literal["above", "close", "at_least", "at_most"]


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # NaN with one value: a spread needs two
    n: int


def summarize(values: Iterable[float | None]) -> Summary:
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return Summary(NAN, NAN, 0)
    return Summary(float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else NAN, len(vals))


@dataclass(frozen=True)
class Interval:
    """An estimate with its LEVEL interval; `p` is the matching test's p-value (NaN: no test)."""

    estimate: float
    lo: float
    hi: float
    p: float = NAN
    n: int = 0  # what it rests on: pairs of examples, or seeds
    detail: str = ""

    def scaled(self, factor: float) -> Interval:
        return replace(self, estimate=self.estimate * factor, lo=self.lo * factor, hi=self.hi * factor)

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.lo) or math.isnan(self.hi))


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n; NaN for n = 0."""
    if n <= 0:
        return NAN, NAN
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=LEVEL, method="wilson")
    return float(ci.low), float(ci.high)


# ---------------------------------------------------------------- paired examples


@dataclass(frozen=True)
class PairedCounts:
    """Pairs (one example, two models) by outcome; "a"/"b" = only that model survived the attack."""

    both: int
    only_a: int
    only_b: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @classmethod
    def of(cls, a: Mapping[object, bool], b: Mapping[object, bool]) -> PairedCounts:
        """Count the keys (e.g. (seed, example index)) present in both; the others have no pair."""
        keys = a.keys() & b.keys()
        return cls(
            both=sum(a[k] and b[k] for k in keys),
            only_a=sum(a[k] and not b[k] for k in keys),
            only_b=sum(b[k] and not a[k] for k in keys),
            neither=sum(not a[k] and not b[k] for k in keys),
        )


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar: binomial(only_a | only_a + only_b, 1/2); 1 without discordant pairs."""
    if only_a + only_b == 0:
        return 1.0
    return float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)


BOOTSTRAP_DRAWS, BOOTSTRAP_SEED = 10_000, 0


def newcombe_difference(c: PairedCounts) -> tuple[float, float]:
    """Newcombe's square-and-add interval (1998, method 10) of P(A survives) - P(B survives) on pairs treated
    as independent: the Wilson limits of both margins combined with their estimated correlation."""
    n = c.n
    if n == 0:
        return NAN, NAN
    p1, p2 = (c.both + c.only_a) / n, (c.both + c.only_b) / n
    (l1, u1), (l2, u2) = wilson(c.both + c.only_a, n), wilson(c.both + c.only_b, n)
    margins = (c.both + c.only_a) * (c.only_b + c.neither) * (c.both + c.only_b) * (c.only_a + c.neither)
    cross = c.both * c.neither - c.only_a * c.only_b
    # Newcombe's correction of the correlation: positive association is shrunk by n/2, negative kept
    corr = 0.0 if margins == 0 else (max(cross - n / 2, 0.0) if cross >= 0 else cross) / math.sqrt(margins)
    lo_gap = math.sqrt(max((p1 - l1) ** 2 - 2 * corr * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi_gap = math.sqrt(max((u1 - p1) ** 2 - 2 * corr * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return p1 - p2 - lo_gap, p1 - p2 + hi_gap


def cluster_difference(
    a: Mapping[tuple[object, object], bool], b: Mapping[tuple[object, object], bool]
) -> Interval:
    """P(A survives) - P(B survives) on the pairs both have, keyed (seed, sentence): a paired cluster bootstrap
    that resamples sentences with all their seeds together (whether an attack succeeds depends mostly on the
    sentence, so a sentence's seeds are not independent pairs), BOOTSTRAP_DRAWS draws from a fixed seed,
    percentile interval, widened on each side to Newcombe's where that is wider: a percentile bootstrap cannot
    draw what the sample never shows (no discordant pair gives [0, 0]), and Newcombe's keeps its coverage at
    such counts. p is the exact McNemar test on the pooled pairs (the per-pair view)."""
    keys = sorted(a.keys() & b.keys(), key=repr)
    c = PairedCounts.of(a, b)
    if not keys:
        return Interval(NAN, NAN, NAN, NAN, 0)
    sentences = sorted({k[1] for k in keys}, key=repr)
    where = {s: i for i, s in enumerate(sentences)}
    diff, count = np.zeros(len(sentences)), np.zeros(len(sentences))
    for k in keys:
        diff[where[k[1]]] += int(a[k]) - int(b[k])
        count[where[k[1]]] += 1
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    weights = rng.multinomial(len(sentences), np.full(len(sentences), 1 / len(sentences)), BOOTSTRAP_DRAWS)
    draws = (weights @ diff) / (weights @ count)
    lo, hi = np.quantile(draws, [ALPHA / 2, 1 - ALPHA / 2])
    n_lo, n_hi = newcombe_difference(c)
    detail = f"{c.only_a} vs {c.only_b} discordant of {c.n} pairs, {len(sentences)} sentences"
    return Interval(
        diff.sum() / count.sum(),
        float(min(lo, n_lo)),
        float(max(hi, n_hi)),
        mcnemar_exact(c.only_a, c.only_b),
        c.n,
        detail,
    )


# ---------------------------------------------------------------- per-seed quantities


def mean_interval(values: Sequence[float]) -> Interval:
    """Student t interval of the mean, with the one-sample t-test of mean = 0; NaN bounds for n < 2."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(NAN, NAN, NAN)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, NAN, NAN, NAN, n, "one seed")
    sd = float(x.std(ddof=1))
    if sd == 0:  # identical values: no spread to scale a t statistic with, so no interval and no test
        return Interval(mean, NAN, NAN, NAN, n, f"no spread ({n} seeds)")
    se = sd / math.sqrt(n)
    half = float(sps.t.ppf(1 - ALPHA / 2, n - 1)) * se
    p = float(2 * sps.t.sf(abs(mean) / se, n - 1))
    return Interval(mean, mean - half, mean + half, p, n, f"{n} seeds")


def seed_difference(a: Mapping[str, float], b: Mapping[str, float]) -> Interval:
    """Mean over the seeds both have of a[seed] - b[seed], paired t interval and test."""
    seeds = sorted(a.keys() & b.keys())
    return mean_interval([a[s] - b[s] for s in seeds])


def ratio_of_means(num: Sequence[float], den: Sequence[float]) -> Interval:
    """mean(num) / mean(den) (independent samples): var(log mean) ~ s^2 / (n mean^2) (delta method), the two
    added, t quantile at the Welch-Satterthwaite degrees of freedom; NaN bounds when either side has n < 2."""
    x, y = (np.asarray([v for v in s if not math.isnan(v)], dtype=float) for s in (num, den))
    if len(x) == 0 or len(y) == 0 or x.mean() <= 0 or y.mean() <= 0:
        return Interval(NAN, NAN, NAN)
    ratio = float(x.mean() / y.mean())
    n = min(len(x), len(y))
    if n < 2:
        return Interval(ratio, NAN, NAN, NAN, n)
    va, vb = (float(s.var(ddof=1) / (len(s) * s.mean() ** 2)) for s in (x, y))
    if va + vb == 0:
        return Interval(ratio, ratio, ratio, NAN, n)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    half = float(sps.t.ppf(1 - ALPHA / 2, df)) * math.sqrt(va + vb)
    return Interval(ratio, ratio * math.exp(-half), ratio * math.exp(half), NAN, n)


# ---------------------------------------------------------------- the verdict rule


def decide(rule: Rule, iv: Interval, bound: float) -> str:
    """The verdict of one measured quantity, from its interval alone (plus its test for "above"); exactly one
    outcome per case.

    above     "A is above B by a margin" (d = A - B): does not hold if hi < bound (a gain of `bound` is ruled
              out; when lo > 0 as well the difference is real but below the margin, `BELOW_MARGIN`); else holds
              if lo > 0 and p < ALPHA; else inconclusive.
    close     "A is not below B by more than bound":  holds if lo > -bound; does not hold if hi < -bound.
    at_least  "x >= bound":  holds if lo >= bound; does not hold if hi < bound.
    at_most   "x <= bound":  holds if hi <= bound; does not hold if lo > bound.
    """
    if not iv.defined:
        return INCONCLUSIVE
    lo, hi = iv.lo, iv.hi
    if rule == "above":
        if hi < bound:
            return BELOW_MARGIN if lo > 0 else FAILS
        p_ok = math.isnan(iv.p) or iv.p < ALPHA
        return HOLDS if lo > 0 and p_ok else INCONCLUSIVE
    if rule == "close":
        return HOLDS if lo > -bound else FAILS if hi < -bound else INCONCLUSIVE
    if rule == "at_least":
        return HOLDS if lo >= bound else FAILS if hi < bound else INCONCLUSIVE
    if rule == "at_most":
        return HOLDS if hi <= bound else FAILS if lo > bound else INCONCLUSIVE
    raise ValueError(f"unknown rule {rule!r}")


def at_floor(c: PairedCounts, bound: float, scale: float = 100.0) -> bool:
    """Both models' Aua is surely under `bound` (their upper Wilson bounds, times `scale`): the attack leaves
    almost nothing standing, so no difference of the claim's size can show on it."""
    highs = [wilson(k, c.n)[1] * scale for k in (c.both + c.only_a, c.both + c.only_b)]
    return c.n > 0 and all(h < bound for h in highs)


def combine(verdicts: Iterable[str]) -> str:
    """A claim made for every attack (or setting), decided on its informative ones: holds if it holds for each,
    does not hold if it fails for one; uninformative when every one is."""
    vs = list(verdicts)
    informative = [v for v in vs if v != UNINFORMATIVE]
    if not vs:
        return INCONCLUSIVE
    if not informative:
        return UNINFORMATIVE
    if any(v.startswith(FAILS) for v in informative):
        return FAILS
    return HOLDS if all(v == HOLDS for v in informative) else INCONCLUSIVE
