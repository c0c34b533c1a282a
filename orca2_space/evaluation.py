"""An evaluation: questions × system messages, each cell an answer and its verdict; its summary (accuracy
with intervals per system message, paired tests per pair) and its exports (CSV, JSON) and import.

Nothing here imports gradio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .grading import Graded, Grading, Verdict
from .questions import QuestionSet


@dataclass(frozen=True)
class Cell:
    # Indices into the evaluation's questions and system messages.
    question: int
    message: int
    answer: str
    graded: Graded
    answer_ids: tuple[int, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    stats: dict[str, Any] | None = None
    # Why there is no answer (e.g. the question is too long for the context); the cell has no verdict.
    error: str | None = None
    # A visitor's verdict where the extraction got it wrong.
    override: Verdict | None = None

    @property
    def verdict(self) -> Verdict | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Evaluation:
    questions: QuestionSet
    system_messages: tuple[str, ...]
    grading: Grading
    # GenerationParams.model_dump()
    params: dict[str, Any]
    # name, backend, weights/quantization, app version, seed scheme
    model: dict[str, Any]
    cells: tuple[Cell, ...] = ()

    @property
    def total(self) -> int:
        raise NotImplementedError

    def cell(self, question: int, message: int) -> Cell | None:
        raise NotImplementedError

    def with_cell(self, cell: Cell) -> Evaluation:
        raise NotImplementedError

    def with_override(self, question: int, message: int, verdict: Verdict | None) -> Evaluation:
        raise NotImplementedError


@dataclass(frozen=True)
class MessageResult:
    message: int
    right: int
    wrong: int
    no_answer: int
    errors: int
    # right / (right + wrong + no_answer); None when nothing was scored.
    accuracy: float | None
    interval: tuple[float, float] | None


@dataclass(frozen=True)
class PairResult:
    first: int
    second: int
    only_first: int
    only_second: int
    both: int
    neither: int
    p_value: float | None
    words: str


@dataclass(frozen=True)
class Summary:
    messages: tuple[MessageResult, ...]
    pairs: tuple[PairResult, ...]


def summarize(evaluation: Evaluation) -> Summary:
    raise NotImplementedError


def to_csv(evaluation: Evaluation) -> str:
    raise NotImplementedError


def to_json(evaluation: Evaluation) -> str:
    raise NotImplementedError


def from_json(text: str, max_rows: int, max_cell_chars: int) -> Evaluation:
    raise NotImplementedError
