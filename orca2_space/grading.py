"""How an answer is scored: a rule finds the answer's claim, then compares it with the expected answer.

An answer in which the rule finds no claim, or finds several that disagree, gets its own verdict, "no
answer found": never silently "wrong", and never a guess.

The rules:
- choice: the option the answer settles on, as a letter ("B", "(B)", "B)", "Answer: B") or as the
  option's text. Where the answer has a final-answer line ("Final answer: …", "The answer is …"), that
  line decides; otherwise its last line if that names one option, or the one letter it names in
  parentheses; an answer that discusses several options without settling is "no answer found".
- number: the last number in the answer, normalised: "1,000", "$1000.00", "1000." and "1000" are all
  1000; a sign, decimals and a fraction "3/4" (= 0.75) are read; compared exactly (fractions, no floats).
  The expected answer's last number is the one expected, so "… #### 72" (GSM8K's form) expects 72.
- final-answer: what follows the last "Final answer", "… answer is" or "Answer:", on its line, compared
  as a choice (the question has options, or expects a letter), a number (it expects one) or text
  (ignoring case, whitespace and surrounding Markdown; "Yes, because …" counts as "Yes").
- exact: the whole answer equals the expected one, ignoring case and whitespace.
- contains: the expected answer appears in the answer as whole words, ignoring case and whitespace.
- regex: a pattern the visitor writes; its last match (its first group, if it has one) is the claim,
  compared as for final-answer. Python's `re` has no time limit and a pattern like (a+)+$ takes
  exponential time, so patterns run in the `regex` module with a timeout per answer; an answer the
  pattern can't finish in time is "no answer found". Every other rule is a fixed, linear-time pattern.

Nothing here imports gradio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import TYPE_CHECKING

import regex

from .settings import InvalidRequest

if TYPE_CHECKING:
    from .questions import Question

# A visitor's pattern: long enough for any sensible extraction, short enough to read in the results.
MAX_PATTERN_CHARS = 500
# Seconds one answer's regex search may take: far above any sane pattern's microseconds.
REGEX_TIMEOUT_S = 0.5
# Letters of options when a question names none (the expected answer alone says it is multiple choice).
DEFAULT_LETTERS = "ABCDE"


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


_DESCRIPTIONS = {
    Rule.CHOICE: "Multiple choice: the option (letter or text) the answer settles on",
    Rule.NUMBER: "Number: the answer's last number, normalised (1,000 = $1000.00 = 1000; 3/4 = 0.75)",
    Rule.FINAL: 'Final answer: what follows the last "Final answer:", "The answer is" or "Answer:"',
    Rule.EXACT: "Exact match: the whole answer, ignoring case and whitespace",
    Rule.CONTAINS: "Contains: the expected answer as whole words in the answer, ignoring case and whitespace",
}


@dataclass(frozen=True)
class Grading:
    rule: Rule
    # Rule.REGEX only: the pattern whose last match (its first group, if it has one) is the answer's claim.
    pattern: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rule, Rule):
            raise InvalidRequest(f"Unknown scoring rule {self.rule!r:.40}; rules: {', '.join(Rule)}.")
        if self.rule is not Rule.REGEX:
            if self.pattern is not None:
                raise InvalidRequest(f"A pattern goes with the regex rule only, not {self.rule}.")
            return
        if not isinstance(self.pattern, str) or not self.pattern:
            raise InvalidRequest("The regex rule needs a pattern.")
        if len(self.pattern) > MAX_PATTERN_CHARS:
            raise InvalidRequest(f"The pattern has {len(self.pattern)} characters; at most {MAX_PATTERN_CHARS}.")
        try:
            regex.compile(self.pattern)
        except regex.error as error:
            raise InvalidRequest(f"The pattern is not a regular expression: {error}.") from None

    def describe(self) -> str:
        """One line, shown with the results."""
        if self.rule is Rule.REGEX:
            return f"Regular expression /{self.pattern}/: its last match (first group, if any)"
        return _DESCRIPTIONS[self.rule]


def parse_grading(rule: object, pattern: object = None) -> Grading:
    """A Grading from untrusted values (an API request, an imported file)."""
    if not isinstance(rule, str) or rule not in set(Rule):
        raise InvalidRequest(f"Unknown scoring rule {rule!r:.40}; rules: {', '.join(Rule)}.")
    if pattern is not None and not isinstance(pattern, str):
        raise InvalidRequest(f"The pattern must be text, got {type(pattern).__name__}.")
    return Grading(Rule(rule), pattern or None)


@dataclass(frozen=True)
class Graded:
    # What the rule took as the answer's claim (normalised: "1000", "B"); None when it found none.
    extracted: str | None
    verdict: Verdict


NO_ANSWER = Graded(None, Verdict.NO_ANSWER)


def grade(grading: Grading, question: Question, answer: str) -> Graded:
    """The verdict on one answer to one question; linear in the answer's length."""
    if grading.rule is Rule.CHOICE:
        return _choice(question, answer)
    if grading.rule is Rule.NUMBER:
        return _number(question, answer)
    if grading.rule is Rule.FINAL:
        claim = final_answer(answer)
        return NO_ANSWER if claim is None else judge(question, claim)
    if grading.rule is Rule.EXACT:
        if not answer.strip():
            return NO_ANSWER
        return _verdict(answer.strip(), normal(answer) == normal(question.expected))
    if grading.rule is Rule.CONTAINS:
        if not answer.strip():
            return NO_ANSWER
        found = _has_words(normal(answer), normal(question.expected))
        return Graded(question.expected.strip(), Verdict.RIGHT) if found else Graded(None, Verdict.WRONG)
    claim = _regex_claim(grading.pattern or "", answer)
    return NO_ANSWER if claim is None else judge(question, claim)


def normal(text: str) -> str:
    """Text compared ignoring case and runs of whitespace."""
    return " ".join(text.split()).casefold()


def _verdict(extracted: str, right: bool) -> Graded:
    return Graded(extracted, Verdict.RIGHT if right else Verdict.WRONG)


def _has_words(text: str, words: str) -> bool:
    return bool(words) and re.search(rf"(?<!\w){re.escape(words)}(?!\w)", text) is not None


# --- numbers ---

# A number as people write it: an optional sign (not a hyphen inside a word or a range like 3-5), an
# optional $, thousands separated by commas in threes, decimals, and an optional "/denominator".
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<sign>[-−]))?\$?"
    r"(?P<whole>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<decimals>\.\d+)?(?:/(?P<denominator>\d+))?"
)


def _value(match: re.Match[str]) -> Fraction:
    value = Fraction(match["whole"].replace(",", "") + (match["decimals"] or ""))
    if match["denominator"] and int(match["denominator"]):
        value /= int(match["denominator"])
    return -value if match["sign"] else value


def last_number(text: str) -> Fraction | None:
    """The last number written in text, exactly; None when there is none."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else _value(last)


def show_number(value: Fraction) -> str:
    """A number as the results show it: 1000, 0.75, -2.5, 1/3."""
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest == 1:
        return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def expected_number(expected: str) -> Fraction | None:
    """The number an expected answer is, when it is one ("42", "$1,000", "-3.5", "3/4", "50%"), or
    the number after GSM8K's "####" at the end of a worked solution."""
    if "####" in expected:
        return last_number(expected.rsplit("####", 1)[1])
    match = _NUMBER.fullmatch(_clean(expected).removesuffix("%").strip())
    return None if match is None else _value(match)


def _number(question: Question, answer: str) -> Graded:
    got = last_number(answer)
    if got is None:
        return NO_ANSWER
    return _verdict(show_number(got), got == last_number(question.expected))


# --- final answers ---

_FINAL = re.compile(r"\b(?:final\s+answer(?:\s+is)?|answer\s+is|answer(?=\s*[:：]))\b\s*[:：]?", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_EDGE_MARKUP = "*_`\"'“”‘’ \t"


def _clean(span: str) -> str:
    """A claim without the Markdown, quotes and closing punctuation around it."""
    boxed = _BOXED.search(span)
    if boxed:
        span = boxed[1]
    previous = None
    while span != previous:
        previous = span
        span = span.strip().strip(_EDGE_MARKUP).lstrip(":：").rstrip(".,;!")
    return span


def final_answer(answer: str) -> str | None:
    """What follows the last final-answer phrase, on its line (or the next line when it ends the line)."""
    last = None
    for last in _FINAL.finditer(answer):
        pass
    if last is None:
        return None
    for line in answer[last.end() :].split("\n", 2)[:2]:
        claim = _clean(line)
        if claim:
            return claim
    return None


def judge(question: Question, claim: str) -> Graded:
    """A claim compared with the expected answer: as a choice, a number or text, as the question asks."""
    if _is_choice(question):
        letter = choice_letter(claim, question.choices)
        return NO_ANSWER if letter is None else _verdict(letter, letter == expected_letter(question))
    number = expected_number(question.expected)
    if number is not None:
        got = last_number(claim)
        return NO_ANSWER if got is None else _verdict(show_number(got), got == number)
    said, expected = normal(claim), normal(_clean(question.expected))
    opens_with = bool(expected) and said.startswith(expected) and not said[len(expected) :][:1].isalnum()
    return _verdict(claim, said == expected or opens_with)


# --- multiple choice ---

# A letter that opens a claim: "(B)", "[B]", "B)", "B.", "B:", "B," "B", "B - 12 apples", "B because …",
# "option B". A capital letter followed by a plain word ("A cat") is a word, not a choice.
_LEADING_LETTER = re.compile(
    r"(?:(?i:option|choice)\s*)?(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?=[.:),;]|$|\s*[-–—]|\s+(?:because|since|as|is)\b))"
)
_PARENTHESISED_LETTER = re.compile(r"\(([A-Z])\)")
# A claim that is one letter and nothing else, in either case: "b", "(b)", "[B]", "B)".
_LETTER_ALONE = re.compile(r"[(\[]?([A-Za-z])[)\].]?")


def _letters(choices: tuple[str, ...]) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)] if choices else DEFAULT_LETTERS


def _is_choice(question: Question) -> bool:
    return bool(question.choices) or re.fullmatch(r"\(?[A-E]\)?", question.expected.strip()) is not None


def expected_letter(question: Question) -> str | None:
    """The letter a multiple-choice question expects: given as a letter or as an option's text."""
    expected = question.expected.strip().strip("()")
    if len(expected) == 1 and expected.upper() in _letters(question.choices):
        return expected.upper()
    for letter, option in zip(_letters(question.choices), question.choices, strict=False):
        if normal(option) == normal(expected):
            return letter
    return None


def choice_letter(claim: str, choices: tuple[str, ...]) -> str | None:
    """The one option a claim names, by letter or by text; None when it names none or several."""
    letters = _letters(choices)
    claim = _clean(claim)
    alone = _LETTER_ALONE.fullmatch(claim)
    if alone:
        return alone[1].upper() if alone[1].upper() in letters else None
    lead = _LEADING_LETTER.match(claim)
    if lead:
        letter = next(group for group in lead.groups() if group)
        return letter if letter in letters else None
    said = normal(claim)
    named = [letter for letter, option in zip(letters, choices, strict=False) if _has_words(said, normal(option))]
    # An option whose text is part of a longer named option's ("12" in "12 apples") is not named by itself.
    texts = {letter: normal(option) for letter, option in zip(letters, choices, strict=False)}
    named = [letter for letter in named if not any(o != letter and texts[letter] in texts[o] for o in named)]
    if len(named) == 1:
        return named[0]
    parenthesised = {letter for letter in _PARENTHESISED_LETTER.findall(claim) if letter in letters}
    return parenthesised.pop() if len(parenthesised) == 1 else None


def _choice(question: Question, answer: str) -> Graded:
    claim = final_answer(answer)
    letter = choice_letter(claim, question.choices) if claim is not None else _settled_on(answer, question.choices)
    return NO_ANSWER if letter is None else _verdict(letter, letter == expected_letter(question))


def _settled_on(answer: str, choices: tuple[str, ...]) -> str | None:
    """Without a final-answer line: the one letter the answer names ("(B)", or a line opening with
    "B)"), or, naming no letter, the one option its last line names by text. An answer that walks
    through several options and never says which it picks settles on none."""
    letters = _letters(choices)
    named = {letter for letter in _PARENTHESISED_LETTER.findall(answer) if letter in letters}
    for line in answer.splitlines():
        lead = _LEADING_LETTER.match(line.strip())
        if lead:
            named.add(next(group for group in lead.groups() if group))
    named &= set(letters)
    if named:
        return named.pop() if len(named) == 1 else None
    return choice_letter(answer.strip().rsplit("\n", 1)[-1], choices)


# --- regular expressions ---


def _regex_claim(pattern: str, answer: str) -> str | None:
    compiled = regex.compile(pattern)
    last = None
    try:
        for last in compiled.finditer(answer, timeout=REGEX_TIMEOUT_S):
            pass
    except TimeoutError:
        return None
    if last is None:
        return None
    claim = last.group(1) if compiled.groups else last.group(0)
    # A group that took no part in the match, or matched only markup, claims nothing.
    return _clean(claim or "") or None
