"""The page and the API endpoints: layout and event wiring only; the work is in chat.py.

The sampling controls and /chat's parameters are derived from settings.GenerationParams, and the
page's Send and /chat stream through one function, `_turn`, so they can't drift apart.
"""

import html
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio.utils import get_space

from .chat import Chat, ChatUpdate, split_last_question, system_message_for
from .moderation import ModerationState
from .presets import CAUTIOUS, DEFAULT_PRESET, EXAMPLES, SYSTEM_PRESETS
from .prompt import PromptTooLong
from .settings import GENERATION_FIELDS, RANDOM_SEED, InvalidRequest, bounds

CSS = """
#answer-status { min-height: 1.5em; }
#chatbot { height: min(62vh, 620px) !important; }
@media (max-width: 640px) {
  #chatbot { height: 55vh !important; }
  .gradio-container { padding: 4px !important; }
}
"""
THEME = gr.themes.Soft(primary_hue="indigo")
GENERATION_CONCURRENCY_ID = "generation"
PARAM_NAMES = tuple(GENERATION_FIELDS)


_MODERATION_STATUS = {
    ModerationState.PENDING: "🛡 Each sentence is shown once moderation has passed it",
    ModerationState.PASSED: "🛡 Moderated",
    ModerationState.FLAGGED: "🛡 Withheld by moderation",
    ModerationState.UNAVAILABLE: "⚠️ Moderation unavailable",
}


def _status(update: ChatUpdate) -> str:
    """The answer's status line. data-state="done" is the stable "answer finished" signal for tests
    and scripts; role=status lets screen readers announce it."""
    if update.withheld:
        outcome, line = "withheld", update.withheld
    elif update.error:
        outcome, line = "error", f"⚠️ {update.error}"
    elif update.waiting:
        outcome, line = "waiting", f"⏳ {update.waiting}"
    elif not update.done:
        outcome, line = "streaming", "⏳ Generating…"
    else:
        s = update.stats
        outcome = s.stop_reason
        label = {"end_of_turn": "✅ Done", "length": "✅ Done (max new tokens reached)", "stopped": "⏹ Stopped"}
        mode = f"seed {s.seed}" if s.seed is not None else "greedy"
        line = f"{label.get(outcome, outcome)} · {s.n_tokens} tokens · {s.tokens_per_second:.1f} tokens/s · {mode}"
    lines = [line]
    if update.moderation in _MODERATION_STATUS:
        lines.append(_MODERATION_STATUS[update.moderation])
    lines += [f"ℹ️ {n}" for n in update.notices]
    state = "done" if update.done else "streaming"
    body = "<br>".join(html.escape(item) for item in lines)
    return f'<div role="status" aria-live="polite" data-state="{state}" data-outcome="{outcome}">{body}</div>'


def _chat_messages(history: list, message: str, update: ChatUpdate) -> list:
    messages = [*history, {"role": "user", "content": message}]
    if update.withheld:
        # A titled message is a notice: chat.turns_from_messages never sends it back to the model.
        return [*messages, {"role": "assistant", "content": update.withheld, "metadata": {"title": "🛡 Moderation"}}]
    if update.answer or not (update.error or update.waiting):
        messages.append({"role": "assistant", "content": update.answer})
    if update.error:
        messages.append({"role": "assistant", "content": update.error, "metadata": {"title": "⚠️ Error"}})
    return messages


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
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    undo: gr.Button
    clear: gr.Button
    answer_status: gr.HTML
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
        page = _layout(chat)
        _wire(demo, page, chat)
        _api(chat)
    return demo


def _layout(chat: Chat) -> Page:
    gr.Markdown(
        "# Orca 2\nMicrosoft's Orca 2, run exactly as its model card does: the ChatML prompt, "
        "the slow tokenizer's ids, greedy decoding unless you ask for sampling."
    )
    if get_space():
        # Visitors who want no queue (or other settings) can run their own copy.
        gr.DuplicateButton("Duplicate this Space", size="sm", elem_id="duplicate-space")
    model_status = gr.Markdown(_model_status(chat), elem_id="model-status")
    # Until the model is loaded, the status line follows the loading.
    loading_timer = gr.Timer(1.0, active=not chat.loading.done)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            conversation = _conversation_column()
        with gr.Column(scale=2, min_width=280):
            moderation = _moderation_toggle(chat)
            preset = gr.Dropdown(
                list(SYSTEM_PRESETS), value=DEFAULT_PRESET, label="System message preset", elem_id="preset"
            )
            system_message = gr.Textbox(
                CAUTIOUS, label="System message", lines=5, max_lines=15, elem_id="system-message"
            )
            with gr.Accordion("Sampling", open=False):
                params = [_control(name, chat.settings.max_new_tokens_cap) for name in PARAM_NAMES]
            with gr.Accordion("Prompt inspector", open=False):
                inspector = dict(
                    inspect=gr.Button("Show the prompt for the message box", size="sm", elem_id="inspect"),
                    inspect_count=gr.Markdown(elem_id="inspect-count"),
                    inspect_text=gr.Code(
                        label="ChatML text", language=None, wrap_lines=True, max_lines=20, elem_id="inspect-text"
                    ),
                    inspect_ids=gr.Textbox(label="Input ids", lines=4, max_lines=10, elem_id="inspect-ids"),
                )
    return Page(
        model_status,
        loading_timer,
        **conversation,
        moderation=moderation,
        preset=preset,
        system_message=system_message,
        params=params,
        **inspector,
    )


def _conversation_column() -> dict[str, Any]:
    chatbot = gr.Chatbot(
        label="Chat", show_label=False, elem_id="chatbot", buttons=["copy", "copy_all"], feedback_options=None
    )
    with gr.Row():
        message = gr.Textbox(
            placeholder="Ask Orca 2…",
            show_label=False,
            scale=5,
            lines=2,
            max_lines=12,
            elem_id="message",
            autofocus=True,
        )
        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, visible=False, elem_id="stop")
    with gr.Row():
        retry = gr.Button("↻ Retry", size="sm", min_width=60, elem_id="retry")
        undo = gr.Button("↶ Undo", size="sm", min_width=60, elem_id="undo")
        clear = gr.Button("🗑 Clear", size="sm", min_width=60, elem_id="clear")
    answer_status = gr.HTML(elem_id="answer-status")
    gr.Examples(EXAMPLES, inputs=[message], label="Examples from the model card")
    return dict(
        chatbot=chatbot,
        message=message,
        send=send,
        stop=stop,
        retry=retry,
        undo=undo,
        clear=clear,
        answer_status=answer_status,
    )


def _turn(
    chat: Chat, message, system_message, history, moderation, params: dict, owner: str | None
) -> Iterator[ChatUpdate]:
    """One answer's updates, for the page and /chat alike; bad input is a gr.Error naming the field."""
    try:
        request = chat.request(message, system_message, history, moderation=moderation, **params)
    except InvalidRequest as error:
        raise gr.Error(str(error)) from error
    return chat.respond(request, owner=owner)


def _answer_handlers(chat: Chat):
    """Send and Retry on the page: the answer streams into the chat, the status line follows it."""

    # The request comes first: Gradio inserts it by position, and the settings are *values.
    def respond(request: gr.Request, message, history, system_message, moderation, *values) -> Iterator:
        params = dict(zip(PARAM_NAMES, values))
        updates = _turn(chat, message, system_message, history, moderation, params, request.session_hash)
        busy = (gr.update(visible=False), gr.update(visible=True))
        update = ChatUpdate("")
        yield "", _chat_messages(history, message, update), _status(update), *busy
        for update in updates:
            if not update.done:
                yield gr.skip(), _chat_messages(history, message, update), _status(update), *busy
        yield gr.skip(), _chat_messages(history, message, update), _status(update), *reversed(busy)

    def retry(request: gr.Request, history, *inputs):
        earlier, message = split_last_question(history)
        if not message:
            raise gr.Error("Nothing to retry yet.")
        yield from respond(request, message, earlier, *inputs)

    return respond, retry


def _wire(demo: gr.Blocks, page: Page, chat: Chat) -> None:
    private = dict(queue=False, api_visibility="private")
    respond, retry = _answer_handlers(chat)

    def show_prompt(message, history, system_message, max_new_tokens):
        try:
            prompt = chat.inspect(message, system_message, history, max_new_tokens)
        except (InvalidRequest, PromptTooLong) as error:
            raise gr.Error(str(error)) from error
        dropped = f" · {prompt.dropped_turns} oldest turn(s) left out" if prompt.dropped_turns else ""
        return prompt.text, str(prompt.input_ids), f"{prompt.n_tokens} tokens{dropped}"

    def stop(request: gr.Request) -> None:
        chat.stop(request.session_hash)

    def refresh_model_status():
        return _model_status(chat), gr.Timer(active=not chat.loading.done)

    status_outputs = [page.model_status, page.loading_timer]
    page.loading_timer.tick(refresh_model_status, None, status_outputs, **private)
    demo.load(refresh_model_status, None, status_outputs, **private)
    settings = [page.system_message, page.moderation, *page.params]
    busy_outputs = [page.message, page.chatbot, page.answer_status, page.send, page.stop]
    generation = dict(concurrency_id=GENERATION_CONCURRENCY_ID, api_visibility="private")
    gr.on(
        [page.send.click, page.message.submit],
        respond,
        [page.message, page.chatbot, *settings],
        busy_outputs,
        **generation,
    )
    page.retry.click(retry, [page.chatbot, *settings], busy_outputs, **generation)
    page.stop.click(stop, None, None, **private)
    page.undo.click(
        lambda history: (*split_last_question(history), ""),
        [page.chatbot],
        [page.chatbot, page.message, page.answer_status],
        **private,
    )
    page.clear.click(lambda: ([], ""), None, [page.chatbot, page.answer_status], **private)
    page.preset.change(lambda name: SYSTEM_PRESETS[name], [page.preset], [page.system_message], **private)
    max_new_tokens = page.params[PARAM_NAMES.index("max_new_tokens")]
    page.inspect.click(
        show_prompt,
        [page.message, page.chatbot, page.system_message, max_new_tokens],
        [page.inspect_text, page.inspect_ids, page.inspect_count],
        **private,
    )


def _api(chat: Chat) -> None:
    def chat_endpoint(*values) -> Iterator[dict]:
        args = CHAT_SIGNATURE.bind(*values).arguments
        system = _api_system_message(args.pop("system_message"), args.pop("preset"))
        message, history, moderation = args.pop("message"), args.pop("history"), args.pop("moderation")
        for update in _turn(chat, message, system, history, moderation, args, owner=None):
            yield update.as_api_dict()

    chat_endpoint.__signature__ = CHAT_SIGNATURE
    chat_endpoint.__annotations__ = {p.name: p.annotation for p in CHAT_SIGNATURE.parameters.values()}
    chat_endpoint.__doc__ = CHAT_DOC

    def inspect_prompt(
        message: str,
        system_message: str | None = None,
        history: list[dict] | None = None,
        max_new_tokens: int = 0,
        preset: str | None = None,
    ) -> dict:
        """The exact ChatML text and input ids Orca 2 would see (after leaving out old turns so
        that max_new_tokens fit). system_message or preset as for /chat."""
        try:
            prompt = chat.inspect(message, _api_system_message(system_message, preset), history, max_new_tokens)
        except (InvalidRequest, PromptTooLong) as error:
            raise gr.Error(str(error)) from error
        return {"text": prompt.text, "input_ids": prompt.input_ids, "n_tokens": prompt.n_tokens}

    gr.api(chat_endpoint, api_name="chat", concurrency_id=GENERATION_CONCURRENCY_ID)
    gr.api(inspect_prompt, api_name="inspect_prompt", concurrency_limit=None)


def _api_system_message(system_message, preset) -> str:
    try:
        return system_message_for(system_message, preset)
    except InvalidRequest as error:
        raise gr.Error(str(error)) from error


def _chat_signature() -> inspect.Signature:
    """/chat's parameters: the conversation, then every generation setting as declared, then moderation."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    conversation = [
        inspect.Parameter("message", keyword, annotation=str),
        inspect.Parameter("system_message", keyword, default=None, annotation=str | None),
        inspect.Parameter("preset", keyword, default=None, annotation=str | None),
        inspect.Parameter("history", keyword, default=None, annotation=list[dict] | None),
    ]
    settings = [
        inspect.Parameter(name, keyword, default=field.default, annotation=field.annotation)
        for name, field in GENERATION_FIELDS.items()
    ]
    moderation = inspect.Parameter("moderation", keyword, default=None, annotation=bool | None)
    return inspect.Signature([*conversation, *settings, moderation], return_annotation=Iterator[dict])


CHAT_SIGNATURE = _chat_signature()
CHAT_DOC = "\n".join(
    [
        (
            "Stream Orca 2's answer. Each update: answer so far, done, error, stop_reason, n_tokens, "
            "tokens_per_second, seed, notices, moderation, withheld. system_message or preset (a preset's name; "
            'neither: the model card\'s cautious message). history: earlier {"role", "content"} messages. '
            "moderation: None for the server's default; the server may require it."
        ),
        *(
            f"{name}: {field.title}" + (f" ({field.description})" if field.description else "")
            for name, field in GENERATION_FIELDS.items()
        ),
    ]
)
