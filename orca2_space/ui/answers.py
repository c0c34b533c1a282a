"""The page's conversation: Send, Retry and Undo stream answers into it, and the visitor's
conversations are kept in their browser (a gr.BrowserState holding a conversation.Store), listed,
opened, deleted, exported and imported.

Every handler takes the store as the browser sent it and returns the new one; the server keeps
nothing between requests.
"""

import json

import gradio as gr

from ..chat import Chat, ChatUpdate
from ..conversation import Conversation, Exchange, Stats, Store, export, parse_export, to_markdown
from ..fairness import Refused, Visitor
from ..prompt import PromptTooLong
from ..settings import GENERATION_FIELDS, RANDOM_SEED, GenerationParams, InvalidRequest
from .messages import chat_messages, status

PARAM_NAMES = tuple(GENERATION_FIELDS)
# The browser keeps the visitor's conversations and last comparison (gr.BrowserState). Gradio sends the
# secret to the page, so it hides nothing from the visitor; a fixed one keeps them readable after a
# server restart.
STORAGE_SECRET = "orca2-space"
# Answers and comparisons share one concurrency group, sized to let every request fairness.py admits
# straight in: the model's own scheduler (the batch, or the engine's turn) is where they wait.
GENERATION_CONCURRENCY_ID = "generation"
# Re-scoring an answer is one forward pass over up to a whole context: one at a time.
SCORING_CONCURRENCY = dict(concurrency_id="scoring", concurrency_limit=1)

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


def turn(
    chat: Chat,
    message,
    system_message,
    history,
    moderation,
    single_turn,
    params: dict,
    owner: str | None,
    visitor: Visitor,
):
    """One answer's updates, for the page and /chat alike; bad input is a gr.Error naming the field."""
    try:
        request = chat.request(message, system_message, history, moderation, single_turn, **params)
    except InvalidRequest as error:
        raise gr.Error(str(error)) from error
    return _errors_shown(chat.respond(request, owner=owner, visitor=visitor))


def _errors_shown(updates):
    """A request over the visitor's fair share is refused as its stream starts: they read why."""
    try:
        yield from updates
    except Refused as error:
        raise gr.Error(str(error)) from error


def visitor_of(request: gr.Request) -> Visitor:
    """A page session or API client, and its address (guard.py reads it as --trusted-proxies says)."""
    address = request.client.host if request.client else "unknown"
    return Visitor(request.session_hash or f"address {address}", address)


def comparison(chat: Chat, message, system_messages, moderation, params: dict, owner: str | None, visitor: Visitor):
    """The side-by-side answers' updates, for the page and /compare alike."""
    try:
        requests = chat.compare_requests(message, system_messages, moderation, **params)
    except InvalidRequest as error:
        raise gr.Error(str(error)) from error
    return _errors_shown(chat.compare(requests, owner=owner, visitor=visitor))


def history_messages(conversation: Conversation) -> list[dict]:
    return [
        message
        for t in conversation.history()
        for message in ({"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})
    ]


def chat_choices(store: Store) -> dict:
    """The update for the list of the visitor's conversations."""
    return gr.update(choices=[(c.title, c.id) for c in store.conversations], value=store.open)


def controls(exchange: Exchange | None) -> list:
    """System message, single-turn switch and settings as an exchange used them (to redo it)."""
    if exchange is None:
        return [gr.skip()] * (2 + len(PARAM_NAMES))
    settings = exchange.settings.model_dump()
    settings["seed"] = RANDOM_SEED if settings["seed"] is None else settings["seed"]
    return [exchange.system_message, exchange.single_turn, *(settings[name] for name in PARAM_NAMES)]


class ConversationEvents:
    """The handlers; each one's inputs and outputs are listed where page.py wires it."""

    def __init__(self, chat: Chat):
        self.chat = chat

    # The request comes first: Gradio inserts it by position, and the settings are *values.
    def respond(self, request: gr.Request, message, stored, system_message, moderation, single_turn, show_raw, *values):
        store = Store.load(stored)
        conversation = store.current()
        history = history_messages(conversation)
        params = dict(zip(PARAM_NAMES, values))
        owner = request.session_hash
        updates = turn(
            self.chat, message, system_message, history, moderation, single_turn, params, owner, visitor_of(request)
        )
        busy = (gr.update(visible=False), gr.update(visible=True))
        unchanged = (gr.skip(), gr.skip())  # the store and the list change once the answer is done
        update = ChatUpdate("")
        yield "", chat_messages(conversation, show_raw, message, update), status(update), *busy, *unchanged
        for update in updates:
            if not update.done:
                view = chat_messages(conversation, show_raw, message, update)
                yield gr.skip(), view, status(update), *busy, *unchanged
        conversation.exchanges.append(exchange_of(message, system_message, single_turn, update))
        store = store.save(conversation)
        view = chat_messages(conversation, show_raw)
        yield gr.skip(), view, status(update, single_turn), *reversed(busy), store.model_dump(), chat_choices(store)

    def retry(self, request: gr.Request, stored, *inputs):
        store = Store.load(stored)
        conversation = store.current()
        if not conversation.exchanges:
            raise gr.Error("Nothing to retry yet.")
        last = conversation.exchanges.pop()
        yield from self.respond(request, last.question, store.save(conversation).model_dump(), *inputs)

    def undo(self, stored, show_raw):
        """Take the last exchange back; its question returns to the message box."""
        store = Store.load(stored)
        conversation = store.current()
        question = conversation.exchanges.pop().question if conversation.exchanges else ""
        store = store.save(conversation)
        return chat_messages(conversation, show_raw), question, "", store.model_dump(), chat_choices(store)

    def new(self, stored):
        store = Store.load(stored).model_copy(update={"open": None})
        return [], "", store.model_dump(), chat_choices(store)

    def open(self, conversation_id, stored, show_raw):
        store = Store.load(stored).model_copy(update={"open": conversation_id})
        conversation = store.current()
        last = conversation.exchanges[-1] if conversation.exchanges else None
        return chat_messages(conversation, show_raw), "", store.model_dump(), *controls(last)

    def delete(self, stored):
        store = Store.load(stored)
        store = store.delete(store.open)
        return [], "", store.model_dump(), chat_choices(store)

    def show(self, stored, show_raw):
        """The open conversation, as the page loads or the raw switch changes."""
        store = Store.load(stored)
        return chat_messages(store.current(), show_raw), chat_choices(store)

    def export_json(self, stored) -> str:
        return self._export(stored, "json")

    def export_markdown(self, stored) -> str:
        return self._export(stored, "markdown")

    def _export(self, stored, kind: str) -> str:
        return download(self.chat, Store.load(stored).current(), kind)

    def import_(self, data: bytes, stored, show_raw):
        try:
            conversation = parse_export(data)
        except InvalidRequest as error:
            raise gr.Error(str(error)) from error
        store = Store.load(stored).save(conversation)
        last = conversation.exchanges[-1] if conversation.exchanges else None
        view = chat_messages(conversation, show_raw)
        return view, "", store.model_dump(), chat_choices(store), *controls(last)


def download(chat: Chat, conversation: Conversation, kind: str) -> str:
    """What the browser downloads: {"filename", "mime", "text"} as JSON (see DOWNLOAD_JS)."""
    if not conversation.exchanges:
        raise gr.Error("Nothing to export yet: ask a question first.")
    prompts = [_prompt_ids(chat, conversation, index) for index in range(len(conversation.exchanges))]
    exported = export(conversation, chat.backend.info, prompts)
    name = f"orca2-{conversation.created[:10]}-{conversation.id}"
    if kind == "markdown":
        return _download(f"{name}.md", "text/markdown", to_markdown(exported))
    return _download(f"{name}.json", "application/json", exported.model_dump_json(indent=2))


def _prompt_ids(chat: Chat, conversation: Conversation, index: int) -> list[int]:
    """The ids the model read for an exchange, rebuilt from the record as it was then."""
    e = conversation.exchanges[index]
    earlier = Conversation(exchanges=conversation.exchanges[:index])
    history = [] if e.single_turn else history_messages(earlier)
    try:
        return chat.inspect(e.question, e.system_message, history, e.settings.max_new_tokens).input_ids
    except (InvalidRequest, PromptTooLong):
        return []


def exchange_of(question: str, system_message: str, single_turn: bool, update: ChatUpdate) -> Exchange:
    settings = update.params or GenerationParams()
    return Exchange(
        question=question,
        answer=update.answer,
        system_message=system_message,
        single_turn=bool(single_turn),
        settings=settings,
        answer_ids=update.answer_ids,
        stats=Stats.of(update.stats) if update.stats else None,
        moderation=update.moderation,
        withheld=update.withheld,
        error=update.error,
    )


def _download(filename: str, mime: str, text: str) -> str:
    return json.dumps({"filename": filename, "mime": mime, "text": text})
