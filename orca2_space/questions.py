"""Questions for an evaluation: read from an uploaded file (CSV, JSON Lines, JSON), from records sent to
/evaluate, from the built-in sample set, or from a Hugging Face Hub dataset.

Every cell is kept as text, exactly as written: nothing is evaluated (a CSV cell "=1+1" is the text "=1+1"),
and HTML or Markdown in a question stays text for the page to show as it shows any message.

Nothing here imports gradio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .grading import Rule


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    expected: str
    # Multiple choice: the options in order; option i is letter "ABCDE…"[i].
    choices: tuple[str, ...] = ()
    # The file's other columns, (name, value) in the file's order.
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Columns:
    """Which of the file's columns were taken for what (the page shows it)."""

    question: str
    expected: str
    choices: str | None
    id: str | None
    metadata: tuple[str, ...]


@dataclass(frozen=True)
class QuestionSet:
    questions: tuple[Question, ...]
    columns: Columns
    # The file's name, "sample", or "hub:<id>/<split>".
    source: str
    # The scoring rule that fits every row, where the set knows one (the sample set does).
    rule: Rule | None = None


def read_questions(
    data: bytes, filename: str, max_rows: int, max_cell_chars: int, mapping: dict[str, str] | None = None
) -> QuestionSet:
    raise NotImplementedError


def questions_from_records(records: list[dict[str, Any]], max_rows: int, max_cell_chars: int) -> QuestionSet:
    raise NotImplementedError


def sample_questions() -> QuestionSet:
    raise NotImplementedError


def hub_questions(
    dataset_id: str, split: str, mapping: dict[str, str], max_rows: int, max_cell_chars: int
) -> QuestionSet:
    raise NotImplementedError
