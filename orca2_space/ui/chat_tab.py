"""The Chat tab: its layout and its events. Send, Retry and Undo stream answers into the chat (Send and
/chat through one function, adapters.turn); the visitor's conversations are kept in their browser (a
gr.BrowserState holding a conversation.Store), listed, opened, deleted, exported and imported.

Events are wired by name: a handler's parameters are the keys of its inputs_kwargs, and it returns
{component: value} for the components it changes (an output it leaves out stays as it is). Every
handler takes the store as the browser sent it and returns the new one; the server keeps nothing
between requests.
"""

import html
from dataclasses import dataclass

import gradio as gr
from gradio.blocks import Block
from gradio.components import Component

from ..chat import Chat, ChatUpdate
from ..conversation import STORE_ROOM, Conversation, LookedAt, Room, Store, answer_keys, json_room, parse_export
from ..presets import CAUTIOUS, DEFAULT_PRESET, EXAMPLE_LABELS, EXAMPLES
from ..render import CHATBOT_OPTIONS
from .adapters import (
    GENERATION_CONCURRENCY_ID,
    INSTANT,
    NOT_KEPT,
    PAGE_WORK,
    SCORING_CONCURRENCY,
    STORAGE_SECRET,
    EventOptions,
    admitted,
    download,
    exchange_of,
    history_messages,
    read_upload,
    turn,
    visitor_errors,
    visitor_of,
    wire_download,
)
from .controls import moderation_toggle, preset_picker, question_row, setting_controls, setting_values, wire_preset
from .messages import chat_messages, exchange_at, imported_status, status
from .tokens import token_view_of

TITLE = "Chat"
ID = "chat-tab"
PURPOSE = (
    "Ask Orca 2 anything (Enter sends, Shift+Enter adds a line) and read its answer exactly as written; "
    "the system message sets the reasoning strategy it is asked to use."
)
TOKENS_PURPOSE = (
    "See where Orca 2 was sure and where it hesitated: click an answer in the chat (or the button) to colour "
    "each of its tokens by the probability the model gave it."
)
SINGLE_TURN_INFO = (
    "On: each question is answered on its own, as Orca 2's card intends (it was not tuned for chat) and its "
    "paper evaluates. Off: earlier turns are sent too."
)
CSS = """
#answer-status { min-height: 1.5em; }
#chatbot { height: min(62vh, 620px) !important; }
@media (max-width: 640px) { #chatbot { height: 55vh !important; } }
/* The Chatbot's toolbar holds only its unlabelled trash button (buttons=[]): it looks like Delete, and
   "+ New chat" and "🗑 Delete" above say what they do. */
#chatbot .icon-button-wrapper { display: none; }
/* A chat's title (its first question) cut short says so, before the dropdown's caret (which Gradio
   lays over the input's end). */
#chats input { text-overflow: ellipsis; padding-right: 24px; }
/* What the browser can't keep, or soon won't: read before the chat; no room taken when all is well. */
#storage-notice:not(:has(p)) { display: none; }
#storage-notice p { margin: 0; padding: 6px 10px; border-left: 3px solid var(--color-accent);
    background: var(--background-fill-secondary); border-radius: 4px; }
"""
# Past this share of the browser's room for chats, the page says the oldest will make way.
NEARLY_FULL = 0.8
# Opening the page puts the cursor in the message box without scrolling to it (autofocus would: on
# a phone, to below the chat).
FOCUS_JS = "() => document.querySelector('#message textarea')?.focus({preventScroll: true})"


@dataclass
class ChatTab:
    """The components the events are wired to."""

    store: gr.BrowserState
    # The token probabilities the visitor looked at, for the exports (conversation.LookedAt).
    looked: gr.BrowserState
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
    # What the browser can't keep, or will soon make way for (Room).
    storage: gr.HTML
    moderation: gr.Checkbox
    preset: gr.Dropdown
    system_message: gr.Textbox
    # The generation settings' controls, by their names in GenerationParams.
    params: dict[str, Component]
    inspect: gr.Button
    inspect_count: gr.Markdown
    inspect_text: gr.Code
    inspect_ids: gr.Textbox


def build(demo: gr.Blocks, chat: Chat) -> None:
    """The tab's layout and events (inside its gr.Tab)."""
    gr.Markdown(PURPOSE, elem_classes="purpose")
    tab = layout(chat)
    _wire(demo, tab, ChatEvents(chat, tab))
    demo.load(None, js=FOCUS_JS, **INSTANT)


def layout(chat: Chat) -> ChatTab:
    store = gr.BrowserState(Store().model_dump(), storage_key="orca2-space-conversations", secret=STORAGE_SECRET)
    looked = gr.BrowserState(LookedAt().model_dump(), storage_key="orca2-space-looked-at", secret=STORAGE_SECRET)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            conversation = _conversation_column()
        with gr.Column(scale=2, min_width=280):
            settings = _settings_column(chat)
    return ChatTab(store=store, looked=looked, **conversation, **settings)


def _conversation_column() -> dict:
    with gr.Row(equal_height=False):
        # On a phone the list has a row of its own (the buttons go below it), room for a title to read.
        chats = gr.Dropdown([], label="Your chats (kept in this browser)", scale=4, min_width=300, elem_id="chats")
        new_chat = gr.Button("+ New chat", size="sm", scale=1, min_width=90, elem_id="new-chat")
        delete_chat = gr.Button("🗑 Delete", size="sm", scale=1, min_width=80, elem_id="delete-chat")
    storage = gr.HTML(elem_id="storage-notice")
    chatbot = gr.Chatbot(
        label="Chat",
        show_label=False,
        elem_id="chatbot",
        # No copy buttons: they would copy the HTML that shows the text, not the text.
        buttons=[],
        feedback_options=None,
        **CHATBOT_OPTIONS,
    )
    message, send, stop = question_row("Ask Orca 2…", "", "Send", "send")
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
    gr.Examples(EXAMPLES, inputs=[message], label="Examples from the model card", example_labels=EXAMPLE_LABELS)
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
        storage=storage,
    )


def _settings_column(chat: Chat) -> dict:
    moderation = moderation_toggle(chat)
    preset = preset_picker(DEFAULT_PRESET, "System message preset", "preset")
    system_message = gr.Textbox(CAUTIOUS, label="System message", lines=5, max_lines=15, elem_id="system-message")
    with gr.Accordion("Sampling", open=False):
        params = setting_controls(chat.settings.max_new_tokens_cap)
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


class ChatEvents:
    """The handlers; each one's inputs (by parameter name) and outputs are listed where _wire wires it."""

    def __init__(self, chat: Chat, tab: ChatTab):
        self.chat, self.tab = chat, tab

    @visitor_errors
    def respond(
        self, request: gr.Request, *, message, stored, system_message, moderation, single_turn, show_raw, **params
    ):
        t = self.tab
        store = Store.load(stored, self.chat.settings)
        conversation = store.current()
        conversation.room_for_another(self.chat.settings.max_exchanges)
        history = history_messages(conversation)
        visitor = visitor_of(request)
        updates = turn(
            self.chat, message, system_message, history, moderation, single_turn, params, request.session_hash, visitor
        )
        update = ChatUpdate("")
        # The store and the list change once the answer is done.
        yield {t.message: "", **self._answering(conversation, show_raw, message, update), **self._busy(True)}
        for update in updates:
            if not update.done:
                yield {**self._answering(conversation, show_raw, message, update), **self._busy(True)}
        conversation.exchanges.append(exchange_of(message, system_message, single_turn, update))
        store = store.save(conversation)
        view = chat_messages(conversation, show_raw)
        yield {
            t.chatbot: view,
            t.answer_status: status(update, single_turn),
            **self._busy(False),
            **self._listed(store),
        }

    @visitor_errors
    def retry(self, request: gr.Request, *, stored, **inputs):
        """The last answer again, with the settings as they are now."""
        store = Store.load(stored, self.chat.settings)
        conversation = store.current()
        if not conversation.exchanges:
            raise gr.Error("Nothing to retry yet.")
        last = conversation.exchanges.pop()
        yield from self.respond(request, message=last.question, stored=store.save(conversation).model_dump(), **inputs)

    def stop(self, request: gr.Request) -> None:
        # An answer without a session has no owner to stop it by (see respond).
        if request.session_hash is not None:
            self.chat.stop(request.session_hash)

    # The page's own events below read, show or export what the browser keeps (work that follows its
    # size): each holds a place in the visitor's fair share while it runs.

    @visitor_errors
    def undo(self, request: gr.Request, *, stored, show_raw) -> dict:
        """Take the last exchange back; its question returns to the message box."""
        t = self.tab
        with admitted(self.chat, request):
            store = Store.load(stored, self.chat.settings)
            conversation = store.current()
            question = conversation.exchanges.pop().question if conversation.exchanges else ""
            store = store.save(conversation)
            return {
                t.chatbot: chat_messages(conversation, show_raw),
                t.message: question,
                t.answer_status: "",
                **self._listed(store),
            }

    @visitor_errors
    def new(self, request: gr.Request, *, stored) -> dict:
        with admitted(self.chat, request):
            return self._cleared(Store.load(stored, self.chat.settings).model_copy(update={"open": None}))

    @visitor_errors
    def delete(self, request: gr.Request, *, stored) -> dict:
        with admitted(self.chat, request):
            store = Store.load(stored, self.chat.settings)
            return self._cleared(store.delete(store.open))

    @visitor_errors
    def open(self, request: gr.Request, *, conversation_id, stored, show_raw) -> dict:
        t = self.tab
        with admitted(self.chat, request):
            store = Store.load(stored, self.chat.settings).model_copy(update={"open": conversation_id})
            conversation = store.current()
            shown = {t.chatbot: chat_messages(conversation, show_raw), t.answer_status: "", t.store: store.model_dump()}
            return shown | self._restored(conversation)

    @visitor_errors
    def show(self, request: gr.Request, *, stored, show_raw) -> dict:
        """The open conversation, as the page loads or the raw switch changes."""
        t = self.tab
        with admitted(self.chat, request):
            store = Store.load(stored, self.chat.settings)
            _, room = store.fit()
            return {
                t.chatbot: chat_messages(store.current(), show_raw),
                t.chats: _choices(store),
                t.storage: _notice(room),
            }

    @visitor_errors
    def export_json(self, request: gr.Request, *, stored, looked) -> str:
        with admitted(self.chat, request):
            conversation = Store.load(stored, self.chat.settings).current()
            return download(self.chat, conversation, "json", LookedAt.load(looked))

    @visitor_errors
    def export_markdown(self, request: gr.Request, *, stored, looked) -> str:
        with admitted(self.chat, request):
            conversation = Store.load(stored, self.chat.settings).current()
            return download(self.chat, conversation, "markdown", LookedAt.load(looked))

    @visitor_errors
    def import_(self, request: gr.Request, *, file: dict | None, stored, looked, show_raw) -> dict:
        """A conversation from an exported file, opened and kept; one whose id is taken by another of the
        visitor's chats gets a new one, so that both are kept. The file is not kept (read_upload)."""
        t = self.tab
        data = read_upload(file)
        with admitted(self.chat, request):
            conversation, looked_at = parse_export(data, LookedAt.load(looked), self.chat.settings.max_exchanges)
            store = Store.load(stored, self.chat.settings).save_imported(conversation)
            conversation = store.current()
            shown = {t.chatbot: chat_messages(conversation, show_raw), t.answer_status: imported_status(conversation)}
            return shown | {t.looked: looked_at.model_dump()} | self._listed(store) | self._restored(conversation)

    @visitor_errors
    def inspect(self, request: gr.Request, *, message, stored, system_message, single_turn, max_new_tokens) -> dict:
        """The exact prompt the message box would send."""
        t = self.tab
        history = [] if single_turn else history_messages(Store.load(stored, self.chat.settings).current())
        prompt = self.chat.inspect(message, system_message, history, max_new_tokens, visitor=visitor_of(request))
        dropped = f" · {prompt.dropped_turns} oldest turn(s) left out" if prompt.dropped_turns else ""
        count = f"{prompt.n_tokens} tokens{dropped}"
        return {t.inspect_text: prompt.text, t.inspect_ids: str(prompt.input_ids), t.inspect_count: count}

    @visitor_errors
    def score_last(self, request: gr.Request, *, stored, looked) -> dict:
        conversation = Store.load(stored, self.chat.settings).current()
        if not conversation.exchanges:
            raise gr.Error("No answer yet: ask a question first.")
        return self._tokens(conversation, len(conversation.exchanges) - 1, looked, request)

    @visitor_errors
    def score_picked(self, selected: gr.SelectData, request: gr.Request, *, stored, looked):
        """The token view of the answer clicked in the chat (nothing for a question or a notice)."""
        conversation = Store.load(stored, self.chat.settings).current()
        position = selected.index[0] if isinstance(selected.index, list | tuple) else selected.index
        index = exchange_at(conversation, position)
        return gr.skip() if index is None else self._tokens(conversation, index, looked, request)

    def _tokens(self, conversation: Conversation, index: int, looked, request: gr.Request) -> dict:
        """The answer's token view; its tokens are kept for the exports."""
        t = self.tab
        caption = f"Answer {index + 1}: {conversation.exchanges[index].question}"
        view = token_view_of(self.chat, conversation, index, _clip(caption), visitor_of(request))
        shown = {t.tokens_box: gr.Accordion(open=True), t.tokens: view.html}
        if view.tokens is None:
            return shown
        key = answer_keys(conversation.exchanges)[index]
        kept = LookedAt.load(looked).add(key, view.tokens)
        if not kept.kept(key):
            shown[t.tokens] = view.html + NOT_KEPT
        return shown | {t.looked: kept.model_dump()}

    def _answering(self, conversation: Conversation, show_raw, question: str, update: ChatUpdate) -> dict:
        view = chat_messages(conversation, show_raw, question, update)
        return {self.tab.chatbot: view, self.tab.answer_status: status(update)}

    def _busy(self, busy: bool) -> dict:
        """While an answer streams, Stop takes Send's place."""
        return {self.tab.send: gr.update(visible=not busy), self.tab.stop: gr.update(visible=busy)}

    def _listed(self, store: Store) -> dict:
        """The store as the browser can keep it (the oldest chats making way), listed, and a notice of what it can't keep."""
        store, room = store.fit()
        return {self.tab.store: store.model_dump(), self.tab.chats: _choices(store), self.tab.storage: _notice(room)}

    def _cleared(self, store: Store) -> dict:
        return {self.tab.chatbot: [], self.tab.answer_status: ""} | self._listed(store)

    def _restored(self, conversation: Conversation) -> dict:
        """System message, single-turn switch and settings as the last exchange used them (to redo it)."""
        if not conversation.exchanges:
            return {}
        t, last = self.tab, conversation.exchanges[-1]
        settings = {t.params[name]: value for name, value in setting_values(last.settings).items()}
        return {t.system_message: last.system_message, t.single_turn: last.single_turn, **settings}


def _wire(demo: gr.Blocks, t: ChatTab, events: ChatEvents) -> None:
    shown: dict[str, Block] = dict(stored=t.store, show_raw=t.raw)
    listed = [t.store, t.chats, t.storage]
    restored = [t.system_message, t.single_turn, *t.params.values()]
    demo.load(events.show, inputs_kwargs=shown, outputs=[t.chatbot, t.chats, t.storage], **PAGE_WORK)
    t.raw.change(events.show, inputs_kwargs=shown, outputs=[t.chatbot, t.chats, t.storage], **PAGE_WORK)

    # gr.on takes these as dict[str, Component | BlockContext], click as dict[str, Block]: retry gets a copy.
    answer: dict[str, Component] = dict(
        stored=t.store,
        system_message=t.system_message,
        moderation=t.moderation,
        single_turn=t.single_turn,
        show_raw=t.raw,
        **t.params,
    )
    answering = [t.message, t.chatbot, t.answer_status, t.send, t.stop, *listed]
    generation: EventOptions = {"concurrency_id": GENERATION_CONCURRENCY_ID, "api_visibility": "private"}
    gr.on(
        [t.send.click, t.message.submit],
        events.respond,
        inputs_kwargs=dict(message=t.message, **answer),
        outputs=answering,
        **generation,
    )
    t.retry.click(events.retry, inputs_kwargs=dict(answer), outputs=answering, **generation)
    t.stop.click(events.stop, None, None, **INSTANT)
    t.undo.click(
        events.undo, inputs_kwargs=shown, outputs=[t.chatbot, t.message, t.answer_status, *listed], **PAGE_WORK
    )
    cleared = [t.chatbot, t.answer_status, *listed]
    t.new_chat.click(events.new, inputs_kwargs=dict(stored=t.store), outputs=cleared, **PAGE_WORK)
    t.delete_chat.click(events.delete, inputs_kwargs=dict(stored=t.store), outputs=cleared, **PAGE_WORK)
    t.chats.input(
        events.open,
        inputs_kwargs=dict(conversation_id=t.chats, **shown),
        outputs=[t.chatbot, t.answer_status, t.store, *restored],
        **PAGE_WORK,
    )
    t.import_json.upload(
        events.import_,
        inputs_kwargs=dict(file=t.import_json, looked=t.looked, **shown),
        outputs=[t.chatbot, t.answer_status, t.looked, *listed, *restored],
        # The file as uploaded (read_upload).
        preprocess=False,
        **PAGE_WORK,
    )
    wire_download(t.export_json, events.export_json, t.download, stored=t.store, looked=t.looked)
    wire_download(t.export_markdown, events.export_markdown, t.download, stored=t.store, looked=t.looked)
    wire_preset(t.preset, t.system_message)
    t.inspect.click(
        events.inspect,
        inputs_kwargs=dict(
            message=t.message,
            stored=t.store,
            system_message=t.system_message,
            single_turn=t.single_turn,
            max_new_tokens=t.params["max_new_tokens"],
        ),
        outputs=[t.inspect_text, t.inspect_ids, t.inspect_count],
        **PAGE_WORK,
    )
    scoring: EventOptions = {**SCORING_CONCURRENCY, "api_visibility": "private"}
    scored_inputs: dict[str, Block] = dict(stored=t.store, looked=t.looked)
    scored = [t.tokens_box, t.tokens, t.looked]
    t.score_last.click(events.score_last, inputs_kwargs=scored_inputs, outputs=scored, **scoring)
    t.chatbot.select(events.score_picked, inputs_kwargs=scored_inputs, outputs=scored, **scoring)


def _choices(store: Store) -> dict:
    """The update for the list of the visitor's conversations."""
    return gr.update(choices=[(c.title, c.id) for c in store.conversations], value=store.open)


def _notice(room: Room) -> str:
    """What the visitor should know about their browser's room for chats: what it can't keep, what made
    way, or that it is nearly full; nothing otherwise."""
    room_mb = f"{json_room(STORE_ROOM) / 1e6:.1f} MB"
    if room.overflowing:
        text = (
            f"This chat is larger than your browser's room for chats ({room_mb}), so it can't be kept: it is "
            "lost when you leave or reload this page. Export it (⤓ JSON) to keep it."
        )
    elif room.dropped:
        titles = ", ".join(f"“{title}”" for title in room.dropped)
        text = (
            f"Your browser's room for chats ({room_mb}) was full, so the oldest made way and are no longer kept "
            f"here: {titles}. Export (⤓ JSON) the chats you want to keep; ⤒ Import brings one back."
        )
    elif room.share >= NEARLY_FULL:
        text = (
            f"Your browser's room for chats is {room.share:.0%} full ({room_mb} in all). When it is full, the "
            "oldest chats make way for new ones: export (⤓ JSON) the ones you want to keep."
        )
    else:
        return ""
    return f'<p role="status">{html.escape(text)}</p>'


def _clip(text: str, limit: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
