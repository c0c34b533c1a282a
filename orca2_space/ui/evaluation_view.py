"""What the Evaluate tab shows of questions and results, as HTML for gr.HTML: the questions taken from a
file, the run's progress, the figures (accuracy with its interval per system message, a chart with
error bars, the paired tests) and the matrix of answers.

Every text that comes from a file, a system message or an answer is html-escaped here, and the markup
holds no image, link, script or style sheet: nothing loads. gr.HTML puts this into the page as it is
(no sanitizer runs), so escaping here is the whole defence. The chart is HTML and CSS (EVALUATION_CSS):
bars whose widths are numbers formatted here, readable on a phone. Nothing here imports gradio.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Literal

from ..evaluation import Cell, Evaluation, MessageResult, PairResult, Summary
from ..grading import Verdict
from ..presets import PRESETS, TYPED, preset_of
from ..questions import QuestionSet

Filter = Literal["all", "failures", "disagree"]
FILTERS: list[tuple[str, Filter]] = [
    ("All questions", "all"),
    ("Failures (any cell not right)", "failures"),
    ("Where they disagree", "disagree"),
]
PREVIEW_ROWS = 5
# How much of a long text the matrix shows; the full text opens with the cell.
QUESTION_CHARS = 240
EXTRACTED_CHARS = 40
LABEL_CHARS = 32
_MARK = {Verdict.RIGHT: "✓", Verdict.WRONG: "✗", Verdict.NO_ANSWER: "?"}
_CELL_WORDS = {Verdict.RIGHT: "right", Verdict.WRONG: "wrong", Verdict.NO_ANSWER: "no answer found"}

EVALUATION_CSS = """
.eval-view { overflow-wrap: anywhere; }
/* A cell breaks a word only when it can't fit on its own line: a narrow table scrolls sideways (in
   .eval-scroll) rather than squeezing a column to a letter wide. */
.eval-view td { overflow-wrap: break-word; }
.eval-view table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
.eval-view th, .eval-view td { border: 1px solid var(--border-color-primary, #ccc); padding: 0.3em 0.5em;
  text-align: left; vertical-align: top; }
.eval-view th { overflow-wrap: normal; }
.eval-view .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.eval-view .eval-note { margin: 0.3em 0; opacity: 0.85; }
.eval-view .eval-error { color: var(--error-text-color, #b91c1c); font-weight: 600; }
.eval-scroll { overflow-x: auto; max-width: 100%; }
.eval-progress progress { width: 100%; height: 0.8em; }
.eval-chart { margin: 0.8em 0; }
.eval-chart .eval-bar-row { display: grid; grid-template-columns: 12em 1fr 4.5em; gap: 0.5em;
  align-items: center; margin: 0.35em 0; }
.eval-chart .eval-track { position: relative; height: 1.3em; border-radius: 3px;
  border-right: 1px solid rgba(128, 128, 128, 0.25);
  background: repeating-linear-gradient(to right, rgba(128, 128, 128, 0.25) 0 1px, transparent 1px 25%),
              rgba(128, 128, 128, 0.08); }
.eval-chart .eval-bar { position: absolute; left: 0; top: 0.2em; bottom: 0.2em; background: rgba(99, 102, 241, 0.55);
  border-radius: 2px; }
.eval-chart .eval-whisker { position: absolute; top: 50%; height: 0; border-top: 2px solid currentColor; }
.eval-chart .eval-whisker::before, .eval-chart .eval-whisker::after { content: ""; position: absolute; top: -0.45em;
  height: 0.8em; border-left: 2px solid currentColor; }
.eval-chart .eval-whisker::before { left: -1px; }
.eval-chart .eval-whisker::after { right: -1px; }
/* The axis is laid out in the bars' own ems (a smaller font there would move its columns off the bars'). */
.eval-chart .eval-axis { display: grid; grid-template-columns: 12em 1fr 4.5em; gap: 0.5em; opacity: 0.75; }
.eval-chart .eval-ticks { position: relative; height: 1.2em; }
.eval-chart .eval-ticks span { position: absolute; transform: translateX(-50%); white-space: nowrap; font-size: 0.8em; }
/* The matrix scrolls within itself, its header kept in view, so the answer a click opens (just below
   it) is near the cell clicked, however many questions there are. */
.eval-matrix .eval-scroll { max-height: 70vh; overflow: auto; }
.eval-matrix thead th { position: sticky; top: 0; z-index: 1; background: var(--background-fill-primary, #fff); }
.eval-matrix .eval-q { min-width: 12em; max-width: 28em; }
.eval-pairs .eval-words { min-width: 14em; }
.eval-matrix td.eval-cell { padding: 0; min-width: 7em; }
.eval-matrix .eval-cell button { display: block; width: 100%; min-height: 2.4em; padding: 0.3em 0.5em; text-align: left;
  font: inherit; color: inherit; background: transparent; border: 0; cursor: pointer; }
.eval-matrix .eval-cell button:disabled { cursor: default; }
.eval-matrix .eval-cell button:focus-visible { outline: 2px solid #6366f1; outline-offset: -2px; }
.eval-matrix .right { background: rgba(34, 197, 94, 0.16); }
.eval-matrix .wrong { background: rgba(239, 68, 68, 0.18); }
.eval-matrix .no-answer { background: rgba(234, 179, 8, 0.22); }
.eval-matrix .error { background: rgba(128, 128, 128, 0.18); }
.eval-matrix .chosen { outline: 2px solid #6366f1; outline-offset: -2px; }
.eval-matrix .eval-mark { font-weight: 700; margin-right: 0.3em; }
.eval-matrix .eval-overridden { font-size: 0.85em; opacity: 0.8; }
@media (max-width: 640px) {
  .eval-chart .eval-bar-row, .eval-chart .eval-axis { grid-template-columns: 6.5em 1fr 3.8em; }
  .eval-matrix .eval-q { min-width: 9em; }
  .eval-view table { font-size: 0.85em; }
}
"""


def message_label(index: int, system_message: str) -> str:
    """How a system message is named in the figures: its number and preset, or the opening of a typed one."""
    preset = preset_of(system_message)
    if preset != TYPED:
        return f"{index + 1} · {PRESETS[preset].label}"
    opening = " ".join(system_message.split())
    if len(opening) > LABEL_CHARS:
        opening = opening[: LABEL_CHARS - 1] + "…"
    return f"{index + 1} · “{opening}”"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def _frame(body: str, kind: str) -> str:
    return f'<div class="eval-view {kind}">{body}</div>'


# --- Questions ------------------------------------------------------------------------------------


def questions_html(questions: QuestionSet) -> str:
    """Where the questions came from, which columns were taken for what, and the first rows."""
    c = questions.columns
    taken = [f"question ← <code>{_e(c.question)}</code>", f"expected answer ← <code>{_e(c.expected)}</code>"]
    taken.append(f"choices ← <code>{_e(c.choices)}</code>" if c.choices else "no choices column")
    taken.append(f"id ← <code>{_e(c.id)}</code>" if c.id else "ids: the row numbers")
    if c.metadata:
        taken.append("kept as metadata: " + ", ".join(f"<code>{_e(name)}</code>" for name in c.metadata))
    count = len(questions.questions)
    head = (
        f'<p class="eval-note" data-questions="{count}">📄 {_e(_source(questions.source))}: '
        f"{count} question{'s' if count != 1 else ''}. Columns taken: {'; '.join(taken)}.</p>"
    )
    rows = "".join(
        f"<tr><td>{_e(q.id)}</td><td>{_e(_clip(q.text, QUESTION_CHARS))}</td><td>{_e(_clip(q.expected, 80))}</td>"
        f"<td>{_e(_clip(' | '.join(q.choices), 120))}</td></tr>"
        for q in questions.questions[:PREVIEW_ROWS]
    )
    shown = min(count, PREVIEW_ROWS)
    caption = f"The first {shown} row{'s' if shown != 1 else ''}" if count > shown else "Every row"
    table = (
        f'<div class="eval-scroll"><table class="eval-preview"><caption>{caption}</caption><thead><tr><th>Id</th>'
        f"<th>Question</th><th>Expected</th><th>Choices</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )
    return _frame(head + table, "eval-questions")


def _source(source: str) -> str:
    if source == "sample":
        return "The built-in sample set"
    if source.startswith("hub:"):
        return f"Hub dataset {source[4:]}"
    return f"File {source}"


def error_html(message: str) -> str:
    """Why the questions (or an import) could not be used."""
    return _frame(f'<p class="eval-error" role="alert">⚠️ {_e(message)}</p>', "eval-problem")


# --- Progress -------------------------------------------------------------------------------------


def progress_html(
    done: int,
    total: int,
    per_second: float | None,
    seconds_left: float | None,
    finished: bool,
    notices: Sequence[str] = (),
) -> str:
    """done/total, answers per second and the time left; data-state is running, done or stopped."""
    state = "running" if not finished else "done" if done >= total else "stopped"
    if state == "running":
        line = f"⏳ {done} of {total} answers"
        if per_second:
            line += f" · {per_second:.2g} answers/s"
        if seconds_left is not None:
            line += f" · about {_duration(seconds_left)} left"
    elif state == "done":
        line = f"✅ Done: {total} answers"
    else:
        line = "⏹ Stopped: the answers that finished are kept and scored"
    lines = [line, *(f"ℹ️ {notice}" for notice in notices)]
    body = "<br>".join(_e(item) for item in lines)
    bar = f'<progress value="{done}" max="{max(total, 1)}"></progress>' if state == "running" else ""
    return (
        f'<div class="eval-view eval-progress" role="status" aria-live="polite" data-state="{state}" '
        f'data-done="{done}" data-total="{total}">{body}{bar}</div>'
    )


def note_html(text: str) -> str:
    """A line where the progress goes, for what is not a run (an evaluation imported)."""
    return f'<div class="eval-view eval-progress" role="status" data-state="shown">{_e(text)}</div>'


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# --- Figures --------------------------------------------------------------------------------------


def summary_html(evaluation: Evaluation, summary: Summary) -> str:
    """The scoring rule, the accuracy table, the chart and the paired tests."""
    labels = [message_label(i, s) for i, s in enumerate(evaluation.system_messages)]
    overrides = sum(cell.override is not None for cell in evaluation.cells)
    rule = f"Scored by: {evaluation.grading.describe()}."
    if overrides:
        rule += f" {overrides} verdict{'s' if overrides != 1 else ''} overridden by hand (marked ✎ in the matrix)."
    parts = [
        f'<p class="eval-note eval-rule">{_e(rule)}</p>',
        _accuracy_table(summary.messages, labels),
        _chart(summary.messages, labels),
    ]
    if summary.pairs:
        parts.append(_pairs_table(summary.pairs, labels))
    return _frame("".join(parts), "eval-summary")


def _accuracy_table(results: Sequence[MessageResult], labels: Sequence[str]) -> str:
    rows = []
    for r in results:
        scored = r.right + r.wrong + r.no_answer
        accuracy = "–" if r.accuracy is None else _percent(r.accuracy)
        interval = "–" if r.interval is None else f"{_percent(r.interval[0])} to {_percent(r.interval[1])}"
        rows.append(
            f'<tr data-message="{r.message}"><th scope="row">{_e(labels[r.message])}</th>'
            f'<td class="num eval-accuracy">{accuracy}</td><td class="num">{interval}</td>'
            f'<td class="num">{r.right}</td><td class="num eval-scored">{scored}</td>'
            f'<td class="num eval-no-answer">{r.no_answer}</td><td class="num">{r.errors}</td></tr>'
        )
    head = (
        "<tr><th>System message</th><th>Accuracy</th><th>95% interval (Wilson)</th><th>Right</th><th>Scored</th>"
        "<th>No answer found</th><th>Errors</th></tr>"
    )
    note = (
        '<p class="eval-note">Accuracy is right ÷ scored; an answer where the rule found no answer counts as '
        "not right, and is also counted on its own. Errors (no answer written) are not scored.</p>"
    )
    return f'<div class="eval-scroll"><table class="eval-accuracy"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>{note}'


def _chart(results: Sequence[MessageResult], labels: Sequence[str]) -> str:
    """Horizontal bars from 0 to 100%, each with its 95% interval as error bars."""
    rows, spoken = [], []
    for r in results:
        label = _e(labels[r.message])
        if r.accuracy is None or r.interval is None:
            rows.append(
                f'<div class="eval-bar-row"><span>{label}</span><span class="eval-track"></span><span class="num">–</span></div>'
            )
            spoken.append(f"{labels[r.message]}: nothing scored")
            continue
        low, high = (min(max(x, 0.0), 1.0) * 100 for x in r.interval)
        width = min(max(r.accuracy, 0.0), 1.0) * 100
        rows.append(
            f'<div class="eval-bar-row"><span>{label}</span><span class="eval-track">'
            f'<span class="eval-bar" style="width: {width:.2f}%"></span>'
            f'<span class="eval-whisker" style="left: {low:.2f}%; width: {high - low:.2f}%"></span></span>'
            f'<span class="num">{_percent(r.accuracy)}</span></div>'
        )
        spoken.append(
            f"{labels[r.message]}: {_percent(r.accuracy)} ({_percent(r.interval[0])} to {_percent(r.interval[1])})"
        )
    ticks = "".join(f'<span style="left: {tick}%">{tick}%</span>' for tick in (0, 25, 50, 75, 100))
    axis = f'<div class="eval-axis"><span></span><span class="eval-ticks">{ticks}</span><span></span></div>'
    described = "Accuracy with 95% intervals: " + "; ".join(spoken)
    return f'<div class="eval-chart" role="img" aria-label="{_e(described)}">{"".join(rows)}{axis}</div>'


def _pairs_table(pairs: Sequence[PairResult], labels: Sequence[str]) -> str:
    rows = []
    for p in pairs:
        first, second = labels[p.first], labels[p.second]
        rows.append(
            f'<tr data-pair="{p.first}-{p.second}"><th scope="row">{_e(first)}<br>vs {_e(second)}</th>'
            f'<td class="num">{p.only_first}</td><td class="num">{p.only_second}</td><td class="num">{p.both}</td>'
            f'<td class="num">{p.neither}</td><td class="num">{_p_value(p.p_value)}</td><td class="eval-words">{_e(p.words)}</td></tr>'
        )
    head = (
        "<tr><th>Pair</th><th>Only the first right</th><th>Only the second right</th><th>Both right</th>"
        "<th>Neither</th><th>McNemar exact p</th><th>In words</th></tr>"
    )
    note = (
        '<p class="eval-note">The paired test reads only the questions where the two disagree: if neither system '
        "message were better, each would win about half of them.</p>"
    )
    return f'<div class="eval-scroll"><table class="eval-pairs"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>{note}'


def _p_value(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3g}"


# --- The matrix -----------------------------------------------------------------------------------


def cells_by_place(evaluation: Evaluation) -> dict[tuple[int, int], Cell]:
    return {(cell.question, cell.message): cell for cell in evaluation.cells}


def rows_shown(evaluation: Evaluation, shown: Filter) -> list[int]:
    """The questions a filter keeps. Failures: a cell that is not right (wrong, no answer found or an
    error). Disagree: one system message got it right and another did not (what the paired test counts)."""
    cells = cells_by_place(evaluation)
    count = len(evaluation.system_messages)
    rows = []
    for q in range(len(evaluation.questions.questions)):
        row = [cells.get((q, m)) for m in range(count)]
        verdicts = [None if c is None else c.verdict for c in row]
        if shown == "failures" and not any(c is not None and v != Verdict.RIGHT for c, v in zip(row, verdicts)):
            continue
        rights = {v == Verdict.RIGHT for v in verdicts if v is not None}
        if shown == "disagree" and len(rights) < 2:
            continue
        rows.append(q)
    return rows


def matrix_html(
    evaluation: Evaluation, shown: Filter = "all", chosen: tuple[int, int] | None = None, clickable: bool = True
) -> str:
    """A row per question, a column per system message: each cell its extracted answer and verdict.
    A cell is a button (data-cell="question,message") that opens its full answer; while the run goes
    on (clickable False) the cells only show."""
    labels = [message_label(i, s) for i, s in enumerate(evaluation.system_messages)]
    cells = cells_by_place(evaluation)
    heads = "".join(f'<th scope="col">{_e(label)}</th>' for label in labels)
    rows = []
    for q in rows_shown(evaluation, shown):
        question = evaluation.questions.questions[q]
        tds = "".join(_cell_td(cells.get((q, m)), q, m, chosen == (q, m), clickable) for m in range(len(labels)))
        rows.append(
            f'<tr data-question="{q}"><th scope="row">{_e(question.id)}</th>'
            f'<td class="eval-q">{_e(_clip(question.text, QUESTION_CHARS))}</td>'
            f"<td>{_e(_clip(question.expected, EXTRACTED_CHARS))}</td>{tds}</tr>"
        )
    if not rows:
        empty = {
            "all": "No questions.",
            "failures": "No failures: every answer was right.",
            "disagree": "The system messages agree on every question.",
        }[shown]
        return _frame(f'<p class="eval-note eval-empty">{empty}</p>', "eval-matrix")
    table = (
        f'<div class="eval-scroll"><table><thead><tr><th scope="col">Id</th><th scope="col">Question</th>'
        f'<th scope="col">Expected</th>{heads}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
    )
    note = (
        '<p class="eval-note">✓ right · ✗ wrong · ? no answer found · ⚠ no answer written · ✎ verdict overridden by hand.'
        f"{' Click a cell for its full answer and its token probabilities.' if clickable else ''}</p>"
    )
    return _frame(note + table, "eval-matrix")


def _cell_td(cell: Cell | None, q: int, m: int, chosen: bool, clickable: bool) -> str:
    if cell is None:
        return (
            '<td class="eval-cell pending"><button type="button" disabled aria-label="not answered yet">…</button></td>'
        )
    verdict = cell.verdict
    if cell.error is not None or verdict is None:
        kind, mark, words, text = "error", "⚠", "no answer written", _clip(cell.error or "", EXTRACTED_CHARS)
    else:
        kind = {Verdict.RIGHT: "right", Verdict.WRONG: "wrong", Verdict.NO_ANSWER: "no-answer"}[verdict]
        mark, words = _MARK[verdict], _CELL_WORDS[verdict]
        text = "no answer found" if cell.graded.extracted is None else _clip(cell.graded.extracted, EXTRACTED_CHARS)
    overridden = ""
    if cell.override is not None:
        overridden = f' <span class="eval-overridden" title="graded {_e(cell.graded.verdict.value)}">✎</span>'
        words += f", overridden by hand (graded {cell.graded.verdict.value})"
    classes = f"eval-cell {kind}{' chosen' if chosen else ''}"
    disabled = "" if clickable else " disabled"
    label = f"Question {q + 1}, system message {m + 1}: {words}"
    return (
        f'<td class="{classes}" data-verdict="{kind}"><button type="button" data-cell="{q},{m}"{disabled} '
        f'aria-label="{_e(label)}"><span class="eval-mark">{mark}</span>{_e(text)}{overridden}</button></td>'
    )
