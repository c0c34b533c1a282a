"""The page: layout and event wiring. The sampling controls are derived from GenerationParams; Send
and /chat stream through one function (answers.turn)."""

import html
from dataclasses import dataclass

import gradio as gr

from ..chat import Chat
from ..conversation import Conversation, Store
from ..presets import CAUTIOUS, DEFAULT_PRESET, EXAMPLES, PRESET_CHOICES, SYSTEM_PRESETS
from ..prompt import PromptTooLong
from ..render import CHATBOT_OPTIONS
from ..settings import InvalidRequest, on_space
from . import compare
from .answers import (
    DOWNLOAD_JS,
    GENERATION_CONCURRENCY_ID,
    PARAM_NAMES,
    SCORING_CONCURRENCY,
    STORAGE_SECRET,
    ConversationEvents,
    history_messages,
)
from .api import add_endpoints
from .controls import moderation_toggle, setting_control
from .messages import exchange_at
from .tokens import TOKEN_CSS, token_view_of

CSS = (
    compare.CSS
    + TOKEN_CSS
    + """
#answer-status { min-height: 1.5em; }
#chatbot { height: min(62vh, 620px) !important; }
@media (max-width: 640px) {
  #chatbot { height: 55vh !important; }
  .gradio-container { padding: 4px !important; }
}
"""
)
THEME = gr.themes.Soft(primary_hue="indigo")
CHAT_PURPOSE = (
    "Ask Orca 2 anything and read its answer exactly as written; the system message on the right sets "
    "the reasoning strategy it is asked to use."
)
TOKENS_PURPOSE = (
    "See where Orca 2 was sure and where it hesitated: click an answer in the chat (or the button) to colour "
    "each of its tokens by the probability the model gave it."
)
SINGLE_TURN_INFO = (
    "On: each question is answered on its own, as Orca 2's card intends (it was not tuned for chat) and its "
    "paper evaluates. Off: earlier turns are sent too."
)


def _model_status(chat: Chat) -> str:
    loading = chat.loading
    if loading.backend is not None:
        info = loading.backend.info
        if info.served_by:
            return f"**Model** {info.name} · **Inference server** {info.served_by} ({info.reason})"
        return f"**Model** {info.name} · **Weights** {info.quantization} ({info.reason}) · **Device** {info.device}"
    icon = "❌" if loading.error else "⏳"
    return f"{icon} {html.escape(loading.describe())}"


@dataclass
class Page:
    """The components the events are wired to."""

    model_status: gr.Markdown
    loading_timer: gr.Timer
    store: gr.BrowserState
    chats: gr.Dropdown
    new_chat: gr.Button
    delete_chat: gr.Button
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    undo: gr.Button
    single_turn: gr.Checkbox
    raw: gr.Checkbox
    answer_status: gr.HTML
    tokens_box: gr.Accordion
    score_last: gr.Button
    tokens: gr.HTML
    export_json: gr.Button
    export_markdown: gr.Button
    import_json: gr.UploadButton
    download: gr.Textbox
    moderation: gr.Checkbox
    preset: gr.Dropdown
    system_message: gr.Textbox
    params: list[gr.components.Component]
    inspect: gr.Button
    inspect_count: gr.Markdown
    inspect_text: gr.Code
    inspect_ids: gr.Textbox


def build(chat: Chat) -> gr.Blocks:
    with gr.Blocks(title="Orca 2") as demo:
        header = _header(chat)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab"):
                gr.Markdown(CHAT_PURPOSE, elem_classes="purpose")
                page = Page(**header, **_chat_tab(chat))
            with gr.Tab("Compare system messages", id="compare-tab", elem_id="compare-tab"):
                comparing = compare.layout(chat)
        _wire(demo, page, chat)
        compare.wire(comparing, chat)
        add_endpoints(chat)
    return demo


def _header(chat: Chat) -> dict:
    gr.Markdown(
        "# Orca 2\nMicrosoft's Orca 2, run exactly as its model card does: the ChatML prompt, "
        "the slow tokenizer's ids, greedy decoding unless you ask for sampling. Your chats stay in this browser."
    )
    if on_space():
        # Visitors who want no queue (or other settings) can run their own copy.
        gr.DuplicateButton("Duplicate this Space", size="sm", elem_id="duplicate-space")
    return dict(
        model_status=gr.Markdown(_model_status(chat), elem_id="model-status"),
        # Until the model is loaded, the status line follows the loading.
        loading_timer=gr.Timer(1.0, active=not chat.loading.done),
        store=gr.BrowserState(Store().model_dump(), storage_key="orca2-space-conversations", secret=STORAGE_SECRET),
    )


def _chat_tab(chat: Chat) -> dict:
    parts = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            parts |= _conversation_column()
        with gr.Column(scale=2, min_width=280):
            parts |= _settings_column(chat)
    return parts


def _conversation_column() -> dict:
    with gr.Row(equal_height=False):
        chats = gr.Dropdown([], label="Your chats (kept in this browser)", scale=4, elem_id="chats")
        new_chat = gr.Button("+ New chat", size="sm", scale=1, min_width=90, elem_id="new-chat")
        delete_chat = gr.Button("🗑 Delete", size="sm", scale=1, min_width=80, elem_id="delete-chat")
    chatbot = gr.Chatbot(
        label="Chat",
        show_label=False,
        elem_id="chatbot",
        # No copy buttons: they would copy the HTML that shows the text, not the text.
        buttons=[],
        feedback_options=None,
        **CHATBOT_OPTIONS,
    )
    with gr.Row():
        # One line that grows: Enter sends, Shift+Enter starts a new line.
        message = gr.Textbox(
            placeholder="Ask Orca 2… (Enter sends, Shift+Enter adds a line)",
            show_label=False,
            scale=5,
            lines=1,
            max_lines=12,
            elem_id="message",
            autofocus=True,
        )
        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, visible=False, elem_id="stop")
    with gr.Row():
        retry = gr.Button("↻ Retry", size="sm", min_width=60, elem_id="retry")
        undo = gr.Button("↶ Undo", size="sm", min_width=60, elem_id="undo")
        export_json = gr.Button("⤓ JSON", size="sm", min_width=60, elem_id="export-json")
        export_markdown = gr.Button("⤓ Markdown", size="sm", min_width=60, elem_id="export-markdown")
        import_json = gr.UploadButton(
            "⤒ Import", size="sm", min_width=60, file_types=[".json"], type="binary", elem_id="import-json"
        )
    with gr.Row():
        single_turn = gr.Checkbox(True, label="Single turn", info=SINGLE_TURN_INFO, elem_id="single-turn")
        raw = gr.Checkbox(False, label="Raw text", info="Show the exact characters, unformatted", elem_id="raw")
    answer_status = gr.HTML(elem_id="answer-status")
    with gr.Accordion("How sure was Orca 2? Token probabilities", open=False, elem_id="tokens-box") as tokens_box:
        gr.Markdown(TOKENS_PURPOSE)
        score_last = gr.Button("Show the last answer's tokens", size="sm", elem_id="score-last")
        tokens = gr.HTML(elem_id="tokens")
    gr.Examples(EXAMPLES, inputs=[message], label="Examples from the model card")
    download = gr.Textbox(visible=False, elem_id="download")
    return dict(
        chats=chats,
        new_chat=new_chat,
        delete_chat=delete_chat,
        chatbot=chatbot,
        message=message,
        send=send,
        stop=stop,
        retry=retry,
        undo=undo,
        single_turn=single_turn,
        raw=raw,
        answer_status=answer_status,
        tokens_box=tokens_box,
        score_last=score_last,
        tokens=tokens,
        export_json=export_json,
        export_markdown=export_markdown,
        import_json=import_json,
        download=download,
    )


def _settings_column(chat: Chat) -> dict:
    moderation = moderation_toggle(chat)
    preset = gr.Dropdown(PRESET_CHOICES, value=DEFAULT_PRESET, label="System message preset", elem_id="preset")
    system_message = gr.Textbox(CAUTIOUS, label="System message", lines=5, max_lines=15, elem_id="system-message")
    with gr.Accordion("Sampling", open=False):
        params = [setting_control(name, chat.settings.max_new_tokens_cap) for name in PARAM_NAMES]
    with gr.Accordion("Prompt inspector", open=False):
        inspect = gr.Button("Show the prompt for the message box", size="sm", elem_id="inspect")
        inspect_count = gr.Markdown(elem_id="inspect-count")
        inspect_text = gr.Code(
            label="ChatML text", language=None, wrap_lines=True, max_lines=20, elem_id="inspect-text"
        )
        inspect_ids = gr.Textbox(label="Input ids", lines=4, max_lines=10, elem_id="inspect-ids")
    return dict(
        moderation=moderation,
        preset=preset,
        system_message=system_message,
        params=params,
        inspect=inspect,
        inspect_count=inspect_count,
        inspect_text=inspect_text,
        inspect_ids=inspect_ids,
    )


def _wire(demo: gr.Blocks, page: Page, chat: Chat) -> None:
    private = dict(queue=False, api_visibility="private")
    events = ConversationEvents(chat)
    listed = [page.store, page.chats]
    restored = [page.system_message, page.single_turn, *page.params]

    def refresh_model_status():
        return _model_status(chat), gr.Timer(active=not chat.loading.done)

    def stop(request: gr.Request) -> None:
        chat.stop(request.session_hash)

    status_outputs = [page.model_status, page.loading_timer]
    page.loading_timer.tick(refresh_model_status, None, status_outputs, **private)
    demo.load(refresh_model_status, None, status_outputs, **private)
    demo.load(events.show, [page.store, page.raw], [page.chatbot, page.chats], **private)
    page.raw.change(events.show, [page.store, page.raw], [page.chatbot, page.chats], **private)

    settings = [page.system_message, page.moderation, page.single_turn, page.raw, *page.params]
    busy_outputs = [page.message, page.chatbot, page.answer_status, page.send, page.stop, *listed]
    generation = dict(concurrency_id=GENERATION_CONCURRENCY_ID, api_visibility="private")
    gr.on(
        [page.send.click, page.message.submit],
        events.respond,
        [page.message, page.store, *settings],
        busy_outputs,
        **generation,
    )
    page.retry.click(events.retry, [page.store, *settings], busy_outputs, **generation)
    page.stop.click(stop, None, None, **private)
    page.undo.click(
        events.undo, [page.store, page.raw], [page.chatbot, page.message, page.answer_status, *listed], **private
    )
    # The Chatbot's own trash button clears the view: it starts a new chat too (the old one stays listed).
    for trigger in (page.new_chat.click, page.chatbot.clear):
        trigger(events.new, [page.store], [page.chatbot, page.answer_status, *listed], **private)
    page.delete_chat.click(events.delete, [page.store], [page.chatbot, page.answer_status, *listed], **private)
    page.chats.input(
        events.open,
        [page.chats, page.store, page.raw],
        [page.chatbot, page.answer_status, page.store, *restored],
        **private,
    )
    page.import_json.upload(
        events.import_,
        [page.import_json, page.store, page.raw],
        [page.chatbot, page.answer_status, *listed, *restored],
        **private,
    )
    for button, export in ((page.export_json, events.export_json), (page.export_markdown, events.export_markdown)):
        button.click(export, [page.store], [page.download], **private).then(
            None, [page.download], None, js=DOWNLOAD_JS, **private
        )
    page.preset.change(lambda name: SYSTEM_PRESETS[name], [page.preset], [page.system_message], **private)
    _wire_inspector(page, chat)
    _wire_tokens(page, chat)


def _wire_tokens(page: Page, chat: Chat) -> None:
    def show(conversation: Conversation, index: int):
        caption = f"Answer {index + 1}: {conversation.exchanges[index].question}"
        return gr.Accordion(open=True), token_view_of(chat, conversation, index, _clip(caption))

    def last(stored):
        conversation = Store.load(stored).current()
        if not conversation.exchanges:
            raise gr.Error("No answer yet: ask a question first.")
        return show(conversation, len(conversation.exchanges) - 1)

    def picked(stored, selected: gr.SelectData):
        conversation = Store.load(stored).current()
        position = selected.index[0] if isinstance(selected.index, list | tuple) else selected.index
        index = exchange_at(conversation, position)
        return (gr.skip(), gr.skip()) if index is None else show(conversation, index)

    scoring = dict(**SCORING_CONCURRENCY, api_visibility="private")
    page.score_last.click(last, [page.store], [page.tokens_box, page.tokens], **scoring)
    page.chatbot.select(picked, [page.store], [page.tokens_box, page.tokens], **scoring)


def _clip(text: str, limit: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _wire_inspector(page: Page, chat: Chat) -> None:
    def show_prompt(message, stored, system_message, single_turn, max_new_tokens):
        history = [] if single_turn else history_messages(Store.load(stored).current())
        try:
            prompt = chat.inspect(message, system_message, history, max_new_tokens)
        except (InvalidRequest, PromptTooLong) as error:
            raise gr.Error(str(error)) from error
        dropped = f" · {prompt.dropped_turns} oldest turn(s) left out" if prompt.dropped_turns else ""
        return prompt.text, str(prompt.input_ids), f"{prompt.n_tokens} tokens{dropped}"

    max_new_tokens = page.params[PARAM_NAMES.index("max_new_tokens")]
    page.inspect.click(
        show_prompt,
        [page.message, page.store, page.system_message, page.single_turn, max_new_tokens],
        [page.inspect_text, page.inspect_ids, page.inspect_count],
        queue=False,
        api_visibility="private",
    )
