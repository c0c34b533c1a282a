"""The page: layout and event wiring. The sampling controls are derived from GenerationParams; Send
and /chat stream through one function (answers.turn)."""

import html
from dataclasses import dataclass

import gradio as gr
from gradio.utils import get_space

from ..chat import Chat
from ..conversation import Store
from ..presets import CAUTIOUS, DEFAULT_PRESET, EXAMPLES, SYSTEM_PRESETS
from ..prompt import PromptTooLong
from ..render import CHATBOT_OPTIONS
from ..settings import GENERATION_FIELDS, RANDOM_SEED, InvalidRequest, bounds
from .answers import PARAM_NAMES, ConversationEvents, history_messages
from .api import GENERATION_CONCURRENCY_ID, add_endpoints

CSS = """
#answer-status { min-height: 1.5em; }
#chatbot { height: min(62vh, 620px) !important; }
@media (max-width: 640px) {
  #chatbot { height: 55vh !important; }
  .gradio-container { padding: 4px !important; }
}
"""
THEME = gr.themes.Soft(primary_hue="indigo")
# Where the browser keeps the visitor's conversations. Gradio sends the secret to the page, so it
# hides nothing from the visitor; a fixed one keeps their chats readable after a server restart.
STORAGE_KEY = "orca2-space-conversations"
STORAGE_SECRET = "orca2-space"
# Downloads are made in the browser from the text the server returns: nothing is written server-side.
DOWNLOAD_JS = """
(payload) => {
  if (!payload) return;
  const {filename, mime, text} = JSON.parse(payload);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type: mime}));
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
"""
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


def _moderation_toggle(chat: Chat) -> gr.Checkbox:
    label = "Moderation (Azure AI Content Safety)"
    if chat.moderation is None:
        return gr.Checkbox(
            False,
            label=label,
            interactive=False,
            info="Off: this server has no moderation service. Set CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY to enable it.",
            elem_id="moderation",
        )
    rules = chat.moderation.settings
    on_failure = "shown marked unmoderated" if rules.fail_open else "held back"
    info = f"Withholds {', '.join(rules.categories)} at severity {rules.threshold} or above; if the service fails, answers are {on_failure}."
    if rules.required:
        return gr.Checkbox(
            True, label=label, interactive=False, info=f"Required on this server. {info}", elem_id="moderation"
        )
    return gr.Checkbox(rules.default_on, label=label, info=info, elem_id="moderation")


def _control(name: str, cap: int) -> gr.components.Component:
    """The page's control for one generation setting, from its declaration."""
    field = GENERATION_FIELDS[name]
    label = f"{field.title} ({field.description})" if field.description else field.title
    elem_id = name.replace("_", "-")
    if field.annotation is bool:
        return gr.Checkbox(field.default, label=label, elem_id=elem_id)
    low, high = bounds(name, cap)
    if name == "seed":
        return gr.Number(RANDOM_SEED, precision=0, minimum=RANDOM_SEED, maximum=high, label=label, elem_id=elem_id)
    integer = isinstance(field.default, int)
    default = min(field.default, high)
    return gr.Slider(low, high, default, step=1 if integer else 0.01, label=label, elem_id=elem_id)


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
        page = Page(**_layout(chat))
        _wire(demo, page, chat)
        add_endpoints(chat)
    return demo


def _layout(chat: Chat) -> dict:
    gr.Markdown(
        "# Orca 2\nMicrosoft's Orca 2, run exactly as its model card does: the ChatML prompt, "
        "the slow tokenizer's ids, greedy decoding unless you ask for sampling. Your chats stay in this browser."
    )
    if get_space():
        # Visitors who want no queue (or other settings) can run their own copy.
        gr.DuplicateButton("Duplicate this Space", size="sm", elem_id="duplicate-space")
    parts = dict(
        model_status=gr.Markdown(_model_status(chat), elem_id="model-status"),
        # Until the model is loaded, the status line follows the loading.
        loading_timer=gr.Timer(1.0, active=not chat.loading.done),
        store=gr.BrowserState(Store().model_dump(), storage_key=STORAGE_KEY, secret=STORAGE_SECRET),
    )
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
        export_json=export_json,
        export_markdown=export_markdown,
        import_json=import_json,
        download=download,
    )


def _settings_column(chat: Chat) -> dict:
    moderation = _moderation_toggle(chat)
    preset = gr.Dropdown(list(SYSTEM_PRESETS), value=DEFAULT_PRESET, label="System message preset", elem_id="preset")
    system_message = gr.Textbox(CAUTIOUS, label="System message", lines=5, max_lines=15, elem_id="system-message")
    with gr.Accordion("Sampling", open=False):
        params = [_control(name, chat.settings.max_new_tokens_cap) for name in PARAM_NAMES]
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
