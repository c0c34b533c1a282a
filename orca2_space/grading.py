"""How an answer is scored: a rule extracts the answer's final claim, then compares it with the expected one.

An answer in which the rule finds nothing is its own verdict, "no answer found", never silently wrong.

Nothing here imports gradio.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .questions import Question


class Rule(StrEnum):
    CHOICE = "choice"
    NUMBER = "number"
    FINAL = "final-answer"
    EXACT = "exact"
    CONTAINS = "contains"
    REGEX = "regex"


class Verdict(StrEnum):
    RIGHT = "right"
    WRONG = "wrong"
    NO_ANSWER = "no answer found"


@dataclass(frozen=True)
class Grading:
    rule: Rule
    # Rule.REGEX only: the pattern whose last match (its first group, if it has one) is the answer.
    pattern: str | None = None

    def describe(self) -> str:
        """One line, shown with the results."""
        raise NotImplementedError


@dataclass(frozen=True)
class Graded:
    # What the rule took as the answer's claim; None when it found none.
    extracted: str | None
    verdict: Verdict


def grade(grading: Grading, question: Question, answer: str) -> Graded:
    raise NotImplementedError
