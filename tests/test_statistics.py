"""The figures a researcher reads are the textbook ones: Wilson's score interval and McNemar's exact test,
checked against published worked examples and against sums worked out here independently."""

from fractions import Fraction
from math import comb, factorial

import pytest

from orca2_space.statistics import in_words, mcnemar_exact, p_text, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # Newcombe RG (1998), "Two-sided confidence intervals for the single proportion: comparison of seven
        # methods", Statistics in Medicine 17:857-872, worked examples (a)-(d), method 3 (score, no continuity
        # correction), given to 4 decimals.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombes_worked_examples(successes, n, low, high):
    interval = wilson_interval(successes, n)
    assert interval == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_wilson_interval_is_where_the_score_test_is_at_its_critical_value():
    # The Wilson bounds are the p at which (p̂ - p)² = z² p(1 - p) / n: the score test's z exactly.
    z = 1.959963984540054
    for successes, n in [(0, 40), (13, 40), (40, 40), (27, 160)]:
        for bound in wilson_interval(successes, n):
            p_hat = successes / n
            assert (p_hat - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / n, abs=1e-12)


def test_wilson_interval_stays_inside_zero_and_one_and_contains_the_estimate():
    for n in (1, 2, 7, 40):
        for successes in range(n + 1):
            low, high = wilson_interval(successes, n)
            assert 0 <= low <= successes / n <= high <= 1
    assert wilson_interval(0, 40)[0] == 0 and wilson_interval(40, 40)[1] == 1


def test_a_wider_confidence_gives_a_wider_interval():
    low95, high95 = wilson_interval(20, 40)
    low99, high99 = wilson_interval(20, 40, confidence=0.99)
    assert low99 < low95 and high95 < high99


@pytest.mark.parametrize(("successes", "n"), [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_refuses_counts_that_are_no_proportion(successes, n):
    with pytest.raises(ValueError):
        wilson_interval(successes, n)


def binomial_two_sided(b: int, c: int) -> Fraction:
    """The exact test worked out from first principles: every outcome k of n fair coin flips whose
    probability is at most the observed one's, summed (the "method of small p-values")."""
    n = b + c
    probability = [Fraction(factorial(n), factorial(k) * factorial(n - k) * 2**n) for k in range(n + 1)]
    return sum((p for p in probability if p <= probability[b]), Fraction(0))


def test_mcnemar_exact_matches_fagerland_lydersen_laakes_example():
    # Fagerland MW, Lydersen S, Laake P (2013), "The McNemar test for binary matched-pairs data: mid-p and
    # asymptotic are better than exact conditional", BMC Medical Research Methodology 13:91, Table 1:
    # airway hyper-responsiveness before and after stem cell transplantation (Bentur et al.), discordant
    # pairs 1 and 7; exact conditional p = 2 · P(X ≤ 1 | n = 8) = 2 · 9/256 = 0.0703.
    assert mcnemar_exact(1, 7) == pytest.approx(0.0703, abs=5e-5)
    assert mcnemar_exact(1, 7) == 18 / 256


@pytest.mark.parametrize(("b", "c"), [(0, 1), (0, 5), (2, 9), (3, 3), (10, 4), (12, 30), (0, 0), (25, 26)])
def test_mcnemar_exact_is_the_two_sided_binomial_test(b, c):
    expected = binomial_two_sided(b, c) if b + c else Fraction(1)
    assert mcnemar_exact(b, c) == float(min(expected, Fraction(1)))
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_mcnemar_exact_sums_exactly_where_floats_would_underflow():
    # 2000 discordant pairs all one way: 2 / 2**2000 is below the smallest float, so 0.0, never an error.
    assert mcnemar_exact(0, 2000) == 0.0
    assert mcnemar_exact(1000, 1001) == 1.0
    tail = sum(comb(600, i) for i in range(251))
    assert mcnemar_exact(250, 350) == float(Fraction(2 * tail, 2**600))


def test_mcnemar_exact_refuses_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_p_values_read_as_a_reader_expects():
    assert p_text(0.4237) == "p = 0.42"
    assert p_text(0.0703125) == "p = 0.07"
    assert p_text(0.0039) == "p = 0.0039"
    assert p_text(1.0) == "p = 1"
    assert p_text(0.0002) == "p < 0.001"


def test_in_words_says_how_strong_the_evidence_is_and_which_way():
    assert in_words(0.42, 3, 5, "Empty", "Cautious") == (
        "no evidence of a difference at this sample size (p = 0.42): "
        "Cautious got 5 right that Empty got wrong, and 3 the other way"
    )
    assert in_words(0.07, 1, 7, "Empty", "Cautious").startswith("weak evidence of a difference")
    assert in_words(0.03, 12, 3, "Empty", "Cautious") == (
        "evidence of a difference (p = 0.03): Empty got 12 right that Cautious got wrong, and 3 the other way"
    )
    assert in_words(0.0001, 20, 1, "Empty", "Cautious").startswith("strong evidence of a difference (p < 0.001)")
    assert in_words(1.0, 4, 4, "A", "B") == (
        "no evidence of a difference at this sample size (p = 1): each got 4 right that the other got wrong"
    )
    assert in_words(1.0, 0, 0, "A", "B") == "A and B got the same questions right: no evidence of a difference"
