"""The report's statistics against values computed by hand or published: Wilson, McNemar, Newcombe's paired
interval, t intervals over seeds, the ratio of mean times, and every branch of the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from er_ray.report import stats
from er_ray.report.stats import (
    BELOW_MARGIN,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    UNINFORMATIVE,
    Interval,
    PairedCounts,
)


def test_summary_is_mean_sample_std_and_n():
    s = stats.summarize([80.0, 82.0, 84.0, None, math.nan])
    assert (s.mean, s.std, s.n) == (pytest.approx(82.0), pytest.approx(2.0), 3)  # sqrt((4 + 0 + 4) / 2)
    one = stats.summarize([90.5])
    assert one.mean == 90.5 and math.isnan(one.std) and one.n == 1
    assert stats.summarize([]).n == 0


def test_wilson_interval_matches_the_hand_computed_score_interval():
    # 18/100, z = 1.959964: centre (0.18 + z²/200) / (1 + z²/100) = 0.191867,
    # half-width z / (1 + z²/100) * sqrt(0.18 * 0.82 / 100 + z² / 40000) = 0.074836
    lo, hi = stats.wilson(18, 100)
    assert (lo, hi) == (pytest.approx(0.117002, abs=1e-6), pytest.approx(0.266674, abs=1e-6))
    assert stats.wilson(0, 20)[0] == pytest.approx(0.0, abs=1e-12) and stats.wilson(0, 20)[1] > 0.1
    assert all(math.isnan(v) for v in stats.wilson(0, 0))


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs():
    assert stats.mcnemar_exact(4, 0) == pytest.approx(2 * 0.5**4)  # 0.125
    assert stats.mcnemar_exact(1, 7) == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703125
    assert stats.mcnemar_exact(7, 1) == stats.mcnemar_exact(1, 7)
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_paired_counts_pair_on_shared_keys_only():
    a = {("1", 0): True, ("1", 1): True, ("1", 2): False, ("2", 0): False, ("2", 9): True}
    b = {("1", 0): True, ("1", 1): False, ("1", 2): True, ("2", 0): False, ("3", 0): True}
    c = PairedCounts.of(a, b)
    assert (c.both, c.only_a, c.only_b, c.neither, c.n) == (1, 1, 1, 1, 4)


def _pairs(sentences: int, seeds: int, diff_of, seed: int = 1) -> tuple[dict, dict]:
    """Survival of A and B on (seed, sentence) pairs; `diff_of(rng, sentence, seed)` gives (a, b)."""
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for s in range(sentences):
        for k in range(seeds):
            a[(k, s)], b[(k, s)] = diff_of(rng, s, k)
    return a, b


def _unclustered(a: dict, b: dict) -> Interval:
    """The same bootstrap with every pair its own cluster (pairs treated as independent)."""
    return stats.cluster_difference({(k, k): v for k, v in a.items()}, {(k, k): v for k, v in b.items()})


def test_clustering_widens_the_interval_when_a_sentences_seeds_agree():
    # whether A alone survives is a property of the sentence, the same under all three seeds
    sentence_kind = np.random.default_rng(7).choice(3, size=100, p=[0.8, 0.15, 0.05])
    a, b = _pairs(100, 3, lambda rng, s, k: (sentence_kind[s] == 1, sentence_kind[s] == 2))
    clustered, naive = stats.cluster_difference(a, b), _unclustered(a, b)
    assert clustered.estimate == pytest.approx(naive.estimate)
    assert (clustered.hi - clustered.lo) > 1.5 * (naive.hi - naive.lo)  # about sqrt(3) wider
    assert clustered.detail.endswith("of 300 pairs, 100 sentences")


def test_clustering_changes_nothing_when_seeds_are_independent():
    a, b = _pairs(100, 3, lambda rng, s, k: (rng.random() < 0.15, rng.random() < 0.05))
    clustered, naive = stats.cluster_difference(a, b), _unclustered(a, b)
    assert 0.8 < (clustered.hi - clustered.lo) / (naive.hi - naive.lo) < 1.25
    assert clustered == stats.cluster_difference(a, b)  # a fixed seed: the same store gives the same page


def test_newcombe_paired_interval_matches_the_published_example():
    # Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8: Cavo et al. (2012),
    # table [[59, 6], [16, 80]]: Newcombe square-and-add -0.0621 (95% CI -0.1186 to -0.0046)
    lo, hi = stats.newcombe_difference(PairedCounts(both=59, only_a=6, only_b=16, neither=80))
    assert (lo, hi) == (pytest.approx(-0.1186, abs=5e-5), pytest.approx(-0.0046, abs=5e-5))


def test_no_discordant_pair_is_not_a_zero_width_interval():
    # 6 of 300 pairs survive under both models, none under one only: the bootstrap alone would say [0, 0]
    a, b = _pairs(100, 3, lambda rng, s, k: (s < 2, s < 2))
    iv = stats.cluster_difference(a, b)
    lo, hi = stats.newcombe_difference(PairedCounts(both=6, only_a=0, only_b=0, neither=294))
    assert iv.estimate == 0 and (iv.lo, iv.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert -0.02 < iv.lo < -0.005 and 0.005 < iv.hi < 0.02 and iv.p == 1


def test_the_clustered_interval_stands_where_it_is_wider_than_the_pooled_pairs_one():
    sentence_kind = np.random.default_rng(3).choice(3, size=100, p=[0.9, 0.07, 0.03])
    a, b = _pairs(100, 3, lambda rng, s, k: (sentence_kind[s] == 1, sentence_kind[s] == 2))
    iv, pooled = stats.cluster_difference(a, b), stats.newcombe_difference(PairedCounts.of(a, b))
    assert iv.lo <= pooled[0] and iv.hi >= pooled[1] and (iv.lo, iv.hi) != pooled  # here clustering is wider


def test_t_intervals_over_seeds():
    # mean 0.25, sd 0.05, se 0.05/sqrt(3), t(0.975, 2) = 4.302653
    iv = stats.mean_interval([0.2, 0.25, 0.3])
    assert (iv.lo, iv.hi) == (
        pytest.approx(0.25 - 0.124207, abs=1e-6),
        pytest.approx(0.25 + 0.124207, abs=1e-6),
    )
    # paired by seed: only the seeds both sides have
    d = stats.seed_difference({"1": 79.0, "2": 77.0, "3": 81.0, "4": 50.0}, {"1": 80.0, "2": 80.0, "3": 80.0})
    assert (
        d.estimate == pytest.approx(-1.0)
        and d.n == 3
        and d.hi - d.lo == pytest.approx(2 * 4.302653 * 2 / 3**0.5)
    )
    assert not stats.mean_interval([0.3]).defined


def test_ratio_of_means_uses_the_delta_method_on_the_log():
    # 600/110; var(log) = 60²/(3·600²) + 10²/(3·110²) = 0.0033333 + 0.0027548; Welch df = 3.9647;
    # t(0.975, 3.9647) = 2.7846; exp(±2.7846 · 0.078025) = exp(±0.21727)
    iv = stats.ratio_of_means([600.0, 660.0, 540.0], [100.0, 120.0, 110.0])
    assert iv.estimate == pytest.approx(600 / 110)
    assert iv.lo == pytest.approx(600 / 110 * math.exp(-0.21727), rel=1e-3)
    assert iv.hi == pytest.approx(600 / 110 * math.exp(0.21727), rel=1e-3)
    single = stats.ratio_of_means([600.0], [100.0, 120.0])
    assert single.estimate == pytest.approx(600 / 110) and not single.defined


def _iv(lo: float, hi: float, p: float = math.nan) -> Interval:
    return Interval((lo + hi) / 2, lo, hi, p)


@pytest.mark.parametrize(
    ("rule", "interval", "bound", "verdict"),
    [
        ("above", _iv(1.0, 9.0, 0.01), 5.0, HOLDS),
        ("above", _iv(1.0, 9.0, 0.07), 5.0, INCONCLUSIVE),  # the interval and the exact test disagree
        ("above", _iv(-3.0, 4.0, 0.6), 5.0, FAILS),  # a gain of 5 points is ruled out
        ("above", _iv(-3.0, 8.0, 0.4), 5.0, INCONCLUSIVE),
        # real but under the margin: the published w/o-L1 clean row, +0.8 [+0.5, +1.1] against 2 points
        ("above", _iv(0.5, 1.1, 0.01), 2.0, BELOW_MARGIN),
        ("above", _iv(0.5, 2.0, 0.01), 2.0, HOLDS),  # a gain of the margin is not ruled out
        ("close", _iv(-4.0, 2.0), 5.0, HOLDS),
        ("close", _iv(-12.0, -6.0), 5.0, FAILS),
        ("close", _iv(-8.0, 1.0), 5.0, INCONCLUSIVE),
        ("at_least", _iv(7.5, 9.0), 7.0, HOLDS),
        ("at_least", _iv(4.4, 6.8), 7.0, FAILS),
        ("at_least", _iv(6.0, 8.0), 7.0, INCONCLUSIVE),
        ("at_most", _iv(0.1, 0.25), 0.3, HOLDS),
        ("at_most", _iv(0.35, 0.5), 0.3, FAILS),
        ("at_most", _iv(0.2, 0.4), 0.3, INCONCLUSIVE),
        ("close", Interval(-1.0, math.nan, math.nan), 5.0, INCONCLUSIVE),  # one seed: nothing is decided
    ],
)
def test_verdict_rule(rule, interval, bound, verdict):
    assert stats.decide(rule, interval, bound) == verdict


def test_a_claim_over_attacks_needs_every_attack():
    assert stats.combine([HOLDS, HOLDS]) == HOLDS
    assert stats.combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert stats.combine([HOLDS, INCONCLUSIVE, FAILS]) == FAILS
    assert stats.combine([HOLDS, BELOW_MARGIN]) == FAILS


def test_a_claim_over_attacks_is_decided_on_its_informative_ones():
    assert stats.combine([HOLDS, UNINFORMATIVE, UNINFORMATIVE]) == HOLDS
    assert stats.combine([FAILS, UNINFORMATIVE]) == FAILS
    assert stats.combine([UNINFORMATIVE, UNINFORMATIVE]) == UNINFORMATIVE
    assert stats.combine([]) == INCONCLUSIVE


@pytest.mark.parametrize(
    ("counts", "floor"),
    [
        (PairedCounts(0, 1, 2, 297), True),  # 1 of 300 vs 2 of 300 survive: both surely under 5 points
        (PairedCounts(0, 0, 0, 30), False),  # 0 of 30: the upper bound (11.4%) allows 5 points
        (PairedCounts(5, 10, 0, 285), False),  # A keeps 5%: a 5-point difference could show
        (PairedCounts(0, 0, 0, 0), False),  # no pairs: nothing to say
    ],
)
def test_an_attack_is_uninformative_when_both_models_are_surely_under_the_margin(counts, floor):
    assert stats.at_floor(counts, 5.0) is floor


def test_identical_seed_values_are_no_spread_not_a_zero_p():
    iv = stats.mean_interval([0.3, 0.3, 0.3])
    assert iv.estimate == pytest.approx(0.3) and not iv.defined and math.isnan(iv.p)
    assert iv.detail == "no spread (3 seeds)" and stats.decide("at_most", iv, 0.35) == INCONCLUSIVE


def test_a_claims_verdict_names_the_attacks_that_could_not_decide_it():
    from er_ray.report.claims import CLAIMS, Decision, Evidence

    iv = _iv(-1.0, 2.0)
    close = next(c for c in CLAIMS if c.rule == "close" and c.measure == "aua")
    d = Decision(close, "sst2", "A vs B")
    d.evidence = [Evidence("TextFooler", iv, UNINFORMATIVE), Evidence("TextBugger", iv, HOLDS)]
    assert d.verdict == "holds (uninformative: TextFooler)"
    d.evidence = [Evidence("TextFooler", iv, UNINFORMATIVE)]
    assert d.verdict == UNINFORMATIVE
