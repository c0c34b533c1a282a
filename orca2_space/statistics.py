"""The figures a researcher reads: an accuracy's confidence interval and a paired test between two
system messages, computed exactly (no scipy), and the test's result in words."""

from __future__ import annotations


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    raise NotImplementedError


def mcnemar_exact(b: int, c: int) -> float:
    raise NotImplementedError


def in_words(p: float, b: int, c: int, first: str, second: str) -> str:
    raise NotImplementedError
