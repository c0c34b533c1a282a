"""The figures a researcher reads: an accuracy's confidence interval and a paired test between two
system messages, computed exactly the textbook way (no scipy), and the test's result in words.

Wilson's score interval (Wilson 1927) rather than the normal approximation p ± z·√(p(1−p)/n): it stays
inside [0, 1] and keeps close to its nominal coverage for the small n and extreme accuracies of a
40-question set (Newcombe 1998, method 3). McNemar's exact test is the binomial test on the discordant
pairs: under "no difference", each question that one system message got right and the other wrong is
equally likely to go either way.
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion successes / n (n > 0)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n successes the bound is exactly 0 or 1; the formula can miss it by a rounding error.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact p-value of McNemar's test: b questions only the first got right, c only the second.

    2 · P(X ≤ min(b, c)) for X ~ Binomial(b + c, ½), capped at 1; 1 when there is no discordant pair.
    Summed in integers, so it is exact up to the one final division.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must not be negative, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def p_text(p: float) -> str:
    """A p-value as a reader expects it: two significant figures, and "p < 0.001" below that."""
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2g}"


def in_words(p: float, b: int, c: int, first: str, second: str) -> str:
    """What McNemar's test says about two system messages, in words a reader understands.

    b: questions only `first` got right; c: questions only `second` got right.
    """
    if b + c == 0:
        return f"{first} and {second} got the same questions right: no evidence of a difference"
    if b == c:
        ahead = f"each got {b} right that the other got wrong"
    else:
        better, worse, more, fewer = (first, second, b, c) if b > c else (second, first, c, b)
        ahead = f"{better} got {more} right that {worse} got wrong, and {fewer} the other way"
    if p < 0.01:
        strength = "strong evidence of a difference"
    elif p < 0.05:
        strength = "evidence of a difference"
    elif p < 0.1:
        strength = "weak evidence of a difference; more questions would tell"
    else:
        strength = "no evidence of a difference at this sample size"
    return f"{strength} ({p_text(p)}): {ahead}"
