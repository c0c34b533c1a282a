"""What the tabs and the API endpoints share: one answer's and one comparison's updates (turn,
comparison), who is asking (visitor_of), the records they keep (exchange_of, history_messages),
downloads, where requests wait, and the one way bad input reaches the visitor (visitor_errors).
"""

import contextlib
import functools
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypedDict, TypeVar, cast

import gradio as gr
from gradio.utils import get_upload_folder

from ..backends.contract import GenerationError, ScoringUnavailable
from ..chat import Chat, ChatUpdate
from ..conversation import Conversation, Exchange, LookedAt, Stats, export, export_comparison, to_markdown
from ..fairness import Visitor
from ..prompt import PromptTooLong
from ..settings import GenerationParams, InvalidRequest


class EventOptions(TypedDict, total=False):
    """How an event is queued and shown in the API: the keyword arguments of Gradio's event listeners
    that the tabs share, typed so that a misspelt or mistyped one fails the type check."""

    queue: bool
    api_visibility: Literal["public", "private", "undocumented"]
    concurrency_id: str
    concurrency_limit: int | None


# The browser keeps the visitor's conversations and last comparison (gr.BrowserState). Gradio sends the
# secret to the page, so it hides nothing from the visitor; a fixed one keeps them readable after a
# server restart.
STORAGE_SECRET = "orca2-space"
# Answers and comparisons share one concurrency group, sized to let every request fairness.py admits
# straight in: the model's own scheduler (the batch, or the engine's turn) is where they wait.
GENERATION_CONCURRENCY_ID = "generation"
# Scoring joins them. A scoring job held in Gradio's queue (as one at a time would) is not yet admitted:
# one address could fill the queue with them, and everyone else's answers would be told it is full.
# Admitted straight in, its forward pass takes its turn with the model's others (one_forward_at_a_time).
SCORING_CONCURRENCY: EventOptions = {"concurrency_id": GENERATION_CONCURRENCY_ID}
# A page event that does work (reads, renders or exports what the browser keeps, whose cost follows
# its size) is queued in a group of its own, sized like the answers' so that every request the fair
# share admits starts at once: it never waits behind an answer. Each handler takes a place in the
# visitor's fair share while it runs (admitted), so one visitor can't keep many running.
PAGE_CONCURRENCY_ID = "page"
PAGE_WORK: EventOptions = {"concurrency_id": PAGE_CONCURRENCY_ID, "api_visibility": "private"}
# A page event that does no work (Stop, a preset's text, which columns show, a script in the
# browser): answered at once, off the queue, and not part of the API.
INSTANT: EventOptions = {"queue": False, "api_visibility": "private"}

# Under a token view whose tokens the browser can't keep (conversation.LookedAt.add), in either tab.
NOT_KEPT = (
    '<p class="tokens-not-kept">These tokens are too many for your browser to keep, so the JSON export '
    "won't carry them. Look at them again here at any time.</p>"
)


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

# Why a request failed, in words for whoever sent it (fairness.Refused is an InvalidRequest).
VISITOR_ERRORS = (InvalidRequest, PromptTooLong, ScoringUnavailable, GenerationError)

P = ParamSpec("P")
T = TypeVar("T")


def visitor_errors(handler: Callable[P, T]) -> Callable[P, T]:
    """The handler (a function, or a generator function streaming updates), with bad input, a request
    over the visitor's fair share or an answer that can't be scored shown as a gr.Error saying why."""
    if inspect.isgeneratorfunction(handler):
        # A generator function still, so that Gradio streams what it yields.
        @functools.wraps(handler)
        def streaming(*args: P.args, **kwargs: P.kwargs):
            try:
                yield from cast(Iterator, handler(*args, **kwargs))
            except VISITOR_ERRORS as error:
                raise shown(error) from error

        return cast(Callable[P, T], streaming)

    @functools.wraps(handler)
    def answering(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return handler(*args, **kwargs)
        except VISITOR_ERRORS as error:
            raise shown(error) from error

    return answering


def shown(error: Exception) -> gr.Error:
    """The error as the visitor reads it. The server's log keeps the traceback of a failed answer only:
    bad input and refusals are the visitor's (a flood of refusals would otherwise write a traceback each)."""
    return gr.Error(str(error), print_exception=not isinstance(error, InvalidRequest | PromptTooLong))


def read_upload(file: dict | None) -> bytes:
    """The bytes of a file the visitor uploaded, for an event wired with preprocess=False: its handler
    gets Gradio's FileData as sent, whose path Gradio has checked is in its upload folder. The file is
    deleted once read, so that a visitor's imported chats are not left on the server's disk (nor
    served from it by their path)."""
    if not file:
        raise InvalidRequest("No file came with this import: choose it again.")
    folder, path = Path(get_upload_folder()).resolve(), Path(file["path"]).resolve()
    if not path.is_relative_to(folder):
        raise InvalidRequest("Import a file you upload from this page.")
    try:
        return path.read_bytes()
    except OSError:
        raise InvalidRequest("The uploaded file is gone: choose it again.") from None
    finally:
        path.unlink(missing_ok=True)
        # Gradio puts each upload in a folder named for its content: gone too once empty.
        with contextlib.suppress(OSError):
            path.parent.rmdir()


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
) -> Iterator[ChatUpdate]:
    """One answer's updates, for the page and /chat alike. Bad input raises InvalidRequest here, a
    request over the visitor's fair share fairness.Refused as the stream starts: call it from a
    handler wrapped in visitor_errors."""
    request = chat.request(message, system_message, history, moderation, single_turn, **params)
    return chat.respond(request, owner=owner, visitor=visitor)


def comparison(
    chat: Chat, message, system_messages, moderation, params: dict, owner: str | None, visitor: Visitor
) -> Iterator[tuple[ChatUpdate, ...]]:
    """The side-by-side answers' updates, for the page and /compare alike (errors as for turn)."""
    requests = chat.compare_requests(message, system_messages, moderation, visitor, **params)
    return chat.compare(requests, owner=owner, visitor=visitor)


def admitted(chat: Chat, request: gr.Request) -> contextlib.AbstractContextManager[None]:
    """A page event's work, holding one place in the visitor's fair share and its address's turn
    (fairness.Refused if full, or if the address is past its budget of bytes)."""
    return chat.fair_share.page_work(visitor_of(request), brought=_brought(request))


def _brought(request: gr.Request) -> int:
    """The bytes of the request's body, as it says (the door counted them as they came)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else 0


def visitor_of(request: gr.Request) -> Visitor:
    """A page session or API client, or the Hugging Face account signed in on the page, and its address
    (guard.py reads it as --trusted-proxies says)."""
    address = request.client.host if request.client else "unknown"
    account = signed_in_account(request)
    if account is not None:
        return Visitor(f"hf:{account}", address, signed_in=True)
    return Visitor(request.session_hash or f"address {address}", address)


def signed_in_account(request: gr.Request) -> str | None:
    """The Hugging Face account this request's browser signed in with, or None.

    Read where Gradio's OAuth routes keep it (what gr.OAuthProfile reads): the session, which Starlette's
    SessionMiddleware decodes from a cookie signed with a key made from the Space's OAuth secret, so a
    client can't write it. Nothing a client sends in a header or the request's body counts, and without
    sign-in on the page (no SessionMiddleware) there is no session at all."""
    underlying = request.request  # the HTTP request the event came with; None for one Gradio made itself
    session = underlying.scope.get("session") if underlying is not None else None
    info = (session or {}).get("oauth_info")
    if not isinstance(info, dict) or info.get("expires_at", math.inf) < time.time():
        return None
    username = (info.get("userinfo") or {}).get("preferred_username")
    return username if isinstance(username, str) and username else None


def caller_of(request: gr.Request) -> Visitor:
    """An agent calling an MCP tool: it has no page session (Gradio's MCP server is stateless), so the
    caller is its network address, read as for every request. Gradio hands a tool the MCP request
    itself (a Starlette Request, not a gr.Request), so only what both have is read."""
    address = request.client.host if request.client else "unknown"
    return Visitor(f"address {address}", address)


def history_messages(conversation: Conversation) -> list[dict]:
    return [
        message
        for t in conversation.history()
        for message in ({"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})
    ]


def exchange_of(question: str, system_message: str, single_turn: bool, update: ChatUpdate) -> Exchange:
    """The record of a finished answer."""
    settings = update.params or GenerationParams()
    return Exchange(
        question=question,
        answer=update.answer,
        system_message=system_message,
        single_turn=bool(single_turn),
        settings=settings,
        answer_ids=None if update.answer_ids is None else list(update.answer_ids),
        stats=Stats.of(update.stats) if update.stats else None,
        moderation=update.moderation,
        withheld=update.withheld,
        error=update.error,
    )


def wire_download(button: gr.Button, export_of: Callable[..., str], download: gr.Textbox, **inputs: Any) -> None:
    """The button saves a file in the browser: export_of(**inputs) returns it (see download), into the
    hidden download box, and DOWNLOAD_JS saves it."""
    button.click(export_of, inputs_kwargs=inputs, outputs=download, **PAGE_WORK).then(
        None, download, None, js=DOWNLOAD_JS, **INSTANT
    )


@visitor_errors
def download(chat: Chat, conversation: Conversation, kind: str, looked: LookedAt) -> str:
    """What the browser downloads: {"filename", "mime", "text"} as JSON (see DOWNLOAD_JS)."""
    if not conversation.exchanges:
        raise gr.Error("Nothing to export yet: ask a question first.")
    conversation.within(chat.settings.max_exchanges)
    name = f"orca2-{conversation.created[:10]}-{conversation.id}"
    if kind == "markdown":
        return _download(f"{name}.md", "text/markdown", to_markdown(conversation, chat.backend.info, looked))
    prompts = chat.prompts([e.asked for e in conversation.exchanges])
    exported = export(conversation, chat.backend.info, prompts, looked)
    return _download(f"{name}.json", "application/json", exported.model_dump_json(indent=2))


def comparison_download(chat: Chat, answers: list[Exchange], looked: LookedAt) -> str:
    """A comparison's JSON file, as download's."""
    exported = export_comparison(answers, chat.backend.info, _prompt_ids(chat, answers), looked)
    name = f"orca2-comparison-{exported.exported[:19].replace(':', '')}.json"
    return _download(name, "application/json", exported.model_dump_json(indent=2))


def _prompt_ids(chat: Chat, answers: Sequence[Exchange]) -> list[list[int]]:
    """The ids the model read for each single-turn answer, rebuilt from the record."""
    return [[] if p is None else p.ids for p in chat.prompts([e.asked for e in answers]).prompts]


def _download(filename: str, mime: str, text: str) -> str:
    return json.dumps({"filename": filename, "mime": mime, "text": text})
