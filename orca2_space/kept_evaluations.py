"""The evaluations kept in the visitor's browser (the Evaluate tab's gr.BrowserState): the last few,
newest first, each as the JSON export holds it (evaluation.to_json) less what can be rebuilt.

The browser's storage (localStorage, about 5 MB an origin, shared with the kept chats) is the limit:
prompt ids are left out (the export rebuilds them from the question and the system message), the
evaluations are capped in number and in characters, and when the newest alone is over the budget its
answer ids go too (the token view then encodes the answer's text). What the browser sends back is
read as untrusted: from_json checks it as it checks an imported file.

Nothing here imports gradio.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

from pydantic import BaseModel, ValidationError

from .evaluation import Evaluation, from_json, to_json
from .settings import InvalidRequest

KEPT = 3
# Characters of JSON for all kept evaluations together: a share of the browser's storage that leaves the
# kept chats theirs.
KEPT_CHARS = 1_000_000


class KeptEvaluation(BaseModel):
    # What the list of kept evaluations shows.
    label: str
    # evaluation.to_json, less prompt ids (and answer ids, when too large).
    evaluation: str


def compact(evaluation: Evaluation, answer_ids: bool = True) -> str:
    """The export's JSON without its indentation, its summary (from_json computes it again) and the
    prompt ids."""
    cells = tuple(
        dataclasses.replace(cell, prompt_ids=None, answer_ids=cell.answer_ids if answer_ids else None)
        for cell in evaluation.cells
    )
    document = json.loads(to_json(dataclasses.replace(evaluation, cells=cells)))
    document.pop("summary", None)
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def label_of(evaluation: Evaluation, when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    questions = len(evaluation.questions.questions)
    source = evaluation.questions.source
    return (
        f"{when:%Y-%m-%d %H:%M} · {source} · {questions} questions × {len(evaluation.system_messages)} system messages"
    )


def keep(
    kept: list[KeptEvaluation], evaluation: Evaluation, label: str | None = None
) -> tuple[list[KeptEvaluation], str | None]:
    """The kept list with this evaluation first (replacing the one with the same label), and a notice
    when it could not be kept whole."""
    label = label or label_of(evaluation)
    text, notice = compact(evaluation), None
    if len(text) > KEPT_CHARS:
        text = compact(evaluation, answer_ids=False)
        notice = (
            "This evaluation is large for the browser's storage: it is kept without its answers' token ids "
            "(the token view encodes each answer's text). Export it as JSON to keep everything."
        )
        if len(text) > KEPT_CHARS:
            notice = (
                f"This evaluation ({len(text):,} characters) is larger than this browser keeps "
                f"({KEPT_CHARS:,}): it may be gone after you close the page. Export it as JSON to keep it."
            )
    first = KeptEvaluation(label=label, evaluation=text)
    rest, used = [], len(text)
    for other in kept:
        if other.label == label or len(rest) + 1 >= KEPT or used + len(other.evaluation) > KEPT_CHARS:
            continue
        rest.append(other)
        used += len(other.evaluation)
    return [first, *rest], notice


def load(value: object) -> list[KeptEvaluation]:
    """The kept list from the browser's value; what is not one is dropped (an older format, say)."""
    if not isinstance(value, list):
        return []
    kept = []
    for item in value[:KEPT]:
        try:
            kept.append(KeptEvaluation.model_validate(item))
        except ValidationError:
            continue
    return kept


def opened(kept: list[KeptEvaluation], max_rows: int, max_cell_chars: int) -> Evaluation | None:
    """The evaluation shown: the first kept one (None when there is none, or it can't be read)."""
    if not kept:
        return None
    try:
        return from_json(kept[0].evaluation, max_rows, max_cell_chars)
    except InvalidRequest:
        return None


def dump(kept: list[KeptEvaluation]) -> list[dict]:
    return [k.model_dump() for k in kept]
