"""The Compare tab: one question answered under 2 to 4 system messages side by side, with one set of
settings; it streams through the same function as /compare (adapters.comparison).

Events are wired by name: Compare receives its inputs as {component: value} (a set of inputs), and
every handler returns {component: value} for the components it changes.
"""

from dataclasses import dataclass

import gradio as gr
from gradio.components import Component
from pydantic import ValidationError

from ..chat import COMPARED, Chat, ChatUpdate
from ..conversation import (
    COMPARISON_ROOM,
    Conversation,
    Exchange,
    LookedAt,
    answer_keys,
    json_room,
    json_size,
    parse_comparison,
    stored_chars,
)
from ..presets import SYSTEM_PRESETS, TYPED, preset_of
from ..render import CHATBOT_OPTIONS
from ..settings import InvalidRequest
from .adapters import (
    GENERATION_CONCURRENCY_ID,
    INSTANT,
    NOT_KEPT,
    PAGE_WORK,
    SCORING_CONCURRENCY,
    STORAGE_SECRET,
    EventOptions,
    admitted,
    comparison,
    comparison_download,
    exchange_of,
    read_upload,
    visitor_errors,
    visitor_of,
    wire_download,
)
from .controls import moderation_toggle, preset_picker, question_row, setting_controls, wire_preset
from .messages import answer_messages, status
from .tokens import token_view_of

TITLE = "Compare system messages"
ID = "compare-tab"
PURPOSE = (
    "See how the system message changes Orca 2's answer, the Orca 2 paper's central finding: one question, "
    "2 to 4 system messages side by side, the same settings for all (and the same seed when sampling)."
)
# The strategies a first comparison contrasts, column by column.
DEFAULT_PRESETS = (
    "Cautious (model card default)",
    "Empty (paper's evaluation setting)",
    "Step-by-step",
    "Explain, then answer",
)
DEFAULT_COLUMNS = 3
# Every column's parts are as tall as the next column's, so that the answers start side by side: the
# system message box has a fixed height (a longer message scrolls), what a preset asks has room for
# three lines, and the status line for two.
SYSTEM_MESSAGE_LINES = 5
CSS = """
.compare-answer { height: 380px !important; }
@media (max-width: 640px) { .compare-answer { height: 300px !important; } }
[id^=compare-preset-] .info-text { min-height: 4.2em; }
.compare-status { min-height: 3em; }
/* The Chatbot's toolbar holds only its unlabelled trash button (buttons=[]), which would clear a
   column's view of the comparison and nothing else. */
.compare-answer .icon-button-wrapper { display: none; }
"""


@dataclass
class Column:
    box: gr.Column
    preset: gr.Dropdown
    system_message: gr.Textbox
    answer: gr.Chatbot
    status: gr.HTML
    score: gr.Button


@dataclass
class CompareTab:
    message: gr.Textbox
    run: gr.Button
    stop: gr.Button
    count: gr.Radio
    columns: list[Column]
    # The token probabilities of the column asked for.
    tokens: gr.HTML
    export_json: gr.Button
    import_json: gr.UploadButton
    download: gr.Textbox
    moderation: gr.Checkbox
    # The generation settings' controls, by their names in GenerationParams.
    params: dict[str, Component]
    # The last finished comparison, one exchange per column, for export and the token view. Kept in
    # the visitor's browser like their chats (a gr.State would hold a connection open per visitor).
    result: gr.BrowserState
    # The token probabilities the visitor looked at, for the export (conversation.LookedAt).
    looked: gr.BrowserState


def build(demo: gr.Blocks, chat: Chat) -> None:
    """The tab's layout and events (inside its gr.Tab)."""
    _wire(layout(chat), chat)


def layout(chat: Chat) -> CompareTab:
    gr.Markdown(PURPOSE, elem_classes="purpose")
    message, run, stop = question_row("One question for all…", "compare-", "Compare", "compare-run")
    count = gr.Radio(list(COMPARED), value=DEFAULT_COLUMNS, label="System messages", elem_id="compare-count")
    with gr.Row(equal_height=False):
        columns = [_column(index) for index in range(COMPARED.stop - 1)]
    tokens = gr.HTML(elem_id="compare-tokens")
    with gr.Row():
        # Until there is a comparison there is nothing to export.
        export_json = gr.Button(
            "⤓ Export the comparison (JSON)", size="sm", interactive=False, elem_id="compare-export"
        )
        import_json = gr.UploadButton(
            "⤒ Import a comparison", size="sm", file_types=[".json"], type="binary", elem_id="compare-import"
        )
    download = gr.Textbox(visible=False, elem_id="compare-download")
    with gr.Accordion("Settings shared by every column", open=False):
        moderation = moderation_toggle(chat, elem_id="compare-moderation")
        params = setting_controls(chat.settings.max_new_tokens_cap, prefix="compare-")
    result = gr.BrowserState([], storage_key="orca2-space-comparison", secret=STORAGE_SECRET)
    looked = gr.BrowserState(
        LookedAt().model_dump(), storage_key="orca2-space-comparison-looked-at", secret=STORAGE_SECRET
    )
    return CompareTab(
        message=message,
        run=run,
        stop=stop,
        count=count,
        columns=columns,
        tokens=tokens,
        export_json=export_json,
        import_json=import_json,
        download=download,
        moderation=moderation,
        params=params,
        result=result,
        looked=looked,
    )


def _column(index: int) -> Column:
    preset_name = DEFAULT_PRESETS[index]
    with gr.Column(visible=index < DEFAULT_COLUMNS, min_width=260, elem_id=f"compare-column-{index}") as box:
        preset = preset_picker(preset_name, f"System message {index + 1}", f"compare-preset-{index}")
        system_message = gr.Textbox(
            SYSTEM_PRESETS[preset_name],
            show_label=False,
            lines=SYSTEM_MESSAGE_LINES,
            max_lines=SYSTEM_MESSAGE_LINES,
            elem_id=f"compare-system-{index}",
        )
        answer = gr.Chatbot(
            label=f"Answer {index + 1}",
            show_label=False,
            buttons=[],
            feedback_options=None,
            # An answer stays at its opening, what a comparison reads first, as it grows and once done.
            autoscroll=False,
            elem_id=f"compare-answer-{index}",
            elem_classes="compare-answer",
            **CHATBOT_OPTIONS,
        )
        answer_status = gr.HTML(elem_id=f"compare-status-{index}", elem_classes="compare-status")
        # Until the column has an answer there is nothing to score.
        score = gr.Button(
            "How sure? Token probabilities", size="sm", interactive=False, elem_id=f"compare-score-{index}"
        )
    return Column(box, preset, system_message, answer, answer_status, score)


def _wire(tab: CompareTab, chat: Chat) -> None:
    @visitor_errors
    def run(request: gr.Request, values: dict):
        count = values[tab.count]
        asked = [values[column.system_message] for column in tab.columns[:count]]
        params = {name: values[control] for name, control in tab.params.items()}
        message = values[tab.message]
        # Its own owner, so that the Chat tab's Stop leaves a comparison running and the reverse.
        owner, visitor = _owner(request), visitor_of(request)
        updates = comparison(chat, message, asked, values[tab.moderation], params, owner, visitor)
        shown = [ChatUpdate("") for _ in asked]
        # The kept comparison is no longer the one on screen: nothing to score or export until this one is done.
        yield _view(tab, shown) | _busy(tab, True) | _actions(tab, 0)
        for shown in updates:
            yield _view(tab, shown) | _busy(tab, True)
        result = [exchange_of(message, system, True, update).model_dump() for system, update in zip(asked, shown)]
        _warn_if_not_kept(result)
        yield _view(tab, shown) | _busy(tab, False) | {tab.result: result} | _actions(tab, len(result))

    def stop(request: gr.Request) -> None:
        chat.stop(_owner(request))

    def show_tokens(index: int):
        # A function of its own per column: Gradio finds the gr.Request parameter in a function's type hints.
        @visitor_errors
        def show(request: gr.Request, *, result, looked) -> dict:
            if index >= len(result):
                raise gr.Error("No answer in this column yet: compare first.")
            answers = _recorded(result)
            caption = f"System message {index + 1}"
            view = token_view_of(chat, Conversation(exchanges=answers), index, caption, visitor_of(request))
            if view.tokens is None:
                return {tab.tokens: view.html}
            key = answer_keys(answers)[index]
            kept = LookedAt.load(looked).add(key, view.tokens)
            return {tab.tokens: view.html + ("" if kept.kept(key) else NOT_KEPT), tab.looked: kept.model_dump()}

        return show

    # The page's own events below read, show or export the kept comparison (work that follows its
    # size): each holds a place in the visitor's fair share while it runs.

    @visitor_errors
    def export_json(request: gr.Request, *, result, looked) -> str:
        if not result:
            raise gr.Error("Nothing to export yet: compare first.")
        with admitted(chat, request):
            return comparison_download(chat, _recorded(result), LookedAt.load(looked))

    @visitor_errors
    def import_json(request: gr.Request, *, file: dict | None, looked) -> dict:
        data = read_upload(file)
        with admitted(chat, request):
            answers, looked_at = parse_comparison(data, LookedAt.load(looked))
            result = [answer.model_dump() for answer in answers]
            _warn_if_not_kept(result)
            return {tab.result: result, tab.looked: looked_at.model_dump()}

    @visitor_errors
    def show_kept(request: gr.Request, *, result) -> dict:
        with admitted(chat, request):
            return _kept(tab, _recorded(result))

    def shown_columns(count: int) -> dict:
        return {column.box: gr.update(visible=index < count) for index, column in enumerate(tab.columns)}

    systems = {column.system_message for column in tab.columns}
    answers = [component for column in tab.columns for component in (column.answer, column.status)]
    actions = [tab.export_json, *(column.score for column in tab.columns)]
    gr.on(
        [tab.run.click, tab.message.submit],
        run,
        inputs={tab.message, tab.count, tab.moderation, *systems, *tab.params.values()},
        outputs=[*answers, *actions, tab.run, tab.stop, tab.result],
        concurrency_id=GENERATION_CONCURRENCY_ID,
        api_visibility="private",
    )
    tab.stop.click(stop, None, None, **INSTANT)
    scoring: EventOptions = {**SCORING_CONCURRENCY, "api_visibility": "private"}
    for index, column in enumerate(tab.columns):
        column.score.click(
            show_tokens(index),
            inputs_kwargs=dict(result=tab.result, looked=tab.looked),
            outputs=[tab.tokens, tab.looked],
            **scoring,
        )
    tab.count.change(shown_columns, tab.count, [column.box for column in tab.columns], **INSTANT)
    for column in tab.columns:
        wire_preset(column.preset, column.system_message)
    wire_download(tab.export_json, export_json, tab.download, result=tab.result, looked=tab.looked)
    # The kept comparison, shown as it was and ready to score or export: when the browser reads it
    # (as the tab first opens), when a file is imported, and (the same again) when one finishes.
    shown = [
        tab.message,
        tab.count,
        *(c for column in tab.columns for c in (column.box, column.preset, column.system_message, column.answer)),
        *actions,
    ]
    tab.result.change(show_kept, inputs_kwargs=dict(result=tab.result), outputs=shown, **PAGE_WORK)
    tab.import_json.upload(
        import_json,
        inputs_kwargs=dict(file=tab.import_json, looked=tab.looked),
        outputs=[tab.result, tab.looked],
        # The file as uploaded (read_upload).
        preprocess=False,
        **PAGE_WORK,
    )


def _kept(tab: CompareTab, answers: list[Exchange]) -> dict:
    """The page showing a finished comparison: its question, system messages and answers."""
    if not answers:
        return _actions(tab, 0)
    view = {tab.message: answers[0].question, tab.count: len(answers)}
    for index, column in enumerate(tab.columns):
        view[column.box] = gr.update(visible=index < len(answers))
    for column, e in zip(tab.columns, answers):
        preset = preset_of(e.system_message)
        shown = ChatUpdate(e.answer, done=True, error=e.error, withheld=e.withheld)
        view |= {
            column.preset: gr.skip() if preset == TYPED else preset,
            column.system_message: e.system_message,
            column.answer: answer_messages(shown, show_raw=False),
        }
    return view | _actions(tab, len(answers))


def _actions(tab: CompareTab, answered: int) -> dict:
    """Export, and How sure? for each column that has a kept answer, can act; the rest are disabled."""
    scores = {column.score: gr.update(interactive=index < answered) for index, column in enumerate(tab.columns)}
    return scores | {tab.export_json: gr.update(interactive=answered > 0)}


def _busy(tab: CompareTab, busy: bool) -> dict:
    """While the answers stream, Stop takes Compare's place."""
    return {tab.run: gr.update(visible=not busy), tab.stop: gr.update(visible=busy)}


def _view(tab: CompareTab, updates) -> dict:
    """Each compared column's answer and status line; the columns not compared stay as they are."""
    view = {}
    for column, update in zip(tab.columns, updates):
        view |= {column.answer: answer_messages(update, show_raw=False), column.status: status(update)}
    return view


def _recorded(result: list[dict] | None) -> list[Exchange]:
    """The last comparison as the browser kept it: one exchange per column (InvalidRequest if it isn't one)."""
    try:
        return [Exchange.model_validate(e) for e in result or []]
    except ValidationError:
        raise InvalidRequest("Your browser sent a comparison this app doesn't read: compare again.") from None


def _warn_if_not_kept(result: list[dict]) -> None:
    """Says so when the browser has no room to keep this comparison (conversation.COMPARISON_ROOM)."""
    if stored_chars(json_size(result)) > COMPARISON_ROOM:
        gr.Warning(
            f"This comparison is larger than your browser's room for one ({json_room(COMPARISON_ROOM) / 1e6:.1f} MB), "
            "so it is lost when you leave or reload this page. Export it (⤓) to keep it.",
            duration=None,
        )


def _owner(request: gr.Request) -> str:
    return f"{request.session_hash}/compare"
