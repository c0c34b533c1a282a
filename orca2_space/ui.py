"""The page and the API endpoints: layout and event wiring only; the work is in chat.py."""

import html
from collections.abc import Iterator

import gradio as gr
from gradio.utils import get_space

from .chat import Chat, ChatUpdate, split_last_question, system_message_for
from .settings import GenerationParams, InvalidRequest
from .presets import CAUTIOUS, DEFAULT_PRESET, EXAMPLES, SYSTEM_PRESETS
from .prompt import PromptTooLong

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
_DEFAULTS = GenerationParams()
_PARAM_NAMES = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed")


_MODERATION_STATUS = {
    "pending": "🛡 Each sentence is shown once moderation has passed it",
    "passed": "🛡 Moderated",
    "flagged": "🛡 Withheld by moderation",
    "unavailable": "⚠️ Moderation unavailable",
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
        return gr.Checkbox(True, label=label, interactive=False, info=f"Required on this server. {info}", elem_id="moderation")
    return gr.Checkbox(rules.default_on, label=label, info=info, elem_id="moderation")


def build(chat: Chat) -> gr.Blocks:
    cap = chat.settings.max_new_tokens_cap

    def respond_ui(
        message, history, system_message, moderation,
        do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
        request: gr.Request,
    ) -> Iterator:
        params = dict(zip(_PARAM_NAMES, (do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)))
        try:
            chat_request = chat.request(message, system_message, history, moderation=moderation, **params)
        except InvalidRequest as error:
            raise gr.Error(str(error)) from error
        busy = (gr.update(visible=False), gr.update(visible=True))
        yield "", _chat_messages(history, message, ChatUpdate("")), _status(ChatUpdate("")), *busy
        update = ChatUpdate("")
        for update in chat.respond(chat_request, owner=request.session_hash):
            if not update.done:
                yield gr.skip(), _chat_messages(history, message, update), _status(update), *busy
        yield gr.skip(), _chat_messages(history, message, update), _status(update), gr.update(visible=True), gr.update(visible=False)

    def retry(
        history, system_message, moderation,
        do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
        request: gr.Request,
    ):
        earlier, message = split_last_question(history)
        if not message:
            raise gr.Error("Nothing to retry yet.")
        yield from respond_ui(
            message, earlier, system_message, moderation,
            do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, request,
        )

    def undo(history):
        earlier, message = split_last_question(history)
        return earlier, message, ""

    def stop(request: gr.Request):
        chat.stop(request.session_hash)

    def inspect_ui(message, history, system_message, max_new_tokens):
        try:
            prompt = chat.inspect(message, system_message, history, max_new_tokens)
        except (InvalidRequest, PromptTooLong) as error:
            raise gr.Error(str(error)) from error
        dropped = f" · {prompt.dropped_turns} oldest turn(s) left out" if prompt.dropped_turns else ""
        return prompt.text, str(prompt.input_ids), f"{prompt.n_tokens} tokens{dropped}"

    with gr.Blocks(title="Orca 2") as demo:
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
                chatbot = gr.Chatbot(label="Chat", show_label=False, elem_id="chatbot", buttons=["copy", "copy_all"], feedback_options=None)
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Ask Orca 2…", show_label=False, scale=5, lines=2, max_lines=12, elem_id="message", autofocus=True
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                    stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=80, visible=False, elem_id="stop")
                with gr.Row():
                    retry_button = gr.Button("↻ Retry", size="sm", min_width=60, elem_id="retry")
                    undo_button = gr.Button("↶ Undo", size="sm", min_width=60, elem_id="undo")
                    clear_button = gr.Button("🗑 Clear", size="sm", min_width=60, elem_id="clear")
                answer_status = gr.HTML(elem_id="answer-status")
                gr.Examples(EXAMPLES, inputs=[message], label="Examples from the model card")
            with gr.Column(scale=2, min_width=280):
                moderation = _moderation_toggle(chat)
                preset = gr.Dropdown(list(SYSTEM_PRESETS), value=DEFAULT_PRESET, label="System message preset", elem_id="preset")
                system_message = gr.Textbox(CAUTIOUS, label="System message", lines=5, max_lines=15, elem_id="system-message")
                with gr.Accordion("Sampling", open=False):
                    do_sample = gr.Checkbox(_DEFAULTS.do_sample, label="Sample (off: greedy decoding, as in the paper)", elem_id="do-sample")
                    temperature = gr.Slider(0.01, 2.0, _DEFAULTS.temperature, step=0.01, label="Temperature")
                    top_p = gr.Slider(0.01, 1.0, _DEFAULTS.top_p, step=0.01, label="Top-p")
                    top_k = gr.Slider(0, 200, _DEFAULTS.top_k, step=1, label="Top-k (0: off)")
                    repetition_penalty = gr.Slider(1.0, 2.0, _DEFAULTS.repetition_penalty, step=0.01, label="Repetition penalty")
                    max_new_tokens = gr.Slider(1, cap, min(_DEFAULTS.max_new_tokens, cap), step=1, label="Max new tokens", elem_id="max-new-tokens")
                    seed = gr.Number(-1, precision=0, label="Seed (-1: a new one each answer)", elem_id="seed")
                with gr.Accordion("Prompt inspector", open=False):
                    inspect_button = gr.Button("Show the prompt for the message box", size="sm", elem_id="inspect")
                    inspect_count = gr.Markdown(elem_id="inspect-count")
                    inspect_text = gr.Code(label="ChatML text", language=None, wrap_lines=True, max_lines=20, elem_id="inspect-text")
                    inspect_ids = gr.Textbox(label="Input ids", lines=4, max_lines=10, elem_id="inspect-ids")

        def refresh_model_status():
            return _model_status(chat), gr.Timer(active=not chat.loading.done)

        loading_timer.tick(refresh_model_status, None, [model_status, loading_timer], queue=False, api_visibility="private")
        demo.load(refresh_model_status, None, [model_status, loading_timer], queue=False, api_visibility="private")
        params = [do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed]
        busy_outputs = [message, chatbot, answer_status, send, stop_button]
        generation = dict(concurrency_id=GENERATION_CONCURRENCY_ID, api_visibility="private")
        for trigger in (send.click, message.submit):
            trigger(respond_ui, [message, chatbot, system_message, moderation, *params], busy_outputs, **generation)
        retry_button.click(retry, [chatbot, system_message, moderation, *params], busy_outputs, **generation)
        stop_button.click(stop, None, None, queue=False, api_visibility="private")
        undo_button.click(undo, [chatbot], [chatbot, message, answer_status], queue=False, api_visibility="private")
        clear_button.click(lambda: ([], ""), None, [chatbot, answer_status], queue=False, api_visibility="private")
        preset.change(lambda name: SYSTEM_PRESETS[name], [preset], [system_message], queue=False, api_visibility="private")
        inspect_button.click(
            inspect_ui, [message, chatbot, system_message, max_new_tokens], [inspect_text, inspect_ids, inspect_count],
            queue=False, api_visibility="private",
        )

        def chat_endpoint(
            message: str,
            system_message: str | None = None,
            preset: str | None = None,
            history: list[dict] | None = None,
            do_sample: bool = _DEFAULTS.do_sample,
            temperature: float = _DEFAULTS.temperature,
            top_p: float = _DEFAULTS.top_p,
            top_k: int = _DEFAULTS.top_k,
            repetition_penalty: float = _DEFAULTS.repetition_penalty,
            max_new_tokens: int = _DEFAULTS.max_new_tokens,
            seed: int | None = None,
            moderation: bool | None = None,
        ) -> Iterator[dict]:
            """Stream Orca 2's answer. Each update: answer so far, done, error, stop_reason, n_tokens,
            tokens_per_second, seed, notices, moderation, withheld. system_message or preset (a preset's
            name; neither: the model card's cautious message). history: earlier {"role", "content"}
            messages. moderation: None for the server's default; the server may require it."""
            settings = dict(zip(_PARAM_NAMES, (do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)))
            try:
                system = system_message_for(system_message, preset)
                chat_request = chat.request(message, system, history, moderation=moderation, **settings)
            except InvalidRequest as error:
                raise gr.Error(str(error)) from error
            for update in chat.respond(chat_request):
                yield update.as_api_dict()

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
                prompt = chat.inspect(message, system_message_for(system_message, preset), history, max_new_tokens)
            except (InvalidRequest, PromptTooLong) as error:
                raise gr.Error(str(error)) from error
            return {"text": prompt.text, "input_ids": prompt.input_ids, "n_tokens": prompt.n_tokens}

        gr.api(chat_endpoint, api_name="chat", concurrency_id=GENERATION_CONCURRENCY_ID)
        gr.api(inspect_prompt, api_name="inspect_prompt", concurrency_limit=None)
    return demo
