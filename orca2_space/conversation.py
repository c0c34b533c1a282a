"""A visitor's conversations as records: what was asked and what Orca 2 wrote, with the settings, seed
and ids that reproduce each answer.

The page keeps them in the visitor's browser (never on the server) and exports them as JSON (to
replay or share) or Markdown (to read). A record holds the text exactly as typed and written; how it
is shown is render.py's business.
"""

from __future__ import annotations

import datetime
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .backends.contract import GenerationStats, ModelInfo
from .moderation import ModerationState
from .prompt import Turn
from .settings import GenerationParams, InvalidRequest

FORMAT = "orca2-space/conversation"
FORMAT_VERSION = 1
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


class Store(BaseModel):
    """Everything the browser keeps: the conversations, newest first, and which one is open."""

    model_config = _STRICT

    open: str | None = None
    conversations: list[Conversation] = []

    @classmethod
    def load(cls, value: object) -> Store:
        """The store as the browser sent it; an unreadable one (an older format) starts afresh."""
        try:
            return cls.model_validate(value or {})
        except ValidationError:
            return cls()

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


class ExportedExchange(Exchange):
    # The exact ids the model read, recomputed when exporting (they follow from the record).
    prompt_ids: list[int]


class Export(BaseModel):
    """A conversation with what a reader needs to judge or redo it: the model, its weights and the app."""

    model_config = _STRICT

    format: Literal["orca2-space/conversation"] = FORMAT
    version: Literal[1] = FORMAT_VERSION
    app_version: str = __version__
    model: str
    weights: str
    backend: str
    exported: str = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    conversation_id: str
    created: str
    exchanges: list[ExportedExchange]


def export(conversation: Conversation, info: ModelInfo, prompt_ids: list[list[int]]) -> Export:
    exchanges = [
        ExportedExchange(**e.model_dump(), prompt_ids=ids) for e, ids in zip(conversation.exchanges, prompt_ids)
    ]
    return Export(
        model=info.name,
        weights=info.quantization,
        backend=f"inference server at {info.served_by}" if info.served_by else f"local ({info.device})",
        conversation_id=conversation.id,
        created=conversation.created,
        exchanges=exchanges,
    )


def parse_export(text: str | bytes) -> Conversation:
    """A conversation from an exported JSON file; InvalidRequest says what is wrong with it."""
    try:
        exported = Export.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors()[:3])
        raise InvalidRequest(f"This is not a conversation exported from this app ({problems}).") from None
    exchanges = [Exchange(**e.model_dump(exclude={"prompt_ids"})) for e in exported.exchanges]
    return Conversation(id=exported.conversation_id, created=exported.created, exchanges=exchanges)


def to_markdown(exported: Export) -> str:
    """The conversation for reading: each question and answer verbatim, in fenced blocks."""
    lines = [
        f"# Orca 2 conversation ({exported.created})",
        "",
        f"Model: {exported.model} · {exported.weights} · {exported.backend} · orca2-space {exported.app_version}",
    ]
    for number, e in enumerate(exported.exchanges, 1):
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
