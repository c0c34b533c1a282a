"""A visitor's conversations as records: what was asked and what Orca 2 wrote, with the settings, seed
and ids that reproduce each answer.

The page keeps them in the visitor's browser (never on the server) and exports them as JSON (to
replay or share) or Markdown (to read). A record holds the text exactly as typed and written; how it
is shown is render.py's business.

A JSON export (version 2) holds the ids the model read for each exchange without repeating the earlier
turns a multi-turn prompt carried: those are named (earlier_turns) and each carried exchange's ids are
written once (turn_ids), so an export's size follows the conversation's (Export.prompt_ids_of puts a
prompt back together). Version 1 files, which repeated them, still import.
"""

from __future__ import annotations

import datetime
import json
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .backends.contract import GenerationStats, ModelInfo
from .moderation import ModerationState
from .prompt import Asked, ConversationPrompts, Turn
from .settings import GenerationParams, InvalidRequest, Settings

FORMAT = "orca2-space/conversation"
FORMAT_VERSION = 2
# The browser keeps this many conversations; the oldest go first.
MAX_KEPT = 50
_STRICT = ConfigDict(extra="forbid")


class Stats(BaseModel):
    model_config = _STRICT

    stop_reason: str
    n_tokens: int
    seconds: float
    tokens_per_second: float
    batched: bool = False

    @classmethod
    def of(cls, stats: GenerationStats) -> Stats:
        return cls(
            stop_reason=stats.stop_reason.value,
            n_tokens=stats.n_tokens,
            seconds=round(stats.seconds, 3),
            tokens_per_second=round(stats.tokens_per_second, 2),
            batched=stats.batched,
        )


class Exchange(BaseModel):
    """One question and what came of it."""

    model_config = _STRICT

    question: str
    # Exactly what Orca 2 wrote; empty when moderation withheld it or the model failed first.
    answer: str
    system_message: str
    # Answered without the earlier turns (single-turn mode), or with them.
    single_turn: bool
    # As used: a sampled answer's seed is the one drawn, so the answer can be redone.
    settings: GenerationParams
    answer_ids: list[int] | None = None
    stats: Stats | None = None
    moderation: ModerationState = ModerationState.OFF
    withheld: str | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        """Whether a later turn may send this one back to the model."""
        return self.withheld is None and bool(self.answer)

    @property
    def asked(self) -> Asked:
        """The question as its prompt was built: the earlier turns went with it unless single-turn."""
        answer = self.answer if self.usable else None
        return Asked(self.question, self.system_message, self.settings.max_new_tokens, not self.single_turn, answer)


class Conversation(BaseModel):
    model_config = _STRICT

    id: str = Field(default_factory=lambda: secrets.token_hex(8))
    created: str = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    exchanges: list[Exchange] = []

    @property
    def title(self) -> str:
        first = self.exchanges[0].question if self.exchanges else "New chat"
        line = " ".join(first.split())
        return line if len(line) <= 60 else line[:59] + "…"

    def history(self) -> list[Turn]:
        """The earlier turns a multi-turn question carries: moderation's and errors' notices never."""
        return [Turn(e.question, e.answer) for e in self.exchanges if e.usable]

    def within(self, max_exchanges: int) -> None:
        """Refuses (InvalidRequest) a conversation longer than the server shows and exports."""
        if len(self.exchanges) > max_exchanges:
            raise InvalidRequest(
                f"A chat of {len(self.exchanges):,} exchanges is longer than this server takes: at most "
                f"{max_exchanges:,} in one chat (--max-exchanges)."
            )

    def room_for_another(self, max_exchanges: int) -> None:
        """Refuses (InvalidRequest) a new question where the conversation is as long as the server takes."""
        if len(self.exchanges) >= max_exchanges:
            raise InvalidRequest(
                f"This chat has {len(self.exchanges):,} exchanges, the most this server keeps in one chat "
                "(--max-exchanges). Start a new chat to go on."
            )


class Store(BaseModel):
    """Everything the browser keeps: the conversations, newest first, and which one is open."""

    model_config = _STRICT

    open: str | None = None
    conversations: list[Conversation] = []

    @classmethod
    def load(cls, value: object, settings: Settings) -> Store:
        """The store as the browser sent it; an unreadable one (an older format) starts afresh.

        A store over the server's caps is refused (InvalidRequest, naming the cap): its size before
        it is read, then its length. The browser sends it with every request, so a script can send
        anything; the page never sends more than a browser keeps."""
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        if size > settings.max_store_chars:
            raise InvalidRequest(
                f"Your browser sent {size:,} characters of conversations; this server reads at most "
                f"{settings.max_store_chars:,} (--max-store-chars)."
            )
        try:
            store = cls.model_validate(value or {})
        except ValidationError:
            return cls()
        if len(store.conversations) > MAX_KEPT:
            raise InvalidRequest(
                f"Your browser sent {len(store.conversations)} conversations; it keeps at most {MAX_KEPT}."
            )
        for conversation in store.conversations:
            conversation.within(settings.max_exchanges)
        return store

    def current(self) -> Conversation:
        """The open conversation; one emptied by Retry or Undo keeps its id (it is listed again once it
        has an exchange)."""
        for conversation in self.conversations:
            if conversation.id == self.open:
                return conversation
        return Conversation(id=self.open) if self.open else Conversation()

    def save(self, conversation: Conversation) -> Store:
        """The store with this conversation open and first in the list."""
        others = [c for c in self.conversations if c.id != conversation.id]
        kept = [conversation, *others][:MAX_KEPT] if conversation.exchanges else others
        return Store(open=conversation.id, conversations=kept)

    def delete(self, conversation_id: str | None) -> Store:
        kept = [c for c in self.conversations if c.id != conversation_id]
        return Store(open=None if self.open == conversation_id else self.open, conversations=kept)


class EarlierTurns(BaseModel):
    """Where a multi-turn prompt carried earlier turns: at index `at` of its prompt_ids go the turn_ids
    of every exchange numbered `first` (counting from 1) up to this one that has turn_ids."""

    model_config = _STRICT

    first: int = Field(ge=1)
    at: int = Field(ge=0)


class ExportedExchange(Exchange):
    # The exact ids the model read, recomputed when exporting (they follow from the record); without the
    # earlier turns, where earlier_turns says they go.
    prompt_ids: list[int]
    earlier_turns: EarlierTurns | None = None
    # This exchange's question and answer as a later prompt carried them (where one did).
    turn_ids: list[int] | None = None


class Export(BaseModel):
    """A conversation with what a reader needs to judge or redo it: the model, its weights and the app."""

    model_config = _STRICT

    format: Literal["orca2-space/conversation"] = FORMAT
    # 1: each prompt_ids held the whole prompt, earlier turns and all.
    version: Literal[1, 2] = FORMAT_VERSION
    app_version: str = __version__
    model: str
    weights: str
    backend: str
    exported: str = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    conversation_id: str
    created: str
    exchanges: list[ExportedExchange]

    def prompt_ids_of(self, index: int) -> list[int]:
        """The whole prompt the model read for the exchange at index (from 0), earlier turns included."""
        e = self.exchanges[index]
        if e.earlier_turns is None:
            return e.prompt_ids
        at, carried = e.earlier_turns.at, self.exchanges[e.earlier_turns.first - 1 : index]
        return e.prompt_ids[:at] + [i for c in carried for i in c.turn_ids or ()] + e.prompt_ids[at:]


def export(conversation: Conversation, info: ModelInfo, prompts: ConversationPrompts) -> Export:
    """The conversation with the prompts Chat.prompts gave for its exchanges (an exchange whose prompt
    the server would refuse exports no ids)."""
    exchanges = []
    for index, (e, prompt) in enumerate(zip(conversation.exchanges, prompts.prompts)):
        carried = None if prompt is None or prompt.first is None else EarlierTurns(first=prompt.first + 1, at=prompt.at)
        exchanges.append(
            ExportedExchange(
                **e.model_dump(),
                prompt_ids=[] if prompt is None else prompt.ids,
                earlier_turns=carried,
                turn_ids=prompts.turn_ids.get(index),
            )
        )
    return Export(
        model=info.name,
        weights=info.quantization,
        backend=_backend(info),
        conversation_id=conversation.id,
        created=conversation.created,
        exchanges=exchanges,
    )


def _backend(info: ModelInfo) -> str:
    return f"inference server at {info.served_by}" if info.served_by else f"local ({info.device})"


def parse_export(text: str | bytes, max_exchanges: int) -> Conversation:
    """A conversation from an exported JSON file (either version); InvalidRequest says what is wrong
    with it, or that it is longer than the server takes."""
    try:
        exported = Export.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors()[:3])
        raise InvalidRequest(f"This is not a conversation exported from this app ({problems}).") from None
    exported_only = {"prompt_ids", "earlier_turns", "turn_ids"}
    exchanges = [Exchange(**e.model_dump(exclude=exported_only)) for e in exported.exchanges]
    conversation = Conversation(id=exported.conversation_id, created=exported.created, exchanges=exchanges)
    conversation.within(max_exchanges)
    return conversation


def to_markdown(conversation: Conversation, info: ModelInfo) -> str:
    """The conversation for reading: each question and answer verbatim, in fenced blocks."""
    lines = [
        f"# Orca 2 conversation ({conversation.created})",
        "",
        f"Model: {info.name} · {info.quantization} · {_backend(info)} · orca2-space {__version__}",
    ]
    for number, e in enumerate(conversation.exchanges, 1):
        mode = "single turn" if e.single_turn else "with the earlier turns"
        how = f"seed {e.settings.seed}" if e.settings.do_sample else "greedy"
        lines += ["", f"## {number}. Question ({mode}, {how})", "", _fenced(e.question)]
        lines += ["", "System message:", "", _fenced(e.system_message)]
        lines += ["", "Answer:", "", _fenced(e.answer)]
        lines += [f"\n> {notice}" for notice in (e.withheld, e.error) if notice]
    return "\n".join(lines) + "\n"


def _fenced(text: str) -> str:
    """Text in a code fence longer than any run of backticks in it, so that it reads verbatim."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}\n{text}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    run = best = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        best = max(best, run)
    return best
