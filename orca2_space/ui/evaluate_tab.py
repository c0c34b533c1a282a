"""The Evaluate tab: a set of questions answered under 1 to 4 system messages, scored by a rule chosen per
run; accuracy with its interval per system message, the paired tests, and the matrix of answers, each
opening to its full answer and token probabilities, its verdict overridable. It runs through the same
function as /evaluate (Chat.evaluate).

The questions loaded wait in the page (a hidden gr.JSON, not the server's memory); the last few
evaluations are kept in the visitor's browser (kept_evaluations.py), and the page shows the first of
them. Events are wired by name, as in the other tabs (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.blocks import Block
from gradio.components import Component
from pydantic import TypeAdapter, ValidationError

from .. import kept_evaluations
from ..chat import Chat, ChatUpdate
from ..evaluation import Evaluation, from_json, summarize, to_csv, to_json
from ..grading import Grading, Rule, Verdict
from ..presets import CAUTIOUS, PRESETS, TYPED, preset_of
from ..questions import QuestionSet, hub_questions, read_questions, sample_questions
from ..render import CHATBOT_OPTIONS, for_display
from ..settings import InvalidRequest
from .adapters import (
    GENERATION_CONCURRENCY_ID,
    INSTANT,
    PAGE_WORK,
    SCORING_CONCURRENCY,
    STORAGE_SECRET,
    EventOptions,
    admitted,
    read_upload,
    visitor_errors,
    visitor_of,
    wire_download,
)
from .controls import moderation_toggle, preset_picker, setting_controls, wire_preset
from .evaluation_view import (
    EVALUATION_CSS,
    FILTERS,
    Filter,
    error_html,
    matrix_html,
    message_label,
    note_html,
    progress_html,
    questions_html,
    summary_html,
)
from .messages import answer_messages
from .tokens import view_for

TITLE = "Evaluate"
ID = "evaluate-tab"
PURPOSE = (
    "Measure, as the Orca 2 paper does: a set of questions answered under 1 to 4 system messages with the same "
    "settings (greedy by default), each answer scored by a rule you choose. Accuracy comes with its 95% interval, "
    "and each pair of system messages with a paired test. Start with the built-in sample set, or your own file."
)
MESSAGES = range(1, 5)
# The paper's central comparison first: the empty system message against the model card's cautious one.
DEFAULT_SYSTEM_MESSAGES = ("", CAUTIOUS)
DEFAULT_MESSAGES = 2
RULES: list[tuple[str, str]] = [
    ("Multiple-choice letter or option", Rule.CHOICE.value),
    ("The last number (1,000 and $1000.00 are 1000)", Rule.NUMBER.value),
    ("A final-answer line (“Final answer: …”, “The answer is …”)", Rule.FINAL.value),
    ("Exact match (ignoring case and spaces)", Rule.EXACT.value),
    ("Contains the expected answer (ignoring case and spaces)", Rule.CONTAINS.value),
    ("Regular expression", Rule.REGEX.value),
]
VERDICTS: list[tuple[str, str]] = [
    ("As scored", "scored"),
    ("✓ Right", Verdict.RIGHT.value),
    ("✗ Wrong", Verdict.WRONG.value),
    ("? No answer found", Verdict.NO_ANSWER.value),
]
# A click on a matrix cell reaches the server as the component's select event: the cell's button says
# which question and system message it is (data-cell); the rest of the table does nothing.
MATRIX_JS = """
element.addEventListener('click', (event) => {
  const cell = event.target.closest('button[data-cell]');
  if (!cell || cell.disabled) return;
  const [question, message] = cell.dataset.cell.split(',').map(Number);
  trigger('select', {index: [question, message], value: cell.dataset.cell, selected: true});
});
"""
CSS = (
    EVALUATION_CSS
    + """
#evaluate-answer { height: 360px !important; }
#evaluate-answer .icon-button-wrapper { display: none; }
"""
)
_QUESTION_SET = TypeAdapter(QuestionSet)


@dataclass
class MessageColumn:
    box: gr.Column
    preset: gr.Dropdown
    system_message: gr.Textbox


@dataclass
class EvaluateTab:
    sample: gr.Button
    upload: gr.UploadButton
    hub_dataset: gr.Textbox
    hub_split: gr.Textbox
    hub_question: gr.Textbox
    hub_answer: gr.Textbox
    hub_choices: gr.Textbox
    hub_load: gr.Button
    questions_view: gr.HTML
    # The questions loaded (QuestionSet as JSON), held by the page until Run sends them.
    questions: gr.JSON
    count: gr.Radio
    columns: list[MessageColumn]
    rule: gr.Dropdown
    pattern: gr.Textbox
    moderation: gr.Checkbox
    params: dict[str, Component]
    run: gr.Button
    stop: gr.Button
    progress: gr.HTML
    summary: gr.HTML
    shown: gr.Radio
    matrix: gr.HTML
    # The cell opened: [question, message], or null.
    chosen: gr.JSON
    cell: gr.Group
    cell_caption: gr.HTML
    answer: gr.Chatbot
    verdict: gr.Radio
    score: gr.Button
    tokens: gr.HTML
    kept_list: gr.Dropdown
    export_csv: gr.Button
    export_json: gr.Button
    import_json: gr.UploadButton
    download: gr.Textbox
    # The last few evaluations, newest (the one shown) first: kept_evaluations.KeptEvaluation dicts.
    kept: gr.BrowserState


def build(demo: gr.Blocks, chat: Chat) -> None:
    """The tab's layout and events (inside its gr.Tab)."""
    _wire(layout(chat), chat)


def layout(chat: Chat) -> EvaluateTab:
    gr.Markdown(PURPOSE, elem_classes="purpose")
    with gr.Row():
        sample = gr.Button("Use the built-in sample set", size="sm", elem_id="evaluate-sample")
        upload = gr.UploadButton(
            "⤒ Upload questions (CSV, JSON Lines, JSON)",
            size="sm",
            file_types=[".csv", ".jsonl", ".json"],
            type="filepath",
            elem_id="evaluate-upload",
        )
    with gr.Accordion("From a Hugging Face Hub dataset", open=False, elem_id="evaluate-hub"):
        gr.Markdown(
            "Where this server can reach the Hub: the dataset's id and split, and which of its columns hold what "
            "(left empty: guessed from the names)."
        )
        with gr.Row():
            hub_dataset = gr.Textbox(label="Dataset id", placeholder="owner/name", elem_id="evaluate-hub-dataset")
            hub_split = gr.Textbox("test", label="Split", elem_id="evaluate-hub-split")
        with gr.Row():
            hub_question = gr.Textbox(label="Question column", elem_id="evaluate-hub-question")
            hub_answer = gr.Textbox(label="Answer column", elem_id="evaluate-hub-answer")
            hub_choices = gr.Textbox(label="Choices column (optional)", elem_id="evaluate-hub-choices")
        hub_load = gr.Button("Load from the Hub", size="sm", elem_id="evaluate-hub-load")
    questions_view = gr.HTML(
        _frame_note("No questions yet: use the sample set or upload a file."), elem_id="evaluate-questions"
    )
    questions = gr.JSON(None, visible=False, elem_id="evaluate-question-set")
    count = gr.Radio(list(MESSAGES), value=DEFAULT_MESSAGES, label="System messages", elem_id="evaluate-count")
    with gr.Row(equal_height=False):
        columns = [_column(index) for index in range(MESSAGES.stop - 1)]
    with gr.Row():
        rule = gr.Dropdown(RULES, value=Rule.FINAL.value, label="How an answer is scored", elem_id="evaluate-rule")
        pattern = gr.Textbox(
            label="Regular expression (its last match, or its first group, is the answer)",
            visible=False,
            elem_id="evaluate-pattern",
        )
    with gr.Accordion("Settings for every answer (greedy by default, as in the paper)", open=False):
        moderation = moderation_toggle(chat, elem_id="evaluate-moderation")
        params = setting_controls(chat.settings.max_new_tokens_cap, prefix="evaluate-")
    with gr.Row():
        # Until questions are loaded there is nothing to run.
        run = gr.Button("Run the evaluation", variant="primary", interactive=False, elem_id="evaluate-run")
        stop = gr.Button("Stop", variant="stop", visible=False, elem_id="evaluate-stop")
    progress = gr.HTML(elem_id="evaluate-progress")
    summary = gr.HTML(elem_id="evaluate-summary")
    shown = gr.Radio(FILTERS, value="all", label="Show", elem_id="evaluate-filter")
    matrix = gr.HTML(elem_id="evaluate-matrix", js_on_load=MATRIX_JS)
    chosen = gr.JSON(None, visible=False, elem_id="evaluate-chosen")
    with gr.Group(visible=False, elem_id="evaluate-cell") as cell:
        cell_caption = gr.HTML(elem_id="evaluate-cell-caption")
        answer = gr.Chatbot(
            show_label=False,
            buttons=[],
            feedback_options=None,
            autoscroll=False,
            elem_id="evaluate-answer",
            **CHATBOT_OPTIONS,
        )
        verdict = gr.Radio(
            VERDICTS, value="scored", label="Verdict (override where the rule got it wrong)", elem_id="evaluate-verdict"
        )
        score = gr.Button("How sure? Token probabilities", size="sm", elem_id="evaluate-score")
        tokens = gr.HTML(elem_id="evaluate-tokens")
    kept_list = gr.Dropdown([], label="Evaluations kept in this browser", elem_id="evaluate-kept")
    with gr.Row():
        # Until there is an evaluation there is nothing to export.
        export_csv = gr.Button("⤓ Export CSV", size="sm", interactive=False, elem_id="evaluate-export-csv")
        export_json = gr.Button("⤓ Export JSON", size="sm", interactive=False, elem_id="evaluate-export-json")
        import_json = gr.UploadButton(
            "⤒ Import an evaluation (JSON)", size="sm", file_types=[".json"], type="binary", elem_id="evaluate-import"
        )
    download = gr.Textbox(visible=False, elem_id="evaluate-download")
    kept = gr.BrowserState([], storage_key="orca2-space-evaluations", secret=STORAGE_SECRET)
    return EvaluateTab(
        sample=sample,
        upload=upload,
        hub_dataset=hub_dataset,
        hub_split=hub_split,
        hub_question=hub_question,
        hub_answer=hub_answer,
        hub_choices=hub_choices,
        hub_load=hub_load,
        questions_view=questions_view,
        questions=questions,
        count=count,
        columns=columns,
        rule=rule,
        pattern=pattern,
        moderation=moderation,
        params=params,
        run=run,
        stop=stop,
        progress=progress,
        summary=summary,
        shown=shown,
        matrix=matrix,
        chosen=chosen,
        cell=cell,
        cell_caption=cell_caption,
        answer=answer,
        verdict=verdict,
        score=score,
        tokens=tokens,
        kept_list=kept_list,
        export_csv=export_csv,
        export_json=export_json,
        import_json=import_json,
        download=download,
        kept=kept,
    )


def _column(index: int) -> MessageColumn:
    system = DEFAULT_SYSTEM_MESSAGES[index] if index < len(DEFAULT_SYSTEM_MESSAGES) else _nth_preset(index)
    name = preset_of(system)
    with gr.Column(visible=index < DEFAULT_MESSAGES, min_width=220, elem_id=f"evaluate-column-{index}") as box:
        preset = preset_picker(name, f"System message {index + 1}", f"evaluate-preset-{index}")
        system_message = gr.Textbox(system, show_label=False, lines=3, max_lines=5, elem_id=f"evaluate-system-{index}")
    return MessageColumn(box, preset, system_message)


def _nth_preset(index: int) -> str:
    """A preset not among the defaults, for the third and fourth columns."""
    others = [p.text for p in PRESETS.values() if p.text not in DEFAULT_SYSTEM_MESSAGES]
    return others[(index - len(DEFAULT_SYSTEM_MESSAGES)) % len(others)]


def _frame_note(text: str) -> str:
    return f'<p class="eval-view eval-note">{text}</p>'


def _wire(tab: EvaluateTab, chat: Chat) -> None:
    caps = (chat.settings.max_evaluation_rows, chat.settings.max_message_chars)

    def loaded(questions: QuestionSet) -> dict:
        rule = gr.skip() if questions.rule is None else questions.rule.value
        return {
            tab.questions: _QUESTION_SET.dump_python(questions, mode="json"),
            tab.questions_view: questions_html(questions),
            tab.rule: rule,
            tab.run: gr.update(interactive=True),
        }

    def refused(error: InvalidRequest) -> dict:
        # The questions loaded before stay: a file that can't be used loses nothing.
        return {tab.questions_view: error_html(str(error))}

    # The page's own events below load questions, or read, show or export the evaluations the browser
    # keeps (work that follows their size): each holds a place in the visitor's fair share while it runs.

    @visitor_errors
    def load_sample(request: gr.Request) -> dict:
        with admitted(chat, request):
            return loaded(sample_questions())

    @visitor_errors
    def load_file(request: gr.Request, *, file: dict | None) -> dict:
        """The questions of an uploaded file; the file is not kept (read_upload)."""
        data = read_upload(file)
        with admitted(chat, request):
            try:
                return loaded(read_questions(data, _upload_name(file), *caps))
            except InvalidRequest as error:
                return refused(error)

    @visitor_errors
    def load_hub(request: gr.Request, *, dataset: str, split: str, question: str, answer: str, choices: str) -> dict:
        named = {"question": question, "expected": answer, "choices": choices}
        mapping = {role: column.strip() for role, column in named.items() if column.strip()}
        with admitted(chat, request):
            try:
                return loaded(hub_questions(dataset.strip(), split.strip(), mapping, *caps))
            except InvalidRequest as error:
                return refused(error)

    @visitor_errors
    def run(request: gr.Request, values: dict):
        questions = _question_set(values[tab.questions])
        count = values[tab.count]
        systems = [values[column.system_message] for column in tab.columns[:count]]
        grading = _grading(values[tab.rule], values[tab.pattern])
        params = {name: values[control] for name, control in tab.params.items()}
        evaluation_request = chat.evaluation_request(questions, systems, grading, values[tab.moderation], **params)
        progress = None
        yield _busy(tab, True) | {tab.cell: gr.update(visible=False), tab.chosen: None}
        for progress in chat.evaluate(evaluation_request, visitor=visitor_of(request), owner=_owner(request)):
            yield _running(tab, progress, values[tab.shown])
        if progress is None:
            yield _busy(tab, False)
            return
        kept, notice = kept_evaluations.keep(kept_evaluations.load(values[tab.kept]), progress.evaluation)
        notices = (*progress.notices, *([notice] if notice else []))
        line = progress_html(progress.done, progress.total, None, None, True, notices)
        yield _busy(tab, False) | {tab.progress: line, tab.kept: kept_evaluations.dump(kept)}

    def stop(request: gr.Request) -> None:
        chat.stop(_owner(request))

    @visitor_errors
    def show_kept(request: gr.Request, *, kept, shown: Filter, chosen) -> dict:
        with admitted(chat, request):
            return _shown_kept(kept, shown, chosen)

    def _shown_kept(kept, shown: Filter, chosen) -> dict:
        """The page showing the first kept evaluation: its figures, matrix, system messages and rule."""
        listed = kept_evaluations.load(kept)
        evaluation = kept_evaluations.opened(listed, *caps)
        choices = [(k.label, index) for index, k in enumerate(listed)]
        view: dict[Block, Any] = {tab.kept_list: gr.update(choices=choices, value=0 if choices else None)}
        if evaluation is None:
            return view | _actions(tab, False)
        place = _place(chosen, evaluation)
        view |= {
            tab.summary: summary_html(evaluation, summarize(evaluation)),
            tab.matrix: matrix_html(evaluation, shown, place),
            tab.count: len(evaluation.system_messages),
            tab.rule: evaluation.grading.rule.value,
            tab.pattern: evaluation.grading.pattern or "",
        }
        for index, column in enumerate(tab.columns):
            view[column.box] = gr.update(visible=index < len(evaluation.system_messages))
        for column, system in zip(tab.columns, evaluation.system_messages):
            preset = preset_of(system)
            view |= {column.preset: gr.skip() if preset == TYPED else preset, column.system_message: system}
        return view | _actions(tab, True)

    @visitor_errors
    def filtered(request: gr.Request, *, kept, shown: Filter, chosen) -> dict:
        with admitted(chat, request):
            evaluation = _opened(kept)
            return {tab.matrix: matrix_html(evaluation, shown, _place(chosen, evaluation))} if evaluation else {}

    @visitor_errors
    def open_cell(event: gr.SelectData, request: gr.Request, *, kept, shown: Filter) -> dict:
        with admitted(chat, request):
            evaluation = _opened(kept)
            place = _place(event.index, evaluation) if evaluation else None
            if evaluation is None or place is None:
                return {}
            return _cell_view(tab, evaluation, place) | {
                tab.chosen: list(place),
                tab.matrix: matrix_html(evaluation, shown, place),
                tab.tokens: "",
            }

    @visitor_errors
    def override(request: gr.Request, *, kept, chosen, verdict: str) -> dict:
        with admitted(chat, request):
            listed = kept_evaluations.load(kept)
            evaluation = kept_evaluations.opened(listed, *caps)
            place = _place(chosen, evaluation) if evaluation else None
            if evaluation is None or place is None:
                return {}
            changed = evaluation.with_override(*place, None if verdict == "scored" else Verdict(verdict))
            updated, _ = kept_evaluations.keep(listed, changed, listed[0].label)
            return {tab.kept: kept_evaluations.dump(updated)} | _cell_view(tab, changed, place)

    def show_tokens(request: gr.Request, *, kept, chosen) -> dict:
        evaluation = _opened(kept)
        place = _place(chosen, evaluation) if evaluation else None
        cell = evaluation.cell(*place) if evaluation and place else None
        if evaluation is None or place is None or cell is None:
            raise gr.Error("Open a cell of the matrix first.")
        question, message = place
        caption = f"{evaluation.questions.questions[question].id} · {message_label(message, evaluation.system_messages[message])}"
        # Asked as the run asked it: the question with its options lettered (Question.prompt), under the cell's system message.
        asked, system = evaluation.questions.questions[question].prompt, evaluation.system_messages[message]
        view = view_for(chat, asked, system, [], cell.answer, cell.answer_ids, caption, visitor_of(request))
        return {tab.tokens: view.html}

    @visitor_errors
    def choose_kept(request: gr.Request, *, kept, index) -> dict:
        with admitted(chat, request):
            listed = kept_evaluations.load(kept)
            if not isinstance(index, int) or not 0 < index < len(listed):
                return {}
            reordered = [listed[index], *(k for i, k in enumerate(listed) if i != index)]
            return {tab.kept: kept_evaluations.dump(reordered), tab.cell: gr.update(visible=False), tab.chosen: None}

    @visitor_errors
    def export_csv(request: gr.Request, *, kept) -> str:
        with admitted(chat, request):
            return _download("csv", "text/csv", to_csv(_exported(kept)))

    @visitor_errors
    def export_json(request: gr.Request, *, kept) -> str:
        with admitted(chat, request):
            return _download("json", "application/json", to_json(_with_prompt_ids(chat, _exported(kept))))

    @visitor_errors
    def import_json(request: gr.Request, *, file: dict | None, kept) -> dict:
        """An evaluation from an exported file, shown and kept; the file is not kept (read_upload)."""
        data = read_upload(file)
        with admitted(chat, request):
            evaluation = from_json(_utf8(data), *caps)
            listed, notice = kept_evaluations.keep(kept_evaluations.load(kept), evaluation)
            note = f"📥 Imported: {len(evaluation.cells)} of {evaluation.total} answers. {notice or ''}"
            return {
                tab.kept: kept_evaluations.dump(listed),
                tab.progress: note_html(note.strip()),
                tab.cell: gr.update(visible=False),
                tab.chosen: None,
            }

    def shown_columns(count: int) -> dict:
        return {column.box: gr.update(visible=index < count) for index, column in enumerate(tab.columns)}

    def shown_pattern(rule: str) -> dict:
        return gr.update(visible=rule == Rule.REGEX.value)

    def _exported(kept) -> Evaluation:
        evaluation = _opened(kept)
        if evaluation is None:
            raise gr.Error("Nothing to export yet: run an evaluation first.")
        return evaluation

    def _opened(kept) -> Evaluation | None:
        return kept_evaluations.opened(kept_evaluations.load(kept), *caps)

    loads = [tab.questions, tab.questions_view, tab.rule, tab.run]
    tab.sample.click(load_sample, None, loads, **PAGE_WORK)
    # The file as uploaded (read_upload).
    tab.upload.upload(load_file, inputs_kwargs=dict(file=tab.upload), outputs=loads, preprocess=False, **PAGE_WORK)
    hub: dict[str, Block] = dict(
        dataset=tab.hub_dataset,
        split=tab.hub_split,
        question=tab.hub_question,
        answer=tab.hub_answer,
        choices=tab.hub_choices,
    )
    # Loading from the Hub waits on the network (a capped number of rows): in the page's group, never the
    # model's, admitted straight in so that its waiting holds a place in the visitor's fair share.
    tab.hub_load.click(load_hub, inputs_kwargs=hub, outputs=loads, **PAGE_WORK)
    tab.rule.change(shown_pattern, tab.rule, tab.pattern, **INSTANT)
    tab.count.change(shown_columns, tab.count, [c.box for c in tab.columns], **INSTANT)
    for column in tab.columns:
        wire_preset(column.preset, column.system_message)
    systems = {column.system_message for column in tab.columns}
    tab.run.click(
        run,
        inputs={
            tab.questions,
            tab.count,
            tab.rule,
            tab.pattern,
            tab.moderation,
            tab.shown,
            tab.kept,
            *systems,
            *tab.params.values(),
        },
        outputs=[
            tab.run,
            tab.stop,
            tab.progress,
            tab.summary,
            tab.matrix,
            tab.cell,
            tab.chosen,
            tab.kept,
            tab.export_csv,
            tab.export_json,
        ],
        concurrency_id=GENERATION_CONCURRENCY_ID,
        api_visibility="private",
    )
    tab.stop.click(stop, None, None, **INSTANT)
    shown_outputs = [
        tab.kept_list,
        tab.summary,
        tab.matrix,
        tab.count,
        tab.rule,
        tab.pattern,
        tab.export_csv,
        tab.export_json,
        *(c for column in tab.columns for c in (column.box, column.preset, column.system_message)),
    ]
    viewed: dict[str, Block] = dict(kept=tab.kept, shown=tab.shown, chosen=tab.chosen)
    tab.kept.change(show_kept, inputs_kwargs=viewed, outputs=shown_outputs, **PAGE_WORK)
    tab.shown.change(filtered, inputs_kwargs=viewed, outputs=[tab.matrix], **PAGE_WORK)
    cell_outputs = [tab.cell, tab.cell_caption, tab.answer, tab.verdict, tab.chosen, tab.matrix, tab.tokens]
    tab.matrix.select(open_cell, inputs_kwargs=dict(kept=tab.kept, shown=tab.shown), outputs=cell_outputs, **PAGE_WORK)
    tab.verdict.input(
        override,
        inputs_kwargs=dict(kept=tab.kept, chosen=tab.chosen, verdict=tab.verdict),
        outputs=[tab.kept, *cell_outputs],
        **PAGE_WORK,
    )
    scoring: EventOptions = {**SCORING_CONCURRENCY, "api_visibility": "private"}
    tab.score.click(
        visitor_errors(show_tokens),
        inputs_kwargs=dict(kept=tab.kept, chosen=tab.chosen),
        outputs=[tab.tokens],
        **scoring,
    )
    tab.kept_list.input(
        choose_kept,
        inputs_kwargs=dict(kept=tab.kept, index=tab.kept_list),
        outputs=[tab.kept, tab.cell, tab.chosen],
        **PAGE_WORK,
    )
    wire_download(tab.export_csv, export_csv, tab.download, kept=tab.kept)
    wire_download(tab.export_json, export_json, tab.download, kept=tab.kept)
    tab.import_json.upload(
        import_json,
        inputs_kwargs=dict(file=tab.import_json, kept=tab.kept),
        outputs=[tab.kept, tab.progress, tab.cell, tab.chosen],
        # The file as uploaded (read_upload).
        preprocess=False,
        **PAGE_WORK,
    )


def _running(tab: EvaluateTab, progress, shown: Filter) -> dict:
    """The run as it goes: its progress, and the figures and matrix of the answers finished so far."""
    evaluation = progress.evaluation
    line = progress_html(
        progress.done, progress.total, progress.answers_per_second, progress.seconds_left, False, progress.notices
    )
    return {
        tab.progress: line,
        tab.summary: summary_html(evaluation, summarize(evaluation)),
        tab.matrix: matrix_html(evaluation, shown, clickable=False),
    }


def _cell_view(tab: EvaluateTab, evaluation: Evaluation, place: tuple[int, int]) -> dict:
    """The opened cell: the question, the full answer as written, and its verdict."""
    question_index, message = place
    question = evaluation.questions.questions[question_index]
    cell = evaluation.cell(question_index, message)
    if cell is None:
        return {}
    graded = cell.graded.verdict.value
    extracted = "no answer found" if cell.graded.extracted is None else f"found “{cell.graded.extracted}”"
    caption = (
        f"Question {question.id} · {message_label(message, evaluation.system_messages[message])} · "
        f"expected “{question.expected}” · {extracted} · scored {graded}"
    )
    if cell.override is not None:
        caption += f" · overridden by hand: {cell.override.value}"
    shown = ChatUpdate(cell.answer, done=True, error=cell.error)
    messages = [{"role": "user", "content": for_display(question.prompt)}, *answer_messages(shown, show_raw=False)]
    return {
        tab.cell: gr.update(visible=True),
        tab.cell_caption: f'<p class="eval-view eval-note">{html.escape(caption)}</p>',
        tab.answer: messages,
        tab.verdict: "scored" if cell.override is None else cell.override.value,
    }


def _with_prompt_ids(chat: Chat, evaluation: Evaluation) -> Evaluation:
    """The evaluation with each cell's prompt ids, rebuilt as the run built them (the browser keeps none)."""
    max_new_tokens = evaluation.params.get("max_new_tokens", 0)
    questions, systems = evaluation.questions.questions, evaluation.system_messages
    cells = tuple(
        cell
        if cell.prompt_ids is not None or cell.error is not None
        else dataclasses.replace(
            cell,
            prompt_ids=tuple(
                chat.prompt_for(questions[cell.question].prompt, systems[cell.message], None, max_new_tokens).input_ids
            ),
        )
        for cell in evaluation.cells
    )
    return dataclasses.replace(evaluation, cells=cells)


def _place(value, evaluation: Evaluation | None) -> tuple[int, int] | None:
    """A cell's (question, message) from what the page sent, if it is one of this evaluation's."""
    if evaluation is None or not isinstance(value, list | tuple) or len(value) != 2:
        return None
    question, message = value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (question, message)):
        return None
    if 0 <= question < len(evaluation.questions.questions) and 0 <= message < len(evaluation.system_messages):
        return question, message
    return None


def _question_set(value) -> QuestionSet:
    if value is None:
        raise InvalidRequest("Load questions first: the sample set, a file or a Hub dataset.")
    try:
        return _QUESTION_SET.validate_python(value)
    except ValidationError as error:
        raise InvalidRequest("The questions loaded could not be read back: load them again.") from error


def _grading(rule: str, pattern: str) -> Grading:
    try:
        chosen = Rule(rule)
    except ValueError as error:
        raise InvalidRequest(f"Choose how answers are scored (got {rule!r:.40}).") from error
    if chosen == Rule.REGEX and not pattern:
        raise InvalidRequest("Give the regular expression that finds the answer.")
    return Grading(chosen, pattern if chosen == Rule.REGEX else None)


def _upload_name(file: dict | None) -> str:
    """The uploaded file's name as the visitor's computer gave it, which says its format."""
    return str((file or {}).get("orig_name") or Path((file or {}).get("path", "")).name)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest("This file is not UTF-8 text: it is not an evaluation export.") from error


def _download(extension: str, mime: str, text: str) -> str:
    name = f"orca2-evaluation-{datetime.now(UTC):%Y-%m-%dT%H%M%S}.{extension}"
    return json.dumps({"filename": name, "mime": mime, "text": text})


def _actions(tab: EvaluateTab, ready: bool) -> dict:
    return {tab.export_csv: gr.update(interactive=ready), tab.export_json: gr.update(interactive=ready)}


def _busy(tab: EvaluateTab, busy: bool) -> dict:
    """While the answers are written, Stop takes Run's place."""
    return {tab.run: gr.update(visible=not busy), tab.stop: gr.update(visible=busy)}


def _owner(request: gr.Request) -> str:
    return f"{request.session_hash}/evaluate"
