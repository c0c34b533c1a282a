"""Questions for an evaluation: read from an uploaded file (CSV, JSON Lines, JSON), from records sent to
/evaluate, from the built-in sample set, or from a Hugging Face Hub dataset.

Every cell is kept as text, exactly as written: nothing is evaluated (a CSV cell "=1+1" is the text
"=1+1"), and HTML or Markdown in a question stays text for the page to show as it shows any message.
Columns are guessed by name, case-insensitively, unless a mapping names them:
  question: question, prompt, input, query        expected: answer, expected, target, label, gold, answerkey
  choices:  choices, options                      id: id
Every other column is kept, as text, as the question's metadata. Choices are a JSON list, or in a CSV
cell one option per line, or options separated by "|". JSON values that aren't text become text: a
number as written (72), true/false as Yes/No (a yes/no question's gold), a list or object as JSON; an
expected answer that is a whole number with choices (MMLU's form, 0-based) becomes the option's letter.

A file is read row by row and refused at the first row over the cap, so a file of 10⁶ rows costs what
its first max_rows + 1 rows cost, and never more than one pass over its bytes.

Nothing here imports gradio.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import islice
from pathlib import PurePath
from typing import Any

from .grading import Rule
from .settings import InvalidRequest

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROLES = ("question", "expected", "choices", "id")
GUESSES: dict[str, tuple[str, ...]] = {
    "question": ("question", "prompt", "input", "query"),
    "expected": ("answer", "expected", "target", "label", "gold", "answerkey"),
    "choices": ("choices", "options"),
    "id": ("id",),
}
SAMPLE_FILE = "sample_questions.jsonl"


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    expected: str
    # Multiple choice: the options in order; option i is letter "ABCDE…"[i].
    choices: tuple[str, ...] = ()
    # The file's other columns, (name, value) in the file's order.
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def prompt(self) -> str:
        """What the model is asked: the question, and its options lettered beneath it."""
        if not self.choices:
            return self.text
        options = "\n".join(f"({letter}) {option}" for letter, option in zip(LETTERS, self.choices, strict=False))
        return f"{self.text}\n\n{options}"


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
    # The file's name, "sample", "request" or "hub:<id>/<split>".
    source: str
    # The scoring rule that fits every row, where the set knows one (the sample set does).
    rule: Rule | None = None


def read_questions(
    data: bytes, filename: str, max_rows: int, max_cell_chars: int, mapping: dict[str, str] | None = None
) -> QuestionSet:
    """The questions of an uploaded file: CSV (.csv, .tsv), JSON Lines (.jsonl, .ndjson) or JSON (a list
    of objects); any other name is read by its first character ([ JSON, { JSON Lines, else CSV)."""
    name = PurePath(filename).name or "the file"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidRequest(
            f"{name} is not UTF-8 text (byte 0x{data[error.start]:02x} at position {error.start}); "
            "save it as UTF-8 and upload it again."
        ) from None
    if not text.strip():
        raise InvalidRequest(f"{name} is empty.")
    suffix = PurePath(name).suffix.lower()
    first = text.lstrip()[:1]
    if suffix in (".jsonl", ".ndjson") or (suffix not in (".json", ".csv", ".tsv") and first == "{"):
        rows: Iterator[dict[str, Any]] = _json_lines(text, name)
    elif suffix == ".json" or (suffix not in (".csv", ".tsv") and first == "["):
        rows = _json_list(text, name)
    else:
        rows = _csv_rows(text, name, "\t" if suffix == ".tsv" else ",", max_cell_chars)
    return _question_set(rows, name, max_rows, max_cell_chars, mapping)


def questions_from_records(records: list[dict[str, Any]], max_rows: int, max_cell_chars: int) -> QuestionSet:
    """The questions of an API request: a list of records (objects), columns guessed as for a file."""
    if not isinstance(records, list):
        raise InvalidRequest(f"questions must be a list of records (objects), got {type(records).__name__}.")
    if len(records) > max_rows:
        raise InvalidRequest(f"{len(records)} questions; this server takes at most {max_rows} per evaluation.")
    for index, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise InvalidRequest(f"question {index} must be a record (an object), got {type(record).__name__}.")
    return _question_set(iter(records), "request", max_rows, max_cell_chars, None)


@cache
def sample_questions() -> QuestionSet:
    """The built-in sample set: questions written for this project, each asking for a "Final answer:"
    line, so the final-answer rule scores every row (arithmetic, multiple choice and yes/no alike)."""
    data = resources.files("orca2_space").joinpath("data", SAMPLE_FILE).read_bytes()
    questions = read_questions(data, SAMPLE_FILE, max_rows=1000, max_cell_chars=10_000)
    return QuestionSet(questions.questions, questions.columns, "sample", Rule.FINAL)


def hub_questions(
    dataset_id: str, split: str, mapping: dict[str, str], max_rows: int, max_cell_chars: int
) -> QuestionSet:
    """The first rows of a Hugging Face Hub dataset, streamed through `datasets` (an optional package),
    so only as many rows as the cap allows are downloaded."""
    try:
        # Optional (not in requirements.txt), and slow to import: only when a Hub dataset is asked for.
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise InvalidRequest(
            "Loading a Hub dataset needs the datasets package (pip install datasets); it isn't installed here."
        ) from None
    source = f"hub:{dataset_id}/{split}"
    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
        rows = list(islice(iter(stream), max_rows + 1))
    # The loader raises many kinds (offline, no such dataset or split, a gated one); each is the visitor's to read.
    except Exception as error:  # noqa: BLE001
        raise InvalidRequest(f"Could not load {dataset_id} ({split}) from the Hub: {error}") from None
    return _question_set(iter(rows), source, max_rows, max_cell_chars, mapping)


# --- reading rows ---


def _csv_rows(text: str, name: str, delimiter: str, max_cell_chars: int) -> Iterator[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    number = 0
    try:
        header = next(reader)
        for number, row in enumerate(reader, 1):
            if not any(cell.strip() for cell in row):
                continue
            extra = row[len(header) :]
            if any(cell.strip() for cell in extra):
                raise InvalidRequest(f"{name}, row {number}: {len(row)} cells, but the header names {len(header)}.")
            yield dict(zip(header, row, strict=False))
    except csv.Error as error:
        # The csv module's own cap (131072 characters a field) can be reached before ours.
        if "field larger than field limit" in str(error):
            raise InvalidRequest(
                f"{name}, row {number + 1}: a cell longer than {max_cell_chars} characters, the most a cell may have."
            ) from None
        raise InvalidRequest(f"{name}, line {reader.line_num}: not CSV ({error}).") from None


def _json_lines(text: str, name: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(io.StringIO(text), 1):
        if line.strip():
            yield _object(_parse(line, f"{name}, line {number}"), f"{name}, line {number}")


def _json_list(text: str, name: str) -> Iterator[dict[str, Any]]:
    """The objects of a JSON list one by one, so a list over the cap is refused without parsing it whole."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if text[position : position + 1] != "[":
        raise InvalidRequest(f"{name} must be a JSON list of objects, one per question.")
    position = _skip_space(text, position + 1)
    number = 0
    while text[position : position + 1] != "]":
        number += 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise InvalidRequest(
                f"{name}: not JSON at line {error.lineno}, column {error.colno} ({error.msg})."
            ) from None
        yield _object(value, f"{name}, item {number}")
        position = _skip_space(text, position)
        if text[position : position + 1] == ",":
            position = _skip_space(text, position + 1)
        elif text[position : position + 1] != "]":
            raise InvalidRequest(f"{name}: after item {number}, expected , or ] (character {position}).")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _parse(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"{where}: not JSON ({error.msg}, column {error.colno}).") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: each question must be an object, got {type(value).__name__}.")
    return value


# --- rows to questions ---


def _question_set(
    rows: Iterator[dict[str, Any]], source: str, max_rows: int, max_cell_chars: int, mapping: dict[str, str] | None
) -> QuestionSet:
    taken = list(islice(rows, max_rows + 1))
    if len(taken) > max_rows:
        raise InvalidRequest(
            f"{source} has more than {max_rows} rows; this server takes at most {max_rows} per evaluation."
        )
    if not taken:
        raise InvalidRequest(f"{source} has no rows.")
    names = list(dict.fromkeys(str(name) for row in taken for name in row))
    columns = _columns(names, source, mapping or {})
    questions = tuple(_question(row, number, columns, source, max_cell_chars) for number, row in enumerate(taken, 1))
    seen: dict[str, int] = {}
    for number, question in enumerate(questions, 1):
        if question.id in seen:
            raise InvalidRequest(f"{source}, row {number}: id {question.id!r:.60} is row {seen[question.id]}'s too.")
        seen[question.id] = number
    return QuestionSet(questions, columns, source)


def _columns(names: list[str], source: str, mapping: dict[str, str]) -> Columns:
    unknown = set(mapping) - set(ROLES)
    if unknown:
        raise InvalidRequest(f"Unknown column role(s) {', '.join(sorted(unknown))}; roles: {', '.join(ROLES)}.")
    chosen: dict[str, str | None] = {}
    for role in ROLES:
        if mapping.get(role):
            if mapping[role] not in names:
                raise InvalidRequest(f"{source} has no column {mapping[role]!r:.60}; its columns: {_listed(names)}.")
            chosen[role] = mapping[role]
            continue
        by_lower = {name.strip().lower(): name for name in reversed(names)}
        chosen[role] = next((by_lower[guess] for guess in GUESSES[role] if guess in by_lower), None)
    for role in ("question", "expected"):
        if chosen[role] is None:
            raise InvalidRequest(
                f"{source} has no {role} column (looked for {', '.join(GUESSES[role])}); "
                f"its columns: {_listed(names)}. Rename one, or name it in the column mapping."
            )
    taken = set(chosen.values())
    return Columns(
        question=str(chosen["question"]),
        expected=str(chosen["expected"]),
        choices=chosen["choices"],
        id=chosen["id"],
        metadata=tuple(name for name in names if name not in taken and name.strip()),
    )


def _listed(names: Iterable[str]) -> str:
    shown = [repr(name)[:40] for name in islice(names, 30)]
    return ", ".join(shown) if shown else "none"


def _question(row: dict[str, Any], number: int, columns: Columns, source: str, max_cell_chars: int) -> Question:
    where = f"{source}, row {number}"

    def cell(name: str) -> str:
        value = _text(row.get(name))
        if len(value) > max_cell_chars:
            raise InvalidRequest(
                f"{where}, column {name!r:.40}: {len(value)} characters; a cell may have at most {max_cell_chars}."
            )
        return value

    text = cell(columns.question)
    if not text.strip():
        raise InvalidRequest(f"{where} has no question ({columns.question!r:.40} is empty).")
    choices = _choices(row.get(columns.choices), where) if columns.choices else ()
    for option in choices:
        if len(option) > max_cell_chars:
            raise InvalidRequest(f"{where}: an option of {len(option)} characters; at most {max_cell_chars}.")
    raw_expected = row.get(columns.expected)
    if choices and isinstance(raw_expected, int) and not isinstance(raw_expected, bool):
        if not 0 <= raw_expected < len(choices):
            raise InvalidRequest(f"{where}: answer {raw_expected} is no option's index (0 to {len(choices) - 1}).")
        expected = LETTERS[raw_expected]
    else:
        expected = cell(columns.expected)
    if not expected.strip():
        raise InvalidRequest(f"{where} has no expected answer ({columns.expected!r:.40} is empty).")
    identity = cell(columns.id).strip() if columns.id else ""
    metadata = tuple((name, cell(name)) for name in columns.metadata if name in row)
    return Question(identity or str(number), text, expected.strip(), choices, metadata)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _choices(value: Any, where: str) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        # The Hub's ARC and CommonsenseQA form: {"label": [...], "text": [...]}.
        value = value["text"]
    if isinstance(value, str):
        value = _split_options(value)
    if not isinstance(value, list) or len(value) < 2 or len(value) > len(LETTERS):
        raise InvalidRequest(
            f'{where}: choices must list 2 to {len(LETTERS)} options (a JSON list, one per line, or separated by "|").'
        )
    return tuple(_text(option).strip() for option in value)


def _split_options(text: str) -> list[Any]:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    lines = [line for line in stripped.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines
    return [option for option in stripped.split("|") if option.strip()]
