"""An evaluation: questions × system messages, each cell an answer and its verdict; its summary (accuracy
with a Wilson interval per system message, McNemar's exact test per pair) and its exports.

- CSV: one row per cell, for a spreadsheet. A cell that starts with = + - @ (or a tab or carriage
  return) gets a leading ' so that no spreadsheet runs it as a formula (OWASP's CSV injection advice).
- JSON (format "orca2-space/evaluation", version 1): everything needed to re-run the evaluation exactly
  (the questions, system messages, scoring, generation settings with the seed, the model and app) and
  to read it again: every cell's answer, prompt ids and answer ids, the rule's verdict and a visitor's
  override, marked as such. from_json reads it back, checking every field's type and size.

Nothing here imports gradio.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Any

from .grading import Graded, Grading, Verdict, parse_grading
from .questions import LETTERS, Columns, Question, QuestionSet
from .settings import InvalidRequest
from .statistics import in_words, mcnemar_exact, wilson_interval

FORMAT = "orca2-space/evaluation"
VERSION = 1
MAX_MESSAGES = 4
# An imported answer or id list: far above what max_new_tokens allows, low enough to bound the import.
MAX_ANSWER_CHARS = 200_000
MAX_IDS = 100_000
MAX_STATS_KEYS = 64


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
        if self.error is not None:
            return None
        return self.override or self.graded.verdict


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
        return len(self.questions.questions) * len(self.system_messages)

    @cached_property
    def _where(self) -> dict[tuple[int, int], int]:
        return {(cell.question, cell.message): index for index, cell in enumerate(self.cells)}

    def cell(self, question: int, message: int) -> Cell | None:
        index = self._where.get((question, message))
        return None if index is None else self.cells[index]

    def with_cell(self, cell: Cell) -> Evaluation:
        """This evaluation with the cell added, or put in place of the one it answers again."""
        if not (0 <= cell.question < len(self.questions.questions) and 0 <= cell.message < len(self.system_messages)):
            raise ValueError(f"no cell ({cell.question}, {cell.message}) in a {self.total}-cell evaluation")
        index = self._where.get((cell.question, cell.message))
        cells = self.cells + (cell,) if index is None else self.cells[:index] + (cell,) + self.cells[index + 1 :]
        return replace(self, cells=cells)

    def with_override(self, question: int, message: int, verdict: Verdict | None) -> Evaluation:
        """This evaluation with a visitor's verdict on one cell (None: the rule's again). A verdict equal
        to the rule's is no override."""
        cell = self.cell(question, message)
        if cell is None or cell.error is not None:
            raise ValueError(f"cell ({question}, {message}) has no answer to judge")
        override = None if verdict == cell.graded.verdict else verdict
        return self.with_cell(replace(cell, override=override))


@dataclass(frozen=True)
class MessageResult:
    message: int
    right: int
    wrong: int
    no_answer: int
    errors: int
    # right / (right + wrong + no_answer): "no answer found" is not right, and is counted on its own too.
    # None when nothing was scored.
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


def message_name(message: int) -> str:
    return f"system message {message + 1}"


def summarize(evaluation: Evaluation) -> Summary:
    verdicts = [
        [evaluation.cell(q, m) for q in range(len(evaluation.questions.questions))]
        for m in range(len(evaluation.system_messages))
    ]
    return Summary(
        tuple(_message_result(m, cells) for m, cells in enumerate(verdicts)),
        tuple(
            _pair_result(first, second, verdicts[first], verdicts[second])
            for first in range(len(verdicts))
            for second in range(first + 1, len(verdicts))
        ),
    )


def _message_result(message: int, cells: list[Cell | None]) -> MessageResult:
    done = [cell for cell in cells if cell is not None]
    counts = {verdict: sum(cell.verdict is verdict for cell in done) for verdict in Verdict}
    scored = sum(counts.values())
    right = counts[Verdict.RIGHT]
    return MessageResult(
        message,
        right,
        counts[Verdict.WRONG],
        counts[Verdict.NO_ANSWER],
        sum(cell.error is not None for cell in done),
        right / scored if scored else None,
        wilson_interval(right, scored) if scored else None,
    )


def _pair_result(first: int, second: int, cells1: list[Cell | None], cells2: list[Cell | None]) -> PairResult:
    # Only questions both system messages have a verdict on are paired.
    pairs = [
        (a.verdict is Verdict.RIGHT, b.verdict is Verdict.RIGHT)
        for a, b in zip(cells1, cells2, strict=True)
        if a is not None and b is not None and a.verdict is not None and b.verdict is not None
    ]
    only_first = sum(a and not b for a, b in pairs)
    only_second = sum(b and not a for a, b in pairs)
    if not pairs:
        return PairResult(first, second, 0, 0, 0, 0, None, "no question answered under both yet")
    p = mcnemar_exact(only_first, only_second)
    words = in_words(p, only_first, only_second, message_name(first), message_name(second))
    both = sum(a and b for a, b in pairs)
    return PairResult(
        first, second, only_first, only_second, both, len(pairs) - both - only_first - only_second, p, words
    )


# --- CSV ---

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(value: str) -> str:
    """A spreadsheet cell that is shown, never run: a leading ' before a formula's first character."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def to_csv(evaluation: Evaluation) -> str:
    """One row per answered cell, by question then system message."""
    metadata = evaluation.questions.columns.metadata
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "question_id", "question", "expected", "choices", "system_message_number", "system_message",
            "answer", "extracted", "verdict", "rule_verdict", "overridden", "error", *metadata,
        ]
    )  # fmt: skip
    for cell in sorted(evaluation.cells, key=lambda cell: (cell.question, cell.message)):
        question = evaluation.questions.questions[cell.question]
        values = dict(question.metadata)
        row = [
            question.id,
            question.text,
            question.expected,
            " | ".join(question.choices),
            str(cell.message + 1),
            evaluation.system_messages[cell.message],
            cell.answer,
            cell.graded.extracted or "",
            cell.verdict or "",
            cell.graded.verdict if cell.error is None else "",
            "yes" if cell.override is not None else "",
            cell.error or "",
            *(values.get(name, "") for name in metadata),
        ]
        writer.writerow([neutralised(value) for value in row])
    return out.getvalue()


# --- JSON ---


def to_json(evaluation: Evaluation) -> str:
    questions = evaluation.questions
    summary = summarize(evaluation)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "model": evaluation.model,
        "params": evaluation.params,
        "grading": {
            "rule": evaluation.grading.rule.value,
            "pattern": evaluation.grading.pattern,
            "description": evaluation.grading.describe(),
        },
        "system_messages": list(evaluation.system_messages),
        "questions": {
            "source": questions.source,
            "rule": questions.rule.value if questions.rule else None,
            "columns": {
                "question": questions.columns.question,
                "expected": questions.columns.expected,
                "choices": questions.columns.choices,
                "id": questions.columns.id,
                "metadata": list(questions.columns.metadata),
            },
            "items": [
                {
                    "id": q.id,
                    "text": q.text,
                    "expected": q.expected,
                    "choices": list(q.choices),
                    "metadata": [list(pair) for pair in q.metadata],
                }
                for q in questions.questions
            ],
        },
        "cells": [
            {
                "question": cell.question,
                "message": cell.message,
                "answer": cell.answer,
                "extracted": cell.graded.extracted,
                "rule_verdict": cell.graded.verdict.value,
                "override": cell.override.value if cell.override else None,
                "verdict": cell.verdict.value if cell.verdict else None,
                "error": cell.error,
                "prompt_ids": list(cell.prompt_ids) if cell.prompt_ids is not None else None,
                "answer_ids": list(cell.answer_ids) if cell.answer_ids is not None else None,
                "stats": cell.stats,
            }
            for cell in evaluation.cells
        ],
        # For a reader of the file; from_json computes it again from the cells.
        "summary": {
            "messages": [asdict(result) for result in summary.messages],
            "pairs": [asdict(result) for result in summary.pairs],
        },
    }
    return json.dumps(document, ensure_ascii=False, indent=1)


def from_json(text: str, max_rows: int, max_cell_chars: int) -> Evaluation:
    """An evaluation exported by to_json, every field checked; InvalidRequest says what is wrong and where."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"Not JSON: {error.msg} at line {error.lineno}, column {error.colno}.") from None
    document = _typed(document, dict, "the file")
    if document.get("format") != FORMAT:
        raise InvalidRequest(f"Not an orca2-space evaluation (its format is {document.get('format')!r:.60}).")
    if document.get("version") != VERSION:
        raise InvalidRequest(f"Evaluation version {document.get('version')!r:.20}; this app reads version {VERSION}.")
    questions = _questions(_typed(document.get("questions"), dict, "questions"), max_rows, max_cell_chars)
    messages = _typed(document.get("system_messages"), list, "system_messages")
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise InvalidRequest(f"system_messages: {len(messages)}; an evaluation has 1 to {MAX_MESSAGES}.")
    system_messages = tuple(_text(m, f"system_messages[{i}]", max_cell_chars) for i, m in enumerate(messages))
    grading_doc = _typed(document.get("grading"), dict, "grading")
    grading = parse_grading(grading_doc.get("rule"), grading_doc.get("pattern"))
    evaluation = Evaluation(
        questions,
        system_messages,
        grading,
        _flat(document.get("params"), "params"),
        _flat(document.get("model"), "model"),
    )
    raw_cells = _typed(document.get("cells"), list, "cells")
    if len(raw_cells) > evaluation.total:
        raise InvalidRequest(f"cells: {len(raw_cells)}, more than the {evaluation.total} questions × system messages.")
    cells: dict[tuple[int, int], Cell] = {}
    for index, raw in enumerate(raw_cells):
        cell = _cell(_typed(raw, dict, f"cells[{index}]"), f"cells[{index}]", evaluation)
        if (cell.question, cell.message) in cells:
            raise InvalidRequest(f"cells[{index}]: question {cell.question}, message {cell.message} twice.")
        cells[cell.question, cell.message] = cell
    return replace(evaluation, cells=tuple(cells.values()))


def _typed(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidRequest(f"{where} must be {_KIND_NAMES[kind]}, got {type(value).__name__}.")
    return value


_KIND_NAMES = {dict: "an object", list: "a list", str: "text", int: "a whole number", bool: "true or false"}


def _text(value: Any, where: str, cap: int) -> str:
    value = _typed(value, str, where)
    if len(value) > cap:
        raise InvalidRequest(f"{where}: {len(value)} characters; at most {cap}.")
    return value


def _optional_text(value: Any, where: str, cap: int) -> str | None:
    return None if value is None else _text(value, where, cap)


def _index(value: Any, where: str, size: int) -> int:
    value = _typed(value, int, where)
    if not 0 <= value < size:
        raise InvalidRequest(f"{where}: {value} is outside 0 to {size - 1}.")
    return value


def _verdict(value: Any, where: str) -> Verdict:
    if value not in set(Verdict):
        raise InvalidRequest(f"{where}: {value!r:.40} is no verdict ({', '.join(Verdict)}).")
    return Verdict(value)


def _flat(value: Any, where: str) -> dict[str, Any]:
    """An object of plain values (params, model, stats): no nesting, a bounded number of keys."""
    value = _typed(value, dict, where)
    if len(value) > MAX_STATS_KEYS:
        raise InvalidRequest(f"{where}: {len(value)} keys; at most {MAX_STATS_KEYS}.")
    for key, item in value.items():
        if item is not None and not isinstance(item, str | int | float | bool):
            raise InvalidRequest(f"{where}.{key:.40} must be a plain value, got {type(item).__name__}.")
        if isinstance(item, str) and len(item) > MAX_ANSWER_CHARS:
            raise InvalidRequest(f"{where}.{key:.40}: {len(item)} characters; at most {MAX_ANSWER_CHARS}.")
    return value


def _ids(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    value = _typed(value, list, where)
    if len(value) > MAX_IDS:
        raise InvalidRequest(f"{where}: {len(value)} ids; at most {MAX_IDS}.")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise InvalidRequest(f"{where} must be a list of token ids (whole numbers, 0 or more).")
    return tuple(value)


def _questions(document: dict[str, Any], max_rows: int, cap: int) -> QuestionSet:
    items = _typed(document.get("items"), list, "questions.items")
    if not items:
        raise InvalidRequest("questions.items is empty.")
    if len(items) > max_rows:
        raise InvalidRequest(f"{len(items)} questions; this server takes at most {max_rows} per evaluation.")
    columns = _typed(document.get("columns"), dict, "questions.columns")
    metadata_names = _typed(columns.get("metadata"), list, "questions.columns.metadata")
    rule = document.get("rule")
    return QuestionSet(
        tuple(
            _question(_typed(item, dict, f"questions.items[{i}]"), f"questions.items[{i}]", cap)
            for i, item in enumerate(items)
        ),
        Columns(
            _text(columns.get("question"), "questions.columns.question", cap),
            _text(columns.get("expected"), "questions.columns.expected", cap),
            _optional_text(columns.get("choices"), "questions.columns.choices", cap),
            _optional_text(columns.get("id"), "questions.columns.id", cap),
            tuple(_text(name, f"questions.columns.metadata[{i}]", cap) for i, name in enumerate(metadata_names)),
        ),
        _text(document.get("source"), "questions.source", cap),
        None if rule is None else parse_grading(rule).rule,
    )


def _question(item: dict[str, Any], where: str, cap: int) -> Question:
    choices = _typed(item.get("choices", []), list, f"{where}.choices")
    if len(choices) == 1 or len(choices) > len(LETTERS):
        raise InvalidRequest(f"{where}.choices: {len(choices)} options; a question has none or 2 to {len(LETTERS)}.")
    metadata = _typed(item.get("metadata", []), list, f"{where}.metadata")
    pairs = []
    for i, pair in enumerate(metadata):
        pair = _typed(pair, list, f"{where}.metadata[{i}]")
        if len(pair) != 2:
            raise InvalidRequest(f"{where}.metadata[{i}] must be a [name, value] pair.")
        pairs.append((_text(pair[0], f"{where}.metadata[{i}]", cap), _text(pair[1], f"{where}.metadata[{i}]", cap)))
    question = Question(
        _text(item.get("id"), f"{where}.id", cap),
        _text(item.get("text"), f"{where}.text", cap),
        _text(item.get("expected"), f"{where}.expected", cap),
        tuple(_text(option, f"{where}.choices[{i}]", cap) for i, option in enumerate(choices)),
        tuple(pairs),
    )
    if not question.text.strip() or not question.expected.strip():
        raise InvalidRequest(f"{where} needs a question and an expected answer.")
    return question


def _cell(raw: dict[str, Any], where: str, evaluation: Evaluation) -> Cell:
    error = _optional_text(raw.get("error"), f"{where}.error", MAX_ANSWER_CHARS)
    override = raw.get("override")
    stats = raw.get("stats")
    return Cell(
        question=_index(raw.get("question"), f"{where}.question", len(evaluation.questions.questions)),
        message=_index(raw.get("message"), f"{where}.message", len(evaluation.system_messages)),
        answer=_text(raw.get("answer"), f"{where}.answer", MAX_ANSWER_CHARS),
        graded=Graded(
            _optional_text(raw.get("extracted"), f"{where}.extracted", MAX_ANSWER_CHARS),
            _verdict(raw.get("rule_verdict"), f"{where}.rule_verdict"),
        ),
        answer_ids=_ids(raw.get("answer_ids"), f"{where}.answer_ids"),
        prompt_ids=_ids(raw.get("prompt_ids"), f"{where}.prompt_ids"),
        stats=None if stats is None else _flat(stats, f"{where}.stats"),
        error=error,
        override=None if override is None or error is not None else _verdict(override, f"{where}.override"),
    )
